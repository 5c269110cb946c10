# size: one adaptor class per layer kind (linear, conv, norm, embedding) with their shared bank layout; splitting would scatter one contract.
"""Adaptor banks (C adaptors per layer, stacked on a leading dim) and their weight folds.

Every adaptor kind computes ``delta_weight(p)`` and ``delta_bias(p)`` such that the adapted layer
is the *base layer with* ``W + alpha * delta_weight(p)`` and ``b + alpha * delta_bias(p)``.
This equals the official ``base(x) + alpha * sum_c p_c * adaptor_c(x)`` because p is per client
(not per sample) and every adaptor is linear in x with the base layer's geometry:

* Linear:     adaptor_c(x) = B_c A_c x + b_c                -> delta = sum_c p_c B_c A_c
* Conv:       layer_out_c(layer_in_c(x)) (+ b_c), layer_in without bias; the two kernels act on
              disjoint axes (or one is 1x1), so the composition is ONE conv with kernel
              K[o, i, ...] = sum_j B[o, j, k_out] A[j, i, k_in] and the main layer's stride /
              padding / dilation / groups / padding_mode.
* ConvTranspose: same, with transposed-conv weight layouts.
* Embedding:  adaptor_c(idx) = (A_c @ B_c^T)[idx]          -> delta = sum_c p_c A_c B_c^T
* Norm:       an extra affine (w_c, b_c) applied under the main layer's statistics (the official
              ``normlora_reparam`` form with shared statistics): delta = sum_c p_c w_c.

All sums over c are done with one matmul on the stacked banks (no Python loop over adaptors).
The folds are installed with ``torch.nn.utils.parametrize`` on ``weight`` / ``bias`` (like
minLoRA), so anything that reads ``module.weight`` sees the adapted weight.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .mixture import MixtureContext
from .rank import RankSpec, resolve_rank

CONV_METHODS = ("balanced_2d", "balanced", "in", "out")
NORM_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm
    nn.modules.instancenorm._InstanceNorm,  # InstanceNorm1d/2d/3d (affine=False by default)
    nn.LayerNorm,
    nn.GroupNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _uniform_in_(t: Tensor, fan_in: int) -> None:
    """Official ``init_lora_("uniform_in")``: U(-sqrt(6/fan_in), +sqrt(6/fan_in))."""
    bound = math.sqrt(6.0 / fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound)


def split_kernel(kernel: Sequence[int], in_channels: int, out_channels: int,
                 method: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Kernel sizes ``(k_in, k_out)`` of the two stacked convs; per axis one of them is 1.

    * ``balanced_2d``: 2d -> in (1, kw), out (kh, 1); 3d -> in (1, kh, kw), out (kd, 1, 1);
      1d -> ``balanced``. Deviation: the official code uses (1, min k)/(max k, 1) depending on the
      channel counts, which for non-square kernels yields a different kernel than the main
      layer's (different output shapes); we split exactly per axis. The official code also falls
      back to ``balanced`` for 3d.
    * ``balanced``: full kernel on the side with fewer channels (in-layer on ties), 1 elsewhere.
    * ``in``: full kernel then 1x1. ``out``: 1x1 then full kernel.

    The layer with the (partial) kernel takes the main layer's stride/padding/dilation on those
    axes; the 1-sized axes use stride 1 / padding 0 / dilation 1.
    """
    k = tuple(int(v) for v in kernel)
    n = len(k)
    ones = (1,) * n
    if method == "balanced_2d" and n == 1:
        method = "balanced"
    if method == "balanced_2d":
        return (1,) + k[1:], k[:1] + (1,) * (n - 1)
    if method == "balanced":
        return (ones, k) if in_channels > out_channels else (k, ones)
    if method == "in":
        return k, ones
    if method == "out":
        return ones, k
    raise ValueError(f"conv_method={method!r} is invalid; allowed: {CONV_METHODS}")


