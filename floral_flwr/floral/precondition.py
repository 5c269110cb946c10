"""Preconditioned gradients of the low-rank factors (``Floral(precondition=True)``).

The official trainer (``PrecondLoRATrainer``) rescales the gradients of every adaptor's factors
after ``backward`` and before the optimizer step ("scaled GD" for low-rank factors):

* linear adaptor c, A_c = ``in`` (r, d_in), B_c = ``out`` (d_out, r):
  ``g_A <- (B^T B + eps I)^-1 g_A`` and ``g_B <- g_B (A A^T + eps I)^-1``. To first order the
  product then moves by ``-lr (P_B G + G P_A)`` (G the gradient of the full weight, P_X the
  projector on X's span) whatever the factors' scale: a rank-r adaptor started at B = 0 learns at
  the speed of the full layer instead of ``lr * |B|^2`` for A;
* conv / transposed-conv adaptor c: each factor's gradient is divided by ``||P||_F + eps``, P the
  other factor's Gram tensor (contracting its channel axis that faces the rank, per kernel
  position), as the official code does;
* biases, embeddings, norm adaptors and the mixture are not preconditioned.

Here the rescaling is a gradient hook on the bank parameters (it runs inside ``backward``), so any
training loop gets it without a call of its own. The preconditioner is linear in the gradient and
reads the factors' current values, which ``backward`` does not change, so the hook computes
exactly what the official post-backward step does.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .adaptors import Adaptor, ConvAdaptor, ConvTransposeAdaptor, LinearAdaptor


def _linear_hooks(adaptor: LinearAdaptor, eps: float) -> List[tuple[Tensor, Callable]]:
    a, b = adaptor.bank("in"), adaptor.bank("out")
    r = adaptor.rank
    c = a.shape[0] // r

    def grad_in(g: Tensor) -> Tensor:  # (C*r, d_in): per c, (B_c^T B_c + eps I)^-1 g_A_c
        bc = b.detach().view(b.shape[0], c, r).transpose(0, 1)  # (C, d_out, r)
        gram = bc.transpose(1, 2) @ bc
        gram.diagonal(dim1=1, dim2=2).add_(eps)
        return torch.linalg.solve(gram, g.view(c, r, -1)).reshape(g.shape)

    def grad_out(g: Tensor) -> Tensor:  # (d_out, C*r): per c, g_B_c (A_c A_c^T + eps I)^-1
        ac = a.detach().view(c, r, -1)
        gram = ac @ ac.transpose(1, 2)  # symmetric, so g G^-1 = (G^-1 g^T)^T
        gram.diagonal(dim1=1, dim2=2).add_(eps)
        gb = g.view(g.shape[0], c, r).permute(1, 2, 0)  # (C, r, d_out) = g_B_c^T
        return torch.linalg.solve(gram, gb).permute(2, 0, 1).reshape(g.shape)

    return [(a, grad_in), (b, grad_out)]


def _gram_norms(factor: Tensor, axis: int) -> Tensor:
    """Per adaptor c: Frobenius norm of sum over ``axis`` of factor[c, ..] x factor[c, ..] with
    the other channel axis kept twice and the kernel axes kept once (the official einsum)."""
    f = factor.detach()
    if axis == 2:
        f = f.transpose(1, 2)
    # f: (C, contracted, kept, *kernel)
    c, m, k = f.shape[:3]
    flat = f.reshape(c, m, k, -1).permute(0, 3, 1, 2)  # (C, K, m, k)
    gram = flat.transpose(2, 3) @ flat  # (C, K, k, k)
    return torch.linalg.vector_norm(gram.reshape(c, -1), dim=1)


def _conv_hooks(adaptor: Adaptor, eps: float, in_axis: int, out_axis: int) -> List[tuple[Tensor, Callable]]:
    a, b = adaptor.bank("in"), adaptor.bank("out")

    def scaled(other: Tensor, axis: int) -> Callable[[Tensor], Tensor]:
        def hook(g: Tensor) -> Tensor:
            norms = _gram_norms(other, axis).add_(eps)
            return g / norms.view(-1, *(1,) * (g.dim() - 1))
        return hook

    # g_in is scaled by the Gram of ``out``, g_out by the Gram of ``in``
    return [(a, scaled(b, out_axis)), (b, scaled(a, in_axis))]


def install_preconditioner(adaptor: Adaptor, eps: float = 1e-5) -> List[RemovableHandle]:
    """Register the gradient hooks of ``adaptor``'s kind (none for kinds not preconditioned)."""
    if isinstance(adaptor, LinearAdaptor):
        pairs = _linear_hooks(adaptor, eps)
    elif isinstance(adaptor, ConvAdaptor):
        # out (C, C_out, r/g, *k): contract C_out; in (C, r, C_in/g, *k): contract C_in/g
        pairs = _conv_hooks(adaptor, eps, in_axis=2, out_axis=1)
    elif isinstance(adaptor, ConvTransposeAdaptor):
        # the official einsums on the transposed layouts: out (C, r, C_out/g, *k) contracts its
        # first axis (r), in (C, C_in, r/g, *k) its second (r/g)
        pairs = _conv_hooks(adaptor, eps, in_axis=2, out_axis=1)
    else:
        return []
    return [t.register_hook(h) for t, h in pairs]
