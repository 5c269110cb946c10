"""The FLoRAL aggregation rule, in numpy (no Flower, no torch).

For the sampled clients k with n_k training examples and mixture p_k (a distribution over the C
adaptors):

    base      <- sum_k n_k base_k / sum_k n_k                      (FedAvg, p(k))
    adaptor c <- sum_k w_k(c) adaptor_c^k / sum_k w_k(c),  w_k(c) = n_k p_k(c)   (p(k|c))

Adaptor tensors are stacked with the adaptor index as leading dimension (key prefix
``adaptor.``), so the per-adaptor weighting is one broadcast multiply per tensor. The factors
A and B are averaged separately, as in the paper's code (not their product).

The accumulator is streaming: it keeps one float64 running sum per key and folds each reply in as
it arrives, so server memory does not grow with the number of replies. An adaptor slice that got
zero total weight this round (no sampled client uses it) keeps its previous value.
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

    def __init__(self, template: Mapping[str, np.ndarray], num_adaptors: int) -> None:
        self.template = dict(template)
        self.num_adaptors = int(num_adaptors)
        self._sums: dict[str, np.ndarray] = {}
        self._base_weight = 0.0
        self._adaptor_weight = np.zeros(max(self.num_adaptors, 0), dtype=np.float64)
        self.num_replies = 0

    def add(
        self,
        arrays: Mapping[str, np.ndarray],
        num_examples: float,
        adaptor_weights: Sequence[float] | None = None,
    ) -> None:
        """Fold one client's state in. ``adaptor_weights[c]`` is w_k(c) = n_k p_k(c)."""
        n = float(num_examples)
        w = (
            np.zeros(self.num_adaptors)
            if adaptor_weights is None
            else np.asarray(adaptor_weights, dtype=np.float64)
        )
        if self.num_adaptors and w.shape != (self.num_adaptors,):
            raise ValueError(f"adaptor_weights has shape {w.shape}, expected ({self.num_adaptors},)")
        for key, value in arrays.items():
            x = np.asarray(value)
            if is_adaptor_key(key):
                # w[c] * x[c, ...] for every c at once
                contrib = x * w.reshape((-1,) + (1,) * (x.ndim - 1))
            else:
                contrib = x * n
            acc = self._sums.get(key)
            if acc is None:
                self._sums[key] = contrib.astype(np.float64, copy=True)
            else:
                acc += contrib
        self._base_weight += n
        if self.num_adaptors:
            self._adaptor_weight += w
        self.num_replies += 1

    def result(self) -> dict[str, np.ndarray]:
        """The aggregated state, in the template's dtypes. Requires at least one reply."""
        if self.num_replies == 0:
            raise ValueError("no replies were added")
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
