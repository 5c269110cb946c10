"""Rank selection for FLoRAL adaptors.

Follows ``resolve_rank`` of the official code (zeligism/FLoRAL, ``floral/floral/utils.py``) with
three documented tightenings:

* an absolute integer rank is clipped to the full rank ``min(d_in, d_out)`` (a larger rank adds
  parameters but no expressiveness; the official code does not clip);
* a float is always a relative budget rho in (0, 1] -- ``1.0`` means rho = 1, not rank 1
  (``int`` 1 is rank 1);
* for grouped convolutions the rank is rounded *up* to a multiple of ``groups`` (the hidden
  channels of the two stacked convolutions must split into ``groups`` groups).

Rules (``m = min(d_in, d_out)``):

=============  ===========================================================
``int r >= 1``  ``min(r, m)``
``float rho``   ``max(min_rank, int(rho * d_in * d_out / (d_in + d_out)))``
``"sqrt"``      ``max(min_rank, int(sqrt(m)))``
``"log"``       ``max(min_rank, int(log2(m)))``
``"full"``      ``m``
=============  ===========================================================

All results are finally clipped to ``m`` (so ``min_rank`` never exceeds full rank), then rounded
up to a multiple of ``groups``.
"""
from __future__ import annotations

import math
import numbers
from typing import Union

RankSpec = Union[int, float, str]
RANK_STRINGS = ("sqrt", "log", "full")


def validate_rank(rank: RankSpec) -> RankSpec:
    """Normalise a rank spec (numeric strings such as ``"4"``/``"0.1"`` are parsed) or raise."""
    allowed = "an int >= 1, a float rho in (0, 1], or one of 'sqrt', 'log', 'full'"
    if isinstance(rank, bool):
        raise ValueError(f"rank={rank!r} is invalid; allowed: {allowed}")
    if isinstance(rank, str):
        if rank in RANK_STRINGS:
            return rank
        try:
            rank = int(rank) if rank.strip().lstrip("+-").isdigit() else float(rank)
        except ValueError:
            raise ValueError(f"rank={rank!r} is invalid; allowed: {allowed}") from None
    if isinstance(rank, numbers.Integral):
        if int(rank) < 1:
            raise ValueError(f"rank={rank!r} is invalid; allowed: {allowed}")
        return int(rank)
    if isinstance(rank, numbers.Real):
        rank = float(rank)
        if not (0.0 < rank <= 1.0) or math.isnan(rank):
            raise ValueError(f"rank={rank!r} (rho) is outside (0, 1]; allowed: {allowed}")
        return rank
    raise ValueError(f"rank={rank!r} is invalid; allowed: {allowed}")


def resolve_rank(rank: RankSpec, d_in: int, d_out: int, min_rank: int = 1, groups: int = 1) -> int:
    """Rank of one adaptor for a layer with input dim ``d_in`` and output dim ``d_out``.

    For convolutions ``d_in = C_in * |k_in|`` and ``d_out = C_out * |k_out|`` with the split
    kernels of the chosen conv method (as in the official code).
    """
    rank = validate_rank(rank)
    full = max(1, min(d_in, d_out))
    if isinstance(rank, int):
        r = rank
    elif isinstance(rank, float):
        r = max(min_rank, int(rank * d_in * d_out / (d_in + d_out)))
    elif rank == "sqrt":
        r = max(min_rank, int(math.sqrt(full)))
    elif rank == "log":
        r = max(min_rank, int(math.log2(full)))
    else:  # "full"
        r = full
    r = max(1, min(r, full))
    if groups > 1:
        r = -(-r // groups) * groups  # round up: hidden channels must split into groups
    return r
