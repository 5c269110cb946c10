"""Checks on client replies before anything reaches the aggregate.

A reply that fails a check is rejected (logged with its node id by the strategy) and excluded;
the round goes on with the others. Nothing here trusts the client: keys, shapes, dtypes,
finiteness, example counts and adaptor weights are all checked against what the server sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from floral_flwr.strategy.aggregate import is_adaptor_key

# A client claiming more examples than this is treated as malicious or broken.
MAX_NUM_EXAMPLES = 1e9
PRIVATE_PREFIXES = ("mixture.", "local.", "private.")


def all_finite(x: np.ndarray) -> bool:
    """True when every element of the float array ``x`` is finite.

    NaN and +-Inf propagate through x . x (Inf * 0 and Inf - Inf are NaN), so a finite dot
    product proves every element finite in one read-only BLAS pass (~2.7x faster than
    ``np.isfinite(x).all()``, which also writes and re-reads a boolean array). Only a non-finite
    result (a bad element, or values above ~1e19 whose squares overflow float32) needs the
    elementwise check."""
    flat = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.dot(flat, flat))):
            return True
    return bool(np.isfinite(x).all())


class InvalidReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


@dataclass
class TrainReply:
    """The parts of a validated train reply the aggregation needs."""

    arrays: dict[str, np.ndarray]
    num_examples: float
    adaptor_weights: np.ndarray | None
    train_loss: float
    client_id: int | None


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReply(f"metric '{name}' is {value!r}, expected a number")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidReply(f"metric '{name}' is {v}, expected a finite number")
    return v


def check_num_examples(metrics: Mapping[str, object], max_examples: float | None = None) -> float:
    """num-examples must be a finite number in (0, max_examples]."""
    if "num-examples" not in metrics:
        raise InvalidReply("metrics lack 'num-examples'")
    n = _finite_number("num-examples", metrics["num-examples"])
    limit = MAX_NUM_EXAMPLES if max_examples is None else max_examples
    if n <= 0:
        raise InvalidReply(f"num-examples = {n} is not positive")
    if n > limit:
        raise InvalidReply(f"num-examples = {n} exceeds the plausible maximum {limit:g}")
    return n


def validate_train_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, object],
    template: Mapping[str, np.ndarray],
    num_adaptors: int,
    max_examples: float | None = None,
) -> TrainReply:
    """Validate a train reply against the global state the server sent (``template``)."""
    private = [k for k in arrays if k.startswith(PRIVATE_PREFIXES)]
    if private:
        raise InvalidReply(f"reply carries private keys {private[:5]}: refusing it")
    missing = [k for k in template if k not in arrays]
    extra = [k for k in arrays if k not in template]
    if missing or extra:
        raise InvalidReply(f"array keys differ from the global state: missing {missing[:5]}, extra {extra[:5]}")
    clean: dict[str, np.ndarray] = {}
    for key, ref in template.items():
        x = np.asarray(arrays[key])
        if x.shape != ref.shape:
            raise InvalidReply(f"array '{key}' has shape {x.shape}, expected {ref.shape}")
        if x.dtype != ref.dtype:
            raise InvalidReply(f"array '{key}' has dtype {x.dtype}, expected {ref.dtype}")
        if x.dtype.kind == "f" and not all_finite(x):
            raise InvalidReply(f"array '{key}' contains NaN or Inf")
        clean[key] = x
    n = check_num_examples(metrics, max_examples)
    loss = _finite_number("train-loss", metrics.get("train-loss", float("nan")))
    weights = None
    if num_adaptors:
        raw = metrics.get("adaptor-weights")
        if not isinstance(raw, (list, tuple)) or len(raw) != num_adaptors:
            raise InvalidReply(
                f"'adaptor-weights' is {raw!r}, expected a list of {num_adaptors} numbers"
            )
        weights = np.array([_finite_number("adaptor-weights", v) for v in raw], dtype=np.float64)
        # w_k(c) = n_k p_k(c) with p_k(c) in [0, 1]: anything outside is a broken or malicious client
        if (weights < 0).any() or (weights > n * (1 + 1e-6)).any():
            raise InvalidReply(f"adaptor-weights {weights.tolist()} are outside [0, num-examples={n}]")
        if weights.sum() <= 0:
            raise InvalidReply("adaptor-weights sum to zero")
    elif any(is_adaptor_key(k) for k in template):
        raise InvalidReply("internal: adaptor keys present but num_adaptors is 0")
    cid = metrics.get("client-id")
    client_id = int(cid) if isinstance(cid, (int, float)) and not isinstance(cid, bool) else None
    return TrainReply(clean, n, weights, loss, client_id)


def validate_eval_metrics(
    metrics: Mapping[str, object], metric_name: str, num_adaptors: int
) -> dict[str, object]:
    """Validate an evaluate reply's metrics; returns a plain dict of the checked values."""
    n = check_num_examples(metrics)
    out: dict[str, object] = {"num-examples": n}
    for key in ("loss", metric_name):
        out[key] = _finite_number(key, metrics.get(key))
    for key in ("client-id", "true-cluster", "assigned-adaptor"):  # assigned: 'mean' mode's argmax
        if key in metrics:
            out[key] = int(_finite_number(key, metrics[key]))
    for key in ("holdout", "adapt-steps"):  # clients that never trained (holdout-clients)
        if key in metrics:
            out[key] = int(_finite_number(key, metrics[key]))
    for key in (f"zero-shot-{metric_name}", "zero-shot-loss"):
        if key in metrics:
            out[key] = _finite_number(key, metrics[key])
    if num_adaptors and "mixture" in metrics:
        mix = metrics["mixture"]
        if not isinstance(mix, (list, tuple)) or (
            len(mix) % num_adaptors != 0 or len(mix) == 0
        ):
            raise InvalidReply(f"'mixture' is {mix!r}, expected a multiple of {num_adaptors} numbers")
        out["mixture"] = [_finite_number("mixture", v) for v in mix]
    return out
