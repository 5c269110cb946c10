"""The FLoRAL aggregation rule, in numpy (no Flower, no torch).

For the sampled clients k with n_k training examples and mixture p_k (a distribution over the C
adaptors):

    base      <- sum_k n_k base_k / sum_k n_k                      (FedAvg, p(k))
    adaptor c <- sum_k w_k(c) adaptor_c^k / sum_k w_k(c),  w_k(c) = n_k p_k(c)   (p(k|c))

Adaptor tensors are stacked with the adaptor index as leading dimension (key prefix
``adaptor.``), so the per-adaptor weighting is one broadcast multiply per tensor. The factors
A and B are averaged separately, as in the paper's code (not their product).

The accumulator is streaming: it folds each reply in as it arrives, so server memory does not
grow with the number of replies. Per key it keeps a float32 partial sum of up to ``block``
(default 8) weighted replies, which is folded into a float64 running sum at the end of every
block: the per-reply work is the float32 weighted add a plain numpy aggregation does (one
product into a reused scratch buffer, one in-place add), and the float64 total keeps the
rounding error of a long round at the level of ``block`` float32 additions (relative ~1e-7 to
5e-7) instead of growing with the number of replies. An adaptor slice that got zero total weight
this round (no sampled client uses it) keeps its previous value.

No finite input can overflow the sums: a reply whose values or weights are too large for the
float32 block sums (|x| >= 2**64, the bound a finite ``x . x`` proves, or a weight >= 2**50) is
folded straight into the float64 totals, where a finite float32 value times a weight <= 1e9
cannot overflow. Per-adaptor weights are held relative to a power of two fixed by the first
reply that uses the adaptor (an exact rescaling, results unchanged): weights of 1e-42 (every
p_k(c) below float32's normal range at low temperature) would otherwise underflow in the float32
products and the adaptor would come out as zeros, from which it never trains again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

ADAPTOR_PREFIX = "adaptor."
# float32 block sums are safe for replies with every |x| < 2**64 and weights < 2**50:
# 2**10 replies per block (at most) * 2**50 * 2**64 = 2**124, below float32's 2**128
_SMALL_WEIGHT = 2.0**50
_SCALE_SPAN = 30  # a weight 2**30 x the adaptor's reference weight moves the reference up


def is_adaptor_key(key: str) -> bool:
    """Shared-state keys of adaptor banks (leading dimension = adaptor index)."""
    return key.startswith(ADAPTOR_PREFIX)


def _is_small(x: np.ndarray) -> bool:
    """Every element of ``x`` is finite and below 2**64 in magnitude (integers: always)."""
    if x.dtype.kind != "f" or x.size == 0:
        return True
    flat = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(np.dot(flat, flat)))  # sum x_i**2 < 2**128 => |x_i| < 2**64


class FloralAccumulator:
    """Streaming weighted sums for the FLoRAL rule.

    Parameters
    ----------
    template : Mapping[str, np.ndarray]
        The current global state. Gives the keys, shapes and dtypes every reply must have, and
        the values kept for adaptor slices that receive no weight.
    num_adaptors : int
        C, the leading dimension of every adaptor tensor (0 when the model has no adaptors).
    """

    def __init__(self, template: Mapping[str, np.ndarray], num_adaptors: int, block: int = 8) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1024:
            # <= 2**10: with |x| < 2**64 and weights < 2**50 a block sum stays below 2**124
            raise ValueError(f"block={block!r} is invalid; allowed: int in [1, 1024]")
        self.template = dict(template)
        self.num_adaptors = int(num_adaptors)
        self.block = block
        self._sums: dict[str, np.ndarray] = {}  # float64 totals of the finished blocks
        self._parts: dict[str, np.ndarray] = {}  # float32 sums of the current block
        self._in_block = 0  # replies in the current block
        self._base_weight = 0.0
        # sum_k w_k(c) * 2**-e_c, with e_c the binary exponent of the reference weight of adaptor c
        self._adaptor_weight = np.zeros(max(self.num_adaptors, 0), dtype=np.float64)
        self._adaptor_exp = np.zeros(max(self.num_adaptors, 0), dtype=np.int64)
        self._has_exp = np.zeros(max(self.num_adaptors, 0), dtype=bool)
        self.num_replies = 0
        self._bufs: dict[type, np.ndarray] = {}

    def add(
        self,
        arrays: Mapping[str, np.ndarray],
        num_examples: float,
        adaptor_weights: Sequence[float] | None = None,
        presummed: bool = False,
        small: bool | None = None,
    ) -> None:
        """Fold one client's state in. ``adaptor_weights[c]`` is w_k(c) = n_k p_k(c).

        ``presummed``: the arrays are already n_k * base_k and w_k(c) * adaptor_c^k (sum-only
        aggregation, see :func:`scale_for_sum`); they are only added up.
        ``small``: every float value is below 2**64 in magnitude (what a finite ``x . x``
        proves; :func:`floral_flwr.strategy.validation.validate_train_reply` reports it). None:
        checked here. Replies that are not small go straight into the float64 totals."""
        n = float(num_examples)
        w = (
            np.zeros(self.num_adaptors)
            if adaptor_weights is None
            else np.asarray(adaptor_weights, dtype=np.float64)
        )
        if self.num_adaptors and w.shape != (self.num_adaptors,):
            raise ValueError(f"adaptor_weights has shape {w.shape}, expected ({self.num_adaptors},)")
        if not (math.isfinite(n) and n >= 0) or not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError(f"weights must be finite and >= 0: num_examples={n}, adaptor_weights={w.tolist()}")
        if self.num_adaptors and not presummed:
            w = self._relative_weights(w)
        if small is None:
            small = all(_is_small(np.asarray(v)) for v in arrays.values())
        if not small or n >= _SMALL_WEIGHT or (w.size and float(w.max()) >= _SMALL_WEIGHT):
            self._add_wide(arrays, n, w, presummed)
            return
        first = self._in_block == 0
        for key, value in arrays.items():
            x = np.asarray(value)
            # float32 partial sums for float32/16 tensors (the wire format); float64 ones and
            # integer buffers (e.g. BatchNorm counters, not exact in float32) stay in float64
            pdtype = np.float32 if x.dtype.kind == "f" and x.itemsize <= 4 else np.float64
            if presummed and np.issubdtype(x.dtype, np.floating):
                factor = None  # integer buffers are sent unscaled (see scale_for_sum)
            elif is_adaptor_key(key):
                # w[c] * x[c, ...] for every c at once, in the partial sum's precision
                factor = w.astype(pdtype).reshape((-1,) + (1,) * (x.ndim - 1))
            else:
                factor = n  # a Python float: numpy keeps float32 for a float32 product
            part = self._parts.get(key)
            if part is None:
                part = self._parts[key] = np.empty(x.shape, dtype=pdtype)
            if first:  # the block's first reply writes straight into the partial sum
                if factor is None:
                    part[...] = x
                else:
                    np.multiply(x, factor, out=part, casting="unsafe")
            elif factor is None:
                np.add(part, x, out=part, casting="unsafe")
            else:
                # product into a reused scratch buffer, then one in-place add: no per-reply
                # temporaries (fresh large allocations page-fault on every reply)
                tmp = self._scratch(x.size, pdtype).reshape(x.shape)
                np.multiply(x, factor, out=tmp, casting="unsafe")
                np.add(part, tmp, out=part)
        self._in_block += 1
        if self._in_block == self.block:
            self._fold_block()
        self._count(n, w)

    def _count(self, n: float, w: np.ndarray) -> None:
        self._base_weight += n
        if self.num_adaptors:
            self._adaptor_weight += w
        self.num_replies += 1

    def _relative_weights(self, w: np.ndarray) -> np.ndarray:
        """w_k(c) * 2**-e_c: exact (a power of two), so the weighted means are unchanged, and
        weights as small as 1e-300 give normal float32 factors."""
        used = w > 0
        _, exps = np.frexp(w)
        new = used & ~self._has_exp
        self._adaptor_exp[new] = exps[new]
        self._has_exp |= new
        # a weight far above the reference: move the reference up so products stay finite
        # (what the old reference resolved is negligible next to it, as it should be)
        grow = used & (exps > self._adaptor_exp + _SCALE_SPAN)
        if grow.any():
            self._rescale_adaptors(grow, exps)
        return np.ldexp(w, -self._adaptor_exp)

    def _rescale_adaptors(self, which: np.ndarray, exps: np.ndarray) -> None:
        if self._in_block:
            self._fold_block()
        shift = np.where(which, self._adaptor_exp - exps, 0)
        for key, total in self._sums.items():
            if is_adaptor_key(key):
                total *= np.ldexp(1.0, shift).reshape((-1,) + (1,) * (total.ndim - 1))
        self._adaptor_weight = np.ldexp(self._adaptor_weight, shift)
        self._adaptor_exp = np.where(which, exps, self._adaptor_exp)

    def _add_wide(self, arrays: Mapping[str, np.ndarray], n: float, w: np.ndarray, presummed: bool) -> None:
        """Fold one reply into the float64 totals directly (large values or weights)."""
        for key, value in arrays.items():
            x = np.asarray(value, dtype=np.float64)
            if presummed and np.issubdtype(np.asarray(value).dtype, np.floating):
                term = x
            elif is_adaptor_key(key):
                term = x * w.reshape((-1,) + (1,) * (x.ndim - 1))
            else:
                term = x * n
            total = self._sums.get(key)
            if total is None:
                self._sums[key] = np.array(term, dtype=np.float64)  # an array (0-d too), owned
            else:
                np.add(total, term, out=total)
            if key not in self._parts:  # keep the block bookkeeping's key set complete
                pdtype = np.float32 if np.asarray(value).dtype.kind == "f" and np.asarray(value).itemsize <= 4 else np.float64
                self._parts[key] = np.zeros(np.shape(value), dtype=pdtype)
        self._count(n, w)

    def _scratch(self, size: int, dtype: type) -> np.ndarray:
        """A work buffer of at least ``size`` values per dtype, reused across keys and replies
        (memory: one buffer of the largest tensor, independent of the number of replies)."""
        buf = self._bufs.get(dtype)
        if buf is None or buf.size < size:
            buf = self._bufs[dtype] = np.empty(size, dtype=dtype)
        return buf[:size]

    def _fold_block(self) -> None:
        """Add the float32 partial sums of the current block to the float64 totals."""
        for key, part in self._parts.items():
            total = self._sums.get(key)
            if total is None:
                self._sums[key] = part.astype(np.float64)
            else:
                np.add(total, part, out=total)
        self._in_block = 0

    def result(self) -> dict[str, np.ndarray]:
        """The aggregated state, in the template's dtypes. Requires at least one reply."""
        if self.num_replies == 0:
            raise ValueError("no replies were added")
        if self._in_block:
            self._fold_block()
        self._bufs, self._parts = {}, {}  # the work buffers are not needed any more
        out: dict[str, np.ndarray] = {}
        for key, old in self.template.items():
            total = self._sums[key]
            if is_adaptor_key(key):
                wsum = self._adaptor_weight.reshape((-1,) + (1,) * (total.ndim - 1))
                safe = np.where(wsum > 0, wsum, 1.0)
                agg = np.where(wsum > 0, total / safe, old)
            else:
                agg = total / self._base_weight
            out[key] = np.asarray(agg, dtype=old.dtype).reshape(old.shape)
        return out

    @property
    def adaptor_totals(self) -> np.ndarray:
        """sum_k w_k(c) per adaptor: how much data each adaptor was trained on this round."""
        return np.ldexp(self._adaptor_weight, self._adaptor_exp)

    @property
    def total_examples(self) -> float:
        return self._base_weight


