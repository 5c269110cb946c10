"""Robust aggregation (run config ``robust``), in numpy, composed with the p(k|c) rule.

Every mode aggregates the base with the weights n_k and adaptor c with w_k(c) = n_k p_k(c), the
weights the server has already capped (:mod:`floral_flwr.strategy.bounds`), and hands its
result to the server optimizer like the plain rule does (FedAvgM/FedAdam/FedYogi step on it):

``none``
    the weighted mean (:class:`~floral_flwr.strategy.aggregate.FloralAccumulator`). One client
    moves the base by at most its weight share times how far its arrays are from the others:
    finite but unbounded.
``clip``
    norm-bounded updates (the fixed-clipping idea): each reply's update Delta_k = x_k - g from
    the global state g is scaled down to L2 norm <= tau, separately for the base (all base
    tensors together) and for each adaptor c (slice c of every adaptor tensor), then the
    weighted mean is taken. One client then moves the base by at most its weight share times
    tau. ``clip-norm`` > 0 is tau; 0 (default) takes, per round and per part, the median of
    the replies' update norms (a minority of clients cannot raise it). Under sum-only
    aggregation the replies are n_k x_k: the same bound is applied to n_k Delta_k <= n_k tau.
``trimmed-mean``
    coordinate-wise weighted trimmed mean: per coordinate, the values of the replies sorted,
    the lowest and highest ``trim-fraction`` of the *weight* removed (n_k for the base, w_k(c)
    for adaptor c), the weighted mean of the rest (equal weights and beta*K whole clients: the
    classic trimmed mean).
``median``
    coordinate-wise weighted median (equal weights: ``np.median``). A coordinate moves only if
    clients holding half the weight move it.

``trimmed-mean`` and ``median`` need every reply's own values: they keep the round's replies in
memory (views of the received bytes) and are refused with sum-only or secure aggregation,
where the server only ever sees sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from floral_flwr.strategy.aggregate import FloralAccumulator, is_adaptor_key

ROBUST_MODES = ("none", "clip", "trimmed-mean", "median")
PER_CLIENT_MODES = ("trimmed-mean", "median")  # need per-client values (not sums)


def make_accumulator(
    template: Mapping[str, np.ndarray],
    num_adaptors: int,
    robust: str = "none",
    clip_norm: float = 0.0,
    trim_fraction: float = 0.2,
):
    """The accumulator of ``robust`` mode (same interface as :class:`FloralAccumulator`)."""
    if robust == "none":
        return FloralAccumulator(template, num_adaptors)
    if robust == "clip":
        return ClippedAccumulator(template, num_adaptors, clip_norm)
    if robust in PER_CLIENT_MODES:
        beta = 0.5 if robust == "median" else trim_fraction
        return CoordinateAccumulator(template, num_adaptors, beta)
    raise ValueError(f"robust = {robust!r} is unknown: allowed {ROBUST_MODES}")


class _Buffered:
    """Replies kept until :meth:`result` (modes that need all of a round's replies)."""

    def __init__(self, template: Mapping[str, np.ndarray], num_adaptors: int) -> None:
        self.template = dict(template)
        self.num_adaptors = int(num_adaptors)
        self.replies: list[tuple[Mapping[str, np.ndarray], float, np.ndarray, bool]] = []
        self._small: list[bool | None] = []

    def add(self, arrays: Mapping[str, np.ndarray], num_examples: float,
            adaptor_weights: Sequence[float] | None = None, presummed: bool = False,
            small: bool | None = None) -> None:
        w = (np.zeros(self.num_adaptors) if adaptor_weights is None
             else np.asarray(adaptor_weights, dtype=np.float64))
        if self.num_adaptors and w.shape != (self.num_adaptors,):
            raise ValueError(f"adaptor_weights has shape {w.shape}, expected ({self.num_adaptors},)")
        n = float(num_examples)
        if not (np.isfinite(n) and n >= 0 and np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError(f"weights must be finite and >= 0: num_examples={n}, adaptor_weights={w.tolist()}")
        self.replies.append((arrays, n, w, presummed))
        self._small.append(small)

    @property
    def num_replies(self) -> int:
        return len(self.replies)

    @property
    def adaptor_totals(self) -> np.ndarray:
        total = np.zeros(self.num_adaptors)
        for _, _, w, _ in self.replies:
            total += w
        return total

    @property
    def total_examples(self) -> float:
        return float(sum(n for _, n, _, _ in self.replies))


def _float_keys(template: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
    base = [k for k, v in template.items() if v.dtype.kind == "f" and not is_adaptor_key(k)]
    adaptor = [k for k, v in template.items() if v.dtype.kind == "f" and is_adaptor_key(k)]
    return base, adaptor


class ClippedAccumulator(_Buffered):
    """``robust = clip``: updates clipped to norm tau per part (base; adaptor c), then the
    weighted mean (the plain accumulator, so sums stay as exact as in mode ``none``)."""

    def __init__(self, template: Mapping[str, np.ndarray], num_adaptors: int, clip_norm: float = 0.0) -> None:
        super().__init__(template, num_adaptors)
        if not clip_norm >= 0:
            raise ValueError(f"clip_norm = {clip_norm!r}: allowed a number >= 0 (0 = median of the round)")
        self.clip_norm = float(clip_norm)
        self._base_keys, self._adaptor_keys = _float_keys(template)
        self.clipped = 0  # replies with at least one part scaled down (this round)
        self.norms: list[np.ndarray] = []  # per reply: [base norm, adaptor norms...]

    def _norms(self, arrays: Mapping[str, np.ndarray], n: float, w: np.ndarray, presummed: bool) -> np.ndarray:
        """Update norms ||x - g|| (presummed: ||S - n g|| / n) of the base and of each adaptor."""
        base = 0.0
        for key in self._base_keys:
            d = _delta(arrays[key], self.template[key], n if presummed else None)
            base += float(np.dot(d.reshape(-1), d.reshape(-1)))
        ad = np.zeros(self.num_adaptors)
        for key in self._adaptor_keys:
            scale = w.reshape((-1,) + (1,) * (self.template[key].ndim - 1)) if presummed else None
            d = _delta(arrays[key], self.template[key], scale).reshape(self.num_adaptors, -1)
            ad += np.einsum("ij,ij->i", d, d)
        out = np.sqrt(np.concatenate([[base], ad]))
        if presummed:  # ||S - n g|| = n ||x - g||: report the per-example update's norm
            weights = np.concatenate([[n], w])
            out = np.divide(out, weights, out=np.zeros_like(out), where=weights > 0)
        return out

    def result(self) -> dict[str, np.ndarray]:
        if not self.replies:
            raise ValueError("no replies were added")
        self.norms = [self._norms(a, n, w, p) for a, n, w, p in self.replies]
        if self.clip_norm > 0:
            tau = np.full(1 + self.num_adaptors, self.clip_norm)
        else:  # the median of the round's norms, per part (adaptors: over replies that use it)
            stack = np.stack(self.norms)
            used = np.stack([np.concatenate([[n > 0], w > 0]) for _, n, w, _ in self.replies])
            tau = np.array([np.median(stack[used[:, j], j]) if used[:, j].any() else 0.0
                            for j in range(stack.shape[1])])
        acc = FloralAccumulator(self.template, self.num_adaptors)
        self.clipped = 0
        for (arrays, n, w, presummed), norm, small in zip(self.replies, self.norms, self._small):
            factor = np.minimum(1.0, np.divide(tau, norm, out=np.ones_like(norm), where=norm > tau))
            if (factor < 1).any():
                self.clipped += 1
                arrays, small = self._scaled(arrays, n, w, presummed, factor), None  # re-checked
            acc.add(arrays, n, w, presummed=presummed, small=small)
        return acc.result()

    def _scaled(self, arrays: Mapping[str, np.ndarray], n: float, w: np.ndarray, presummed: bool,
                factor: np.ndarray) -> dict[str, np.ndarray]:
        """g + f (x - g) (presummed: n g + f (S - n g)) with f per part."""
        out = dict(arrays)
        for key in self._base_keys:
            out[key] = _shrink(arrays[key], self.template[key], factor[0], n if presummed else None)
        for key in self._adaptor_keys:
            shape = (-1,) + (1,) * (self.template[key].ndim - 1)
            out[key] = _shrink(arrays[key], self.template[key], factor[1:].reshape(shape),
                               w.reshape(shape) if presummed else None)
        return out


def _delta(x: np.ndarray, g: np.ndarray, weight) -> np.ndarray:
    """x - g (float64), or x - weight * g for presummed replies."""
    x64 = np.asarray(x, dtype=np.float64)
    g64 = np.asarray(g, dtype=np.float64)
    return x64 - g64 if weight is None else x64 - weight * g64


def _shrink(x: np.ndarray, g: np.ndarray, factor, weight) -> np.ndarray:
    g64 = np.asarray(g, dtype=np.float64)
    ref = g64 if weight is None else weight * g64
    return (ref + factor * (np.asarray(x, dtype=np.float64) - ref)).astype(x.dtype)


class CoordinateAccumulator(_Buffered):
    """``robust = trimmed-mean`` (0 <= beta < 0.5) or ``median`` (beta = 0.5): coordinate-wise,
    weighted by n_k (base) and w_k(c) (adaptor c)."""

    def __init__(self, template: Mapping[str, np.ndarray], num_adaptors: int, beta: float) -> None:
        super().__init__(template, num_adaptors)
        if not 0.0 <= beta <= 0.5:
            raise ValueError(f"trim fraction {beta!r}: allowed [0, 0.5)")
        self.beta = float(beta)

    def add(self, arrays, num_examples, adaptor_weights=None, presummed=False, small=None) -> None:  # type: ignore[override]
        if presummed:
            raise ValueError("trimmed-mean/median need each client's values; sum-only replies carry sums")
        super().add(arrays, num_examples, adaptor_weights, presummed, small)

    def result(self) -> dict[str, np.ndarray]:
        if not self.replies:
            raise ValueError("no replies were added")
        n = np.array([r[1] for r in self.replies])
        w = np.stack([r[2] for r in self.replies]) if self.num_adaptors else None
        out: dict[str, np.ndarray] = {}
        for key, old in self.template.items():
            values = np.stack([np.asarray(r[0][key]) for r in self.replies])
            if is_adaptor_key(key):
                weights = w.reshape(w.shape + (1,) * (old.ndim - 1))  # (K, C, 1, ...)
            else:
                weights = n.reshape((-1,) + (1,) * old.ndim)
            agg = weighted_coordinate(values, weights, self.beta)
            if is_adaptor_key(key):  # an adaptor no client used keeps its value
                unused = (w.sum(0) <= 0).reshape((-1,) + (1,) * (old.ndim - 1))
                agg = np.where(unused, old, agg)
            if old.dtype.kind != "f":
                agg = np.rint(agg)
            out[key] = np.asarray(agg, dtype=old.dtype).reshape(old.shape)
        return out


def weighted_coordinate(values: np.ndarray, weights: np.ndarray, beta: float) -> np.ndarray:
    """Per coordinate (axis 0 = clients): the weighted trimmed mean removing ``beta`` of the
    weight from each end (0 <= beta < 0.5), or the weighted median (beta = 0.5; a tie at
    exactly half the weight averages the two middle values, as ``np.median`` does).
    ``weights`` broadcasts against ``values``; coordinates with zero total weight give 0."""
    x = values.astype(np.float64) if values.dtype.kind != "f" else values
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, axis=0).astype(np.float64)
    ws = np.take_along_axis(np.broadcast_to(weights, x.shape), order, axis=0).astype(np.float64)
    cum = np.cumsum(ws, axis=0)
    total = cum[-1]
    if beta >= 0.5:
        half = total / 2
        tol = 1e-12 * total
        lo_idx = np.argmax(cum >= half - tol, axis=0)  # the first entry reaching half the weight
        hi_idx = np.argmax(cum > half + tol, axis=0)  # the first entry beyond half
        lo = np.take_along_axis(xs, lo_idx[None], axis=0)[0]
        hi = np.take_along_axis(xs, hi_idx[None], axis=0)[0]
        at_lo = np.take_along_axis(cum, lo_idx[None], axis=0)[0]
        tie = np.abs(at_lo - half) <= tol
        med = np.where(tie, (lo + hi) / 2, lo)
        return np.where(total > 0, med, 0.0)
    prev = cum - ws
    keep = np.clip(np.minimum(cum, (1 - beta) * total) - np.maximum(prev, beta * total), 0.0, None)
    mass = keep.sum(axis=0)
    return np.divide((keep * xs).sum(axis=0), mass, out=np.zeros_like(total), where=mass > 0)
