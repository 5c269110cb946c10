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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ADAPTOR_PREFIX = "adaptor."


def is_adaptor_key(key: str) -> bool:
    """Shared-state keys of adaptor banks (leading dimension = adaptor index)."""
    return key.startswith(ADAPTOR_PREFIX)


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
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block={block!r} is invalid; allowed: int >= 1")
        self.template = dict(template)
        self.num_adaptors = int(num_adaptors)
        self.block = block
        self._sums: dict[str, np.ndarray] = {}  # float64 totals of the finished blocks
        self._parts: dict[str, np.ndarray] = {}  # float32 sums of the current block
        self._in_block = 0  # replies in the current block
        self._base_weight = 0.0
        self._adaptor_weight = np.zeros(max(self.num_adaptors, 0), dtype=np.float64)
        self.num_replies = 0
        self._bufs: dict[type, np.ndarray] = {}

    def add(
        self,
        arrays: Mapping[str, np.ndarray],
        num_examples: float,
        adaptor_weights: Sequence[float] | None = None,
        presummed: bool = False,
    ) -> None:
        """Fold one client's state in. ``adaptor_weights[c]`` is w_k(c) = n_k p_k(c).

        ``presummed``: the arrays are already n_k * base_k and w_k(c) * adaptor_c^k (sum-only
        aggregation, see :func:`scale_for_sum`); they are only added up."""
        n = float(num_examples)
        w = (
            np.zeros(self.num_adaptors)
            if adaptor_weights is None
            else np.asarray(adaptor_weights, dtype=np.float64)
        )
        if self.num_adaptors and w.shape != (self.num_adaptors,):
            raise ValueError(f"adaptor_weights has shape {w.shape}, expected ({self.num_adaptors},)")
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
        self._base_weight += n
        if self.num_adaptors:
            self._adaptor_weight += w
        self.num_replies += 1

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
        return self._adaptor_weight.copy()

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