def scale_for_sum(
    arrays: Mapping[str, np.ndarray],
    num_examples: float,
    adaptor_weights: Sequence[float] | None,
) -> dict[str, np.ndarray]:
    """Client side of sum-only aggregation: ``n_k * base_k`` and ``w_k(c) * adaptor_c^k``.

    The server then needs only sums (of these arrays and of the weights) and one division per
    tensor, which is the form secure aggregation computes. Dtypes are kept (float32 on the wire).
    """
    n = float(num_examples)
    w = None if adaptor_weights is None else np.asarray(adaptor_weights, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        x = np.asarray(value)
        if not np.issubdtype(x.dtype, np.floating):
            out[key] = x  # integer buffers (e.g. BatchNorm counters) cannot be pre-scaled exactly
            continue
        if is_adaptor_key(key) and w is not None:
            scaled = x.astype(np.float64) * w.reshape((-1,) + (1,) * (x.ndim - 1))
        else:
            scaled = x.astype(np.float64) * n
        out[key] = scaled.astype(x.dtype)
    return out


def aggregate_floral(
    template: Mapping[str, np.ndarray],
    replies: Sequence[tuple[Mapping[str, np.ndarray], float, Sequence[float] | None]],
    num_adaptors: int,
) -> dict[str, np.ndarray]:
    """One-shot form of :class:`FloralAccumulator` over ``(arrays, n_k, w_k)`` triples."""
    acc = FloralAccumulator(template, num_adaptors)
    for arrays, n, w in replies:
        acc.add(arrays, n, w)
    return acc.result()
