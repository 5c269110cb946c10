"""What a client puts inside the secure-aggregation mask, and how the server reads the sum.

Numpy only (Flower is imported for its version string alone). Also the contract between the two
sides: the FitIns config keys our client reads and the tested Flower versions. Under ``aggregation = 'secagg'`` each sampled client sends one
flat float64 vector through Flower's SecAgg+ (:mod:`floral_flwr.strategy.secagg`); the server
learns only the **sum** of these vectors over the clients that completed the protocol, and that
sum is everything the FLoRAL rule needs (:mod:`floral_flwr.strategy.aggregate`):

====================  =======================================================================
segment               entries (float64; ``s`` = the public weight scale the server sends)
====================  =======================================================================
weights               ``n_k / s``, then ``w_k(c) / s`` for c = 1..C (w_k(c) = n_k p_k(c))
float tensor          ``(n_k / s) (x_k - x_g)``  (x_g = the global state the client received)
adaptor tensor        ``(w_k(c) / s) (x_k[c] - x_g[c])``  per slice c (leading dimension C)
integer buffer        ``(n_k / s) (x_k - x_g) / INT_SCALE`` (e.g. BatchNorm batch counters)
====================  =======================================================================

The server adds back the global state it sent and divides once:
``x <- x_g + S_x / S_n`` and ``adaptor c <- x_g[c] + S_c / S_w(c)``, which is the weighted mean
of the clients' states (the algebra of ``sum-only``, on deltas). Deltas, not states, go into the
mask because SecAgg+ clips every entry to a public range [-R, R] and quantizes it on
``T`` integer levels: a round's update is far smaller than the parameters, so the same levels
resolve it far more finely.

Public bounds and precision (documented in docs/privacy.md):

- ``R`` = run config ``secagg-clip``: every entry must satisfy |entry| <= R. Weights are <= 1
  because ``s`` is the largest declared train size among the sampled clients. A client whose
  update has an entry outside [-R, R] does not send it (it raises; the round goes on without it,
  as with a dropout), instead of letting SecAgg+ clip it silently.
- ``T`` = :func:`quantization_levels`: the largest power of two with ``N * T < 2**32`` (Flower's
  modulus), capped at 2**30 (Flower quantizes into int32). Step ``delta = 2 R / T``.
- Stochastic rounding is unbiased; per client and entry the error is below ``delta``. A decoded
  base entry is off by at most ``N delta / S_n`` (typically ``sqrt(N) delta / (2 S_n)``), an
  adaptor slice by at most ``N delta / S_w(c)``. :func:`precision` computes these numbers.
- An adaptor slice whose summed weight is at most ``MIN_WEIGHT_FACTOR * N * delta`` is not
  updated this round (its quantization error would exceed 1/1024 of a unit); 'mean' would move
  it with that tiny weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from floral_flwr.config import ConfigError
from floral_flwr.strategy.aggregate import is_adaptor_key

MODULUS = 2**32  # Flower's SecAgg+ default (and documented maximum) modulus range
MAX_LEVELS = 2**30  # Flower quantizes into int32: levels + 1 must fit
INT_SCALE = 2.0**16  # integer buffers enter the mask divided by this (|delta| <= R * INT_SCALE)
MIN_WEIGHT_FACTOR = 1024.0


SUPPORTED_FLOWER = ("1.41.", "1.42.")  # versions whose SecAgg+ workflow/mod this was tested with

# keys of the FitIns config our client side reads (besides the strategy's own config)
PURPOSE_KEY = "floral-purpose"  # "train" or "tally"
KEYS_KEY = "floral-keys"  # the shared-state keys, "\n"-joined, in the order of the tensors
SCALE_KEY = "floral-weight-scale"  # s: weights enter the mask as n_k / s and w_k(c) / s
CLUSTERS_KEY = "floral-num-clusters"  # tally: K (true clusters) x C (adaptors)
ADAPTORS_KEY = "floral-num-adaptors"


def flower_version() -> str:
    import flwr  # only here: the payload arithmetic needs no Flower

    return str(flwr.__version__)


def check_flower_version(version: str | None = None) -> None:
    """Refuse Flower versions whose SecAgg+ internals were not tested (one message, the key)."""
    version = flower_version() if version is None else version
    if not version.startswith(SUPPORTED_FLOWER):
        raise ConfigError(
            f"run config 'aggregation' = 'secagg' drives Flower's SecAgg+ workflow and mod, tested "
            f"with flwr {' / '.join(v + 'x' for v in SUPPORTED_FLOWER)}; installed flwr is {version}. "
            f"Install a tested version (pip install 'flwr[simulation]>=1.41,<1.43') or set "
            f"aggregation 'mean' (reveals n_k p_k to the server) or 'sum-only'"
        )


class ClipRangeError(ValueError):
    """An entry of this client's masked vector lies outside [-secagg-clip, secagg-clip]."""