class Adaptor(nn.Module):
    """Base class. Subclasses hold the stacked banks as parameters named as in the state keys
    (``in``, ``out``, ``bias`` or ``weight``, ``bias``); slice ``[c]`` of each tensor in
    :meth:`state_items` is adaptor c."""

    kind: str = "adaptor"
    rank: Optional[int] = None

    def bank(self, name: str) -> Optional[Tensor]:
        return self._parameters.get(name)

    def state_items(self) -> List[Tuple[str, Tensor]]:
        """(factor, tensor) with the adaptor index first: what the state API shows, sends and
        aggregates. The parameters themselves, unless a subclass stores them otherwise."""
        return [(k, t) for k, t in self._parameters.items() if t is not None]

    def delta_weight(self, p: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_bias(self, p: Tensor) -> Optional[Tensor]:
        b = self._parameters.get("bias")
        if b is None:
            return None
        return (_cast(p, b) @ b.flatten(1)).view(b.shape[1:])

    # The fold_* methods are what the parametrizations call; they compute the same value as
    # ``base + alpha * delta`` with fewer kernel launches (small models are launch-bound).
    def fold_weight(self, weight: Tensor, p: Tensor, alpha: float) -> Tensor:
        return _add_scaled(weight, self.delta_weight(p), alpha)

    def fold_bias(self, bias: Tensor, p: Tensor, alpha: float) -> Tensor:
        return _fold_vector(bias, self._parameters["bias"], p, alpha)

    @property
    def num_adaptors(self) -> int:
        return self.state_items()[0][1].shape[0]


def _add_scaled(base: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """``base + alpha * delta`` (no multiply when alpha is 1)."""
    return base + (delta if alpha == 1.0 else alpha * delta)


def _cast(p: Tensor, like: Tensor) -> Tensor:
    return p if p.dtype == like.dtype else p.to(like.dtype)


def _fold_vector(base: Tensor, bank: Tensor, p: Tensor, alpha: float) -> Tensor:
    """``base + alpha * sum_c p_c bank[c]`` in one addmv (bank: (C, *base.shape))."""
    if base.dim() == 1:  # biases: no reshapes (each is an autograd node on a small layer's step)
        return torch.addmv(base, bank.t(), _cast(p, bank), alpha=alpha)
    out = torch.addmv(base.reshape(-1), bank.reshape(bank.shape[0], -1).t(), _cast(p, bank),
                      alpha=alpha)
    return out.view(base.shape)


def _new_bank(shape: Sequence[int], like: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros(tuple(shape), dtype=like.dtype, device=like.device))


class LinearAdaptor(Adaptor):
    """Per adaptor c: A_c (r, d_in) uniform_in, B_c (d_out, r) zeros, bias_c (d_out,) zeros.

    Stored as the two matrices the products use, ``in`` = [A_1; ...; A_C]: (C*r, d_in) and
    ``out`` = [B_1 | ... | B_C]: (d_out, C*r), because a reshaped view of a parameter is one more
    autograd node per step, and a small layer's step is bound by its node count (the digits MLP
    step is ~15 % faster than with (C, r, d_in) / (C, d_out, r) parameters, bench_core_step).
    :meth:`state_items` shows them per adaptor as (C, r, d_in) and (C, d_out, r) views.
    """

    kind = "linear"

    def __init__(self, main: nn.Linear, num_adaptors: int, rank: RankSpec, min_rank: int,
                 adaptive_bias: bool, **_: object) -> None:
        super().__init__()
        d_in, d_out = main.in_features, main.out_features
        self.rank = r = resolve_rank(rank, d_in, d_out, min_rank)
        self.register_parameter("in", _new_bank((num_adaptors * r, d_in), main.weight))
        self.register_parameter("out", _new_bank((d_out, num_adaptors * r), main.weight))
        if adaptive_bias and main.bias is not None:
            self.register_parameter("bias", _new_bank((num_adaptors, d_out), main.bias))
        _uniform_in_(self._parameters["in"], d_in)

    def state_items(self) -> List[Tuple[str, Tensor]]:
        a, b = self._parameters["in"], self._parameters["out"]
        r = self.rank
        c = a.shape[0] // r
        items = [("in", a.view(c, r, a.shape[1])), ("out", b.view(b.shape[0], c, r).transpose(0, 1))]
        if "bias" in self._parameters:
            items.append(("bias", self._parameters["bias"]))
        return items

    def _columns(self, p: Tensor) -> Tensor:
        """p per column of [B_1 | ... | B_C]: (p_1 x r, ..., p_C x r)."""
        return p if self.rank == 1 else p.repeat_interleave(self.rank)

    def delta_weight(self, p: Tensor) -> Tensor:
        return self._delta_columns(self._columns(p))

    def _delta_columns(self, p_columns: Tensor) -> Tensor:
        b = self._parameters["out"]
        # [B_1 p_1 | ... | B_C p_C] @ [A_1; ...; A_C]: one rank-(C*r) product.
        return (b * _cast(p_columns, b)) @ self._parameters["in"]

    def fold_weight(self, weight: Tensor, p: Tensor, alpha: float) -> Tensor:
        return self.fold_weight_columns(weight, self._columns(p), alpha)

    def fold_weight_columns(self, weight: Tensor, p_columns: Tensor, alpha: float) -> Tensor:
        """``fold_weight`` with p given per column of [B_1 | ... | B_C] (C*r,)."""
        if torch.is_autocast_enabled(weight.device.type):
            # autocast would run addmm in low precision and round the base weight too; keep the
            # parameter's dtype (the layer casts it for its own matmul anyway).
            return _add_scaled(weight, self._delta_columns(p_columns), alpha)
        b = self._parameters["out"]
        return torch.addmm(weight, b * _cast(p_columns, b), self._parameters["in"], alpha=alpha)

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], ctx: MixtureContext,
               index: int, alpha: float, compute: str = "auto") -> Tensor:
        """The adapted layer's output from the *raw* base ``weight``/``bias``, with layer
        ``index``'s mixture read from ``ctx``.

        ``compute``: "fold" runs one ``F.linear`` with ``W + alpha * sum_c p_c B_c A_c``;
        "unfold" runs the base layer and adds ``alpha * sum_c p_c B_c A_c x`` beside it; "auto"
        picks per call the cheaper one: per adaptor rank unit, folding costs d_in*d_out and the
        unfolded path rows*(d_in+d_out) (forward; the backward scales alike)."""
        if bias is not None and "bias" in self._parameters:
            bias = self.fold_bias(bias, ctx.probs(index), alpha)
        if compute == "auto":
            d_out, d_in = weight.shape
            rows = x.numel() // max(1, x.shape[-1])
            compute = "unfold" if rows * (d_in + d_out) < d_in * d_out else "fold"
        p_columns = ctx.probs_repeated(index, self.rank)
        if compute == "fold":
            return F.linear(x, self.fold_weight_columns(weight, p_columns, alpha), bias)
        return self.add_lowrank(F.linear(x, weight, bias), x, p_columns, alpha)

    def add_lowrank(self, out: Tensor, x: Tensor, p_columns: Tensor, alpha: float) -> Tensor:
        """Unfolded path: ``out + alpha * sum_c p_c B_c A_c x`` (cheaper than folding when
        rows * (d_in + d_out) < d_in * d_out); ``p_columns``: (C*r,), each p_c repeated r times."""
        a, bank = self._parameters["in"], self._parameters["out"]
        # every view is an autograd node; small layers are bound by their count, so 2-d inputs
        # skip the reshapes
        flat = x.dim() != 2
        x2 = x.reshape(-1, a.shape[1]) if flat else x
        out2 = out.reshape(-1, out.shape[-1]) if flat else out
        h = torch.mm(x2, a.t())
        # scale by p whichever side is smaller: the (rows, C*r) hidden or the (d_out, C*r) bank
        if h.shape[0] <= bank.shape[0]:
            h = h * _cast(p_columns, h)
        else:
            bank = bank * _cast(p_columns, bank)
        y = torch.addmm(out2, h, bank.t(), alpha=alpha)
        return y.view(out.shape) if flat else y


