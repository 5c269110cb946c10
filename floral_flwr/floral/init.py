"""How the C adaptors of a layer start (``Floral(adaptor_init=...)``).

Every kind starts with ``in`` ~ uniform_in (Kaiming-uniform) and ``out`` = 0, so the low-rank
product ``B_c A_c`` is 0 for every c. What differs is the per-adaptor bias bank:

* ``"zero"``: bias_c = 0. Wrapping changes nothing, but at the start the C adaptors are
  *identical* functions (all zero): the mixture logits get no gradient (d loss / d theta_c is
  proportional to ``p_c (delta_c - sum_j p_j delta_j)``, and every delta_c is 0) and every client
  trains every adaptor the same way, so only the mixture noise can break the tie.
* ``"official"``: bias_c ~ U(-1/sqrt(f), 1/sqrt(f)), f = the fan-in of the official code's
  ``layer_out`` (PyTorch's default bias init of that layer: f = r for a linear adaptor). The
  adaptors differ from the start, but wrapping moves the model by ``alpha * mean_c bias_c``.
* ``"centered"``: the ``"official"`` draw minus its mean over c, so ``sum_c bias_c = 0``: the
  adaptors differ from the start (the mixture gets a gradient at the first step), and at the
  initial uniform mixture ``sum_c p_c bias_c = 0``: wrapping changes nothing. With C = 1 this is
  ``"zero"``.

Norm adaptors stay at zero for every choice (the official norm adaptors start at zero too).
"""
from __future__ import annotations

import math

import torch

from .adaptors import Adaptor, ConvAdaptor, ConvTransposeAdaptor, LinearAdaptor

ADAPTOR_INITS = ("zero", "official", "centered")


def bias_fan_in(adaptor: Adaptor) -> int:
    """Fan-in of the official ``layer_out`` whose default init the random bias follows."""
    if isinstance(adaptor, LinearAdaptor):
        return int(adaptor.rank)
    out = adaptor.bank("out")
    if isinstance(adaptor, ConvAdaptor):  # (C, C_out, r/g, *k_out): conv fan-in = r/g * |k_out|
        return int(math.prod(out.shape[2:]))
    if isinstance(adaptor, ConvTransposeAdaptor):  # (C, r, C_out/g, *k_out): PyTorch's rule
        return int(math.prod(out.shape[2:]))
    raise TypeError(f"{type(adaptor).__name__} has no random bias init")


@torch.no_grad()
def init_adaptor_(adaptor: Adaptor, how: str) -> None:
    """Re-initialise the bias bank of a freshly built ``adaptor`` (see the module doc)."""
    if how not in ADAPTOR_INITS:
        raise ValueError(f"adaptor_init={how!r} is invalid; allowed: {ADAPTOR_INITS}")
    bias = adaptor.bank("bias")
    if how == "zero" or bias is None or adaptor.kind.startswith("norm"):
        return
    bound = 1.0 / math.sqrt(bias_fan_in(adaptor))
    bias.uniform_(-bound, bound)
    if how == "centered":
        bias.sub_(bias.mean(dim=0, keepdim=True))