def quantization_levels(num_clients: int, modulus: int = MODULUS) -> int:
    """T: the largest power of two with ``num_clients * T < modulus``, at most ``MAX_LEVELS``."""
    if num_clients < 1:
        raise ValueError(f"num_clients = {num_clients}: need at least 1")
    levels = 1 << ((modulus - 1) // num_clients).bit_length() - 1
    return int(min(levels, MAX_LEVELS))


@dataclass(frozen=True)
class Precision:
    """The public numbers of one secure round (see the module docstring)."""

    clip: float
    levels: int
    step: float  # delta = 2 R / T
    min_weight: float  # summed weights at or below this are treated as zero

    def worst_error(self, num_clients: int, weight_sum: float) -> float:
        """Hard bound on the error of a decoded entry with summed weight ``weight_sum``."""
        return num_clients * self.step / weight_sum


def precision(clip: float, num_clients: int) -> Precision:
    levels = quantization_levels(num_clients)
    step = 2.0 * clip / levels
    return Precision(clip, levels, step, MIN_WEIGHT_FACTOR * num_clients * step)


# ------------------------------------------------------------------------------- layout


def payload_size(template: Mapping[str, np.ndarray], num_adaptors: int) -> int:
    """Length of a train payload for this global state."""
    return 1 + num_adaptors + int(sum(np.asarray(v).size for v in template.values()))


def encode_train(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    num_examples: float,
    adaptor_weights: Sequence[float] | None,
    num_adaptors: int,
    weight_scale: float,
) -> np.ndarray:
    """Client side: the flat vector this client masks (keys in the order of ``received``)."""
    if weight_scale <= 0:
        raise ValueError(f"weight scale {weight_scale!r} must be > 0")
    n = float(num_examples) / weight_scale
    w = np.zeros(num_adaptors) if adaptor_weights is None else np.asarray(adaptor_weights, np.float64)
    if w.shape != (num_adaptors,):
        raise ValueError(f"adaptor weights have shape {w.shape}, expected ({num_adaptors},)")
    w = w / weight_scale
    out = np.empty(payload_size(received, num_adaptors), dtype=np.float64)
    out[0] = n
    out[1 : 1 + num_adaptors] = w
    pos = 1 + num_adaptors
    for key, g in received.items():
        g = np.asarray(g)
        x = np.asarray(trained[key])
        if x.shape != g.shape:
            raise ValueError(f"'{key}' has shape {x.shape}, the global state {g.shape}")
        seg = out[pos : pos + g.size].reshape(g.shape)
        np.subtract(x, g, out=seg, casting="unsafe")
        if g.dtype.kind != "f":
            seg *= n / INT_SCALE
        elif is_adaptor_key(key):
            seg *= w.reshape((-1,) + (1,) * (g.ndim - 1))
        else:
            seg *= n
        pos += g.size
    return out


def check_clip(payload: np.ndarray, clip: float) -> None:
    """Raise :class:`ClipRangeError` (naming the run-config key) when an entry is outside
    [-clip, clip]; SecAgg+ would otherwise clip it silently and bias the sum."""
    worst = float(np.max(np.abs(payload))) if payload.size else 0.0
    if not np.isfinite(worst) or worst > clip:
        raise ClipRangeError(
            f"run config 'secagg-clip' = {clip:g}: this client's masked update has an entry of "
            f"magnitude {worst:.4g} outside [-{clip:g}, {clip:g}], so it is not sent (the round "
            f"goes on without it); allowed: every entry of the weighted update within "
            f"+-secagg-clip: raise 'secagg-clip' (costs precision) or lower 'lr'"
        )


@dataclass
class DecodedSum:
    """The global state read off a secure sum, plus the summed weights (in examples)."""

    arrays: dict[str, np.ndarray]
    total_examples: float
    adaptor_totals: np.ndarray
    frozen_adaptors: list[int]  # slices kept because their summed weight was ~0


def decode_train(
    total: np.ndarray,
    received: Mapping[str, np.ndarray],
    num_adaptors: int,
    weight_scale: float,
    prec: Precision,
) -> DecodedSum:
    """Server side: the new global state from the sum of the clients' payloads."""
    if total.shape != (payload_size(received, num_adaptors),):
        raise ValueError(f"secure sum has shape {total.shape}, expected ({payload_size(received, num_adaptors)},)")
    s_n = float(total[0])
    s_w = np.asarray(total[1 : 1 + num_adaptors], dtype=np.float64)
    if not s_n > prec.min_weight:
        raise ValueError(f"secure sum of the weights is {s_n:.3g}: no client's update is in it")
    live = s_w > prec.min_weight
    out: dict[str, np.ndarray] = {}
    pos = 1 + num_adaptors
    for key, g in received.items():
        g = np.asarray(g)
        seg = total[pos : pos + g.size].reshape(g.shape)
        pos += g.size
        if g.dtype.kind != "f":
            new = g + np.rint(seg * (INT_SCALE / s_n))
        elif is_adaptor_key(key):
            shape = (-1,) + (1,) * (g.ndim - 1)
            div = np.where(live, s_w, 1.0).reshape(shape)
            new = np.where(live.reshape(shape), g + seg / div, g)
        else:
            new = g + seg / s_n
        out[key] = np.asarray(new, dtype=g.dtype)
    frozen = [int(c) for c in np.flatnonzero(~live)]
    return DecodedSum(out, s_n * weight_scale, np.where(live, s_w, 0.0) * weight_scale, frozen)


# ------------------------------------------------------------------------------- tally


def encode_tally(true_cluster: int, assigned: int, num_clusters: int, num_adaptors: int) -> np.ndarray:
    """One-hot(true cluster) x one-hot(assigned adaptor), flattened; zeros when either is
    unknown (< 0): the client then adds nothing to the contingency table."""
    out = np.zeros(num_clusters * num_adaptors, dtype=np.float64)
    if 0 <= true_cluster < num_clusters and 0 <= assigned < num_adaptors:
        out[true_cluster * num_adaptors + assigned] = 1.0
    return out


def decode_tally(total: np.ndarray, num_clusters: int, num_adaptors: int) -> np.ndarray:
    """The summed contingency table (true cluster x assigned adaptor) as integer counts."""
    if total.shape != (num_clusters * num_adaptors,):
        raise ValueError(f"tally sum has shape {total.shape}, expected ({num_clusters * num_adaptors},)")
    return np.rint(total).astype(np.int64).reshape(num_clusters, num_adaptors)


def ari_from_table(table: np.ndarray) -> float | None:
    """Adjusted Rand index of the clustering given by a contingency table (None when it is
    undefined: fewer than two clients or a single true cluster)."""
    table = np.asarray(table, dtype=np.int64)
    n = int(table.sum())
    if n < 2 or int((table.sum(1) > 0).sum()) < 2:
        return None

    def pairs(x: np.ndarray) -> float:
        x = x.astype(np.float64)
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    best = (rows + cols) / 2
    if best == expected:
        return 1.0
    return (index - expected) / (best - expected)