class ConvAdaptor(Adaptor):
    """Two stacked convs per adaptor (C_in -> r -> C_out, both with ``groups=main.groups``).

    ``in``: (C, r, C_in/g, *k_in) uniform_in (the in-conv weights); ``out``: (C, C_out, r/g,
    *k_out) zeros; ``bias``: (C, C_out) zeros.
    """

    def __init__(self, main: _ConvNd, num_adaptors: int, rank: RankSpec, min_rank: int,
                 adaptive_bias: bool, conv_method: str = "balanced_2d", **_: object) -> None:
        super().__init__()
        n = len(main.kernel_size)
        self.kind = f"conv{n}d"
        g = main.groups
        cin, cout = main.in_channels, main.out_channels
        self.k_in, self.k_out = split_kernel(main.kernel_size, cin, cout, conv_method)
        d_in, d_out = cin * math.prod(self.k_in), cout * math.prod(self.k_out)
        self.rank = r = resolve_rank(rank, d_in, d_out, min_rank, groups=g)
        self.groups = g
        self.register_parameter("in", _new_bank((num_adaptors, r, cin // g, *self.k_in), main.weight))
        self.register_parameter("out", _new_bank((num_adaptors, cout, r // g, *self.k_out), main.weight))
        if adaptive_bias and main.bias is not None:
            self.register_parameter("bias", _new_bank((num_adaptors, cout), main.bias))
        _uniform_in_(self._parameters["in"], d_in)

    def delta_weight(self, p: Tensor) -> Tensor:
        a, b = self._parameters["in"], self._parameters["out"]
        c, r, cin_g = a.shape[:3]
        cout, g, n = b.shape[1], self.groups, len(self.k_in)
        rg, cout_g = r // g, cout // g
        kin, kout = math.prod(self.k_in), math.prod(self.k_out)
        # A': (g, C*rg, cin_g*Kin); B'p: (g, cout_g*Kout, C*rg); one batched matmul over groups.
        a2 = a.reshape(c, g, rg, cin_g * kin).transpose(0, 1).reshape(g, c * rg, cin_g * kin)
        bp = b * _cast(p, b).view(c, *(1,) * (b.dim() - 1))
        b2 = bp.reshape(c, g, cout_g, rg, kout).permute(1, 2, 4, 0, 3).reshape(g, cout_g * kout, c * rg)
        w = torch.bmm(b2, a2).view(g, cout_g, *self.k_out, cin_g, *self.k_in)
        # Interleave (k_out[a], k_in[a]) per axis; one of each pair is 1, so the reshape gives k.
        perm = [0, 1, 2 + n]
        for ax in range(n):
            perm += [2 + ax, 3 + n + ax]
        kernel = [ko * ki for ko, ki in zip(self.k_out, self.k_in)]
        return w.permute(perm).reshape(cout, cin_g, *kernel)


class ConvTransposeAdaptor(Adaptor):
    """Two stacked transposed convs (C_in -> r -> C_out, ``groups=main.groups``).

    ``in``: (C, C_in, r/g, *k_in) uniform_in (weights of the in ConvTranspose); ``out``:
    (C, r, C_out/g, *k_out) zeros; ``bias``: (C, C_out) zeros.
    """

    def __init__(self, main: _ConvTransposeNd, num_adaptors: int, rank: RankSpec, min_rank: int,
                 adaptive_bias: bool, conv_method: str = "balanced_2d", **_: object) -> None:
        super().__init__()
        n = len(main.kernel_size)
        self.kind = f"conv_transpose{n}d"
        g = main.groups
        cin, cout = main.in_channels, main.out_channels
        self.k_in, self.k_out = split_kernel(main.kernel_size, cin, cout, conv_method)
        d_in, d_out = cin * math.prod(self.k_in), cout * math.prod(self.k_out)
        self.rank = r = resolve_rank(rank, d_in, d_out, min_rank, groups=g)
        self.groups = g
        self.register_parameter("in", _new_bank((num_adaptors, cin, r // g, *self.k_in), main.weight))
        self.register_parameter("out", _new_bank((num_adaptors, r, cout // g, *self.k_out), main.weight))
        if adaptive_bias and main.bias is not None:
            self.register_parameter("bias", _new_bank((num_adaptors, cout), main.bias))
        _uniform_in_(self._parameters["in"], d_in)

    def delta_weight(self, p: Tensor) -> Tensor:
        a, b = self._parameters["in"], self._parameters["out"]
        c, cin, rg = a.shape[:3]
        g, n = self.groups, len(self.k_in)
        cin_g, cout_g = cin // g, b.shape[2]
        kin, kout = math.prod(self.k_in), math.prod(self.k_out)
        ap = a * _cast(p, a).view(c, *(1,) * (a.dim() - 1))
        a2 = ap.reshape(c, g, cin_g, rg, kin).permute(1, 2, 4, 0, 3).reshape(g, cin_g * kin, c * rg)
        b2 = b.reshape(c, g, rg, cout_g * kout).transpose(0, 1).reshape(g, c * rg, cout_g * kout)
        w = torch.bmm(a2, b2).view(g, cin_g, *self.k_in, cout_g, *self.k_out)
        perm = [0, 1, 2 + n]
        for ax in range(n):
            perm += [2 + ax, 3 + n + ax]
        kernel = [ki * ko for ki, ko in zip(self.k_in, self.k_out)]
        return w.permute(perm).reshape(cin, cout_g, *kernel)


class EmbeddingAdaptor(Adaptor):
    """Official ``EmbeddingLoRA``: Embedding(V, r) ~ N(0, 1) then Linear(r, D) = 0.

    ``in``: (C, V, r) (embedding tables); ``out``: (C, D, r) (linear weights, zeros).
    """

    kind = "embedding"

    def __init__(self, main: nn.Embedding, num_adaptors: int, rank: RankSpec, min_rank: int,
                 **_: object) -> None:
        super().__init__()
        v, d = main.num_embeddings, main.embedding_dim
        self.rank = r = resolve_rank(rank, v, d, min_rank)
        self.register_parameter("in", _new_bank((num_adaptors, v, r), main.weight))
        self.register_parameter("out", _new_bank((num_adaptors, d, r), main.weight))
        with torch.no_grad():
            self._parameters["in"].normal_()

    def delta_weight(self, p: Tensor) -> Tensor:
        a, b = self._parameters["in"], self._parameters["out"]
        c, v, r = a.shape
        ap = (a * _cast(p, a).view(c, 1, 1)).permute(1, 0, 2).reshape(v, c * r)
        return ap @ b.permute(0, 2, 1).reshape(c * r, b.shape[1])


class NormAdaptor(Adaptor):
    """Per-adaptor affine (``weight``, ``bias``: (C, *affine shape), zeros) under the main
    layer's statistics. The bias bank exists whenever the main layer has a bias (independent of
    ``adaptive_bias``: it is part of the norm adaptor)."""

    kind = "norm"

    def __init__(self, main: nn.Module, num_adaptors: int, **_: object) -> None:
        super().__init__()
        self.kind = f"norm:{type(main).__name__}"
        self.register_parameter("weight", _new_bank((num_adaptors, *main.weight.shape), main.weight))
        if getattr(main, "bias", None) is not None:
            self.register_parameter("bias", _new_bank((num_adaptors, *main.bias.shape), main.bias))

    def delta_weight(self, p: Tensor) -> Tensor:
        w = self._parameters["weight"]
        return (_cast(p, w) @ w.flatten(1)).view(w.shape[1:])

    def fold_weight(self, weight: Tensor, p: Tensor, alpha: float) -> Tensor:
        return _fold_vector(weight, self._parameters["weight"], p, alpha)


# ----------------------------------------------------------------------------------------------
# Parametrizations (installed with torch.nn.utils.parametrize)


class WeightFold(nn.Module):
    """``weight -> weight + alpha * delta_weight(p_layer)``. Owns (registers) the adaptor bank,
    so ``fm.model.to(...)`` moves it too."""

    def __init__(self, adaptor: Adaptor, ctx: MixtureContext, index: int, alpha: float) -> None:
        super().__init__()
        self.adaptor = adaptor
        self.ctx = ctx  # plain object, not a submodule: shared by all layers
        self.index = index
        self.alpha = alpha
        self.linear_compute = "auto"  # "auto" | "fold" | "unfold", read by linear_forward

    def forward(self, weight: Tensor) -> Tensor:
        return self.adaptor.fold_weight(weight, self.ctx.probs(self.index), self.alpha)


class BiasFold(nn.Module):
    """``bias -> bias + alpha * delta_bias(p_layer)``; refers to (does not own) the adaptor."""

    def __init__(self, adaptor: Adaptor, ctx: MixtureContext, index: int, alpha: float) -> None:
        super().__init__()
        self._adaptor_ref = [adaptor]  # list: keep it out of the module tree (no duplicate keys)
        self.ctx = ctx
        self.index = index
        self.alpha = alpha

    def forward(self, bias: Tensor) -> Tensor:
        return self._adaptor_ref[0].fold_bias(bias, self.ctx.probs(self.index), self.alpha)


def linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``forward`` of an adapted ``nn.Linear`` (set on its per-instance ``Parametrized*`` class).

    Reading the parametrized ``self.weight`` / ``self.bias`` costs several Python-level module
    calls per access, which dominates the step time of small layers (a 64-200-10 MLP at batch 8
    spends more time there than in its matmuls). The layer's own forward therefore reads the raw
    base tensors and the adaptor bank directly, and can skip building the folded weight when the
    unfolded product is cheaper (``linear_compute``). Whoever else reads ``.weight`` (attention
    blocks, tied weights, ``merge``) still goes through the parametrization and sees the adapted
    weight; both paths compute the same function.
    """
    plist = self._modules["parametrizations"]
    wlist = plist._modules["weight"]
    fold: WeightFold = wlist._modules["0"]
    blist = plist._modules.get("bias")
    bias = blist.original if blist is not None else self._parameters.get("bias")
    return fold.adaptor.linear(input, wlist.original, bias, fold.ctx, fold.index, fold.alpha,
                               fold.linear_compute)


# ----------------------------------------------------------------------------------------------
# Layer type -> (flag name, adaptor factory). Order matters: first match wins.

FACTORIES: List[Tuple[Tuple[type, ...], str, Callable[..., Adaptor]]] = [
    ((nn.Linear,), "adapt_linear", LinearAdaptor),
    ((_ConvTransposeNd,), "adapt_conv_transpose", ConvTransposeAdaptor),
    ((_ConvNd,), "adapt_conv", ConvAdaptor),
    ((nn.Embedding,), "adapt_embedding", EmbeddingAdaptor),
    (NORM_TYPES, "adapt_norm", NormAdaptor),
]


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a layer of a supported type cannot be adapted (or None)."""
    if isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is None:
        return "norm without affine parameters"
    if isinstance(module, nn.Embedding) and (module.sparse or module.max_norm is not None):
        return "embedding with sparse=True or max_norm (renormalises the weight in place)"
    w = getattr(module, "weight", None)
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet"
    return None


def find_factory(module: nn.Module, flags: Dict[str, bool]) -> Optional[Callable[..., Adaptor]]:
    for types, flag, factory in FACTORIES:
        if isinstance(module, types):
            return factory if flags[flag] else None
    return None
