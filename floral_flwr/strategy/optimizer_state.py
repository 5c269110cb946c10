"""What Flower's server optimizers leave on the strategy, made safe to keep between rounds.

FedAdam / FedYogi / FedAdagrad keep their moments in ``m_t`` / ``v_t`` (dicts of arrays) and
FedAvgM its ``momentum_vector`` (a list of arrays): :func:`optimizer_state` flattens them into
the named arrays of the run checkpoint and :func:`load_optimizer_state` puts them back on resume.
They also compute in numpy and can promote float32/int64 entries to float64: :class:`DtypePin`
casts the global state back to the dtypes it had in round 1 (the model's own, which clients
answer in).

An adaptor (ensemble/IFCA model) slice that received no weight this round has no data behind
it: the aggregate keeps its value, but momentum and adaptive moments would still move it
(FedAdam moved an unused adaptor 1.0 -> 1.9 -> 2.71). :func:`hold_unused_slices` puts such
slices, and their moments, back as they were before the step (:func:`snapshot_moments`).

Integer entries (BatchNorm's ``num_batches_tracked``) are counters, not parameters: a server
step of size ``server-lr`` on them rounds back to where they were (FedAdam at 0.001 kept every
counter at 0), so :func:`counters_from_aggregate` gives them the plain aggregate's value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from floral_flwr.strategy.aggregate import is_adaptor_key
from floral_flwr.strategy.validation import all_finite
from floral_flwr.wire import from_array, to_array

MOMENT_NAMES = ("m_t", "v_t")
MOMENTUM_VECTOR = "momentum_vector"


def optimizer_state(strategy: Any) -> dict[str, np.ndarray]:
    """Server-optimizer state of ``strategy`` as flat numpy arrays (safe to store with np.savez)."""
    out: dict[str, np.ndarray] = {}
    for name in MOMENT_NAMES:
        d = getattr(strategy, name, None)
        if d:
            out.update({f"{name}/{k}": np.asarray(v) for k, v in d.items()})
    mv = getattr(strategy, MOMENTUM_VECTOR, None)
    if mv is not None:
        out.update({f"{MOMENTUM_VECTOR}/{i:06d}": np.asarray(v) for i, v in enumerate(mv)})
    return out


def load_optimizer_state(strategy: Any, state: dict[str, np.ndarray]) -> None:
    """Inverse of :func:`optimizer_state`: set the moments found in ``state`` on ``strategy``."""
    for name in MOMENT_NAMES:
        d = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
        if d:
            setattr(strategy, name, d)
    mv = sorted((k, v) for k, v in state.items() if k.startswith(MOMENTUM_VECTOR + "/"))
    if mv:
        setattr(strategy, MOMENTUM_VECTOR, [v for _, v in mv])


class DtypePin:
    """Casts a global state to the dtypes of the first one it saw (the model's own dtypes)."""

    def __init__(self) -> None:
        self.dtypes: dict[str, np.dtype] | None = None

    def __call__(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.dtypes is None:
            self.dtypes = {k: from_array(a).dtype for k, a in arrays.items()}
            return arrays
        if all(a.dtype == str(self.dtypes.get(k)) for k, a in arrays.items()):
            return arrays
        return ArrayRecord(
            {k: to_array(np.asarray(from_array(a), dtype=self.dtypes.get(k))) for k, a in arrays.items()}
        )


def _adopted(strategy: Any, record: ArrayRecord) -> ArrayRecord:
    """``record`` as the new global state, also where FedAvgM keeps its own copy of it (it
    steps from ``current_arrays`` next round)."""
    if isinstance(getattr(strategy, "current_arrays", None), ArrayRecord):
        strategy.current_arrays = record
    return record


def snapshot_moments(strategy: Any) -> dict[str, Any] | None:
    """Copies of the server optimizer's moments before a step (None without a stateful one)."""
    if not any(hasattr(strategy, n) for n in (*MOMENT_NAMES, MOMENTUM_VECTOR)):
        return None
    state: dict[str, Any] = {}
    for name in MOMENT_NAMES:
        d = getattr(strategy, name, None)
        if d:
            state[name] = {k: np.array(v, copy=True) for k, v in d.items()}
    mv = getattr(strategy, MOMENTUM_VECTOR, None)
    if mv is not None:
        state[MOMENTUM_VECTOR] = [np.array(v, copy=True) for v in mv]
    return state


def hold_unused_slices(strategy: Any, before: dict[str, Any] | None, old: ArrayRecord, new: ArrayRecord,
                       adaptor_totals: list[float]) -> ArrayRecord:
    """``new`` with every adaptor slice c of zero total weight this round set back to its value
    in ``old``, and the optimizer's moments of those slices set back to ``before``."""
    totals = np.asarray(adaptor_totals, dtype=np.float64)
    if before is None or totals.size == 0 or (totals > 0).all():
        return new
    unused = np.flatnonzero(totals <= 0)
    keys = list(new.keys())
    out = {}
    for k in keys:
        x = from_array(new[k])
        if is_adaptor_key(k) and x.ndim and x.shape[0] == totals.size:
            x = np.array(x, copy=True)
            x[unused] = from_array(old[k])[unused]
        out[k] = x
    for name in MOMENT_NAMES:
        now, prev = getattr(strategy, name, None), (before or {}).get(name)
        if now:
            for k, v in now.items():
                if is_adaptor_key(k) and np.ndim(v) and np.shape(v)[0] == totals.size:
                    v = np.array(v, copy=True)
                    v[unused] = prev[k][unused] if prev and k in prev else 0.0
                    now[k] = v
    mv = getattr(strategy, MOMENTUM_VECTOR, None)
    if mv is not None:
        prev_mv = (before or {}).get(MOMENTUM_VECTOR)
        for i, k in enumerate(keys):
            if i < len(mv) and is_adaptor_key(k) and np.ndim(mv[i]) and np.shape(mv[i])[0] == totals.size:
                v = np.array(mv[i], copy=True)
                v[unused] = prev_mv[i][unused] if prev_mv is not None else 0.0
                mv[i] = v
    record = ArrayRecord({k: to_array(v) for k, v in out.items()})
    return _adopted(strategy, record)


def integer_entries(arrays: ArrayRecord) -> dict[str, Array]:
    """The integer and bool entries of ``arrays`` (counters), kept aside before a server step
    (FedAvgM clears the record it steps on)."""
    return {k: a for k, a in arrays.items() if from_array(a).dtype.kind in "iub"}


def counters_from_aggregate(strategy: Any, new: ArrayRecord, counters: dict[str, Array] | None) -> ArrayRecord:
    """``new`` (after the server optimizer's step) with every integer or bool entry set to its
    value in the plain aggregate (``counters``, from :func:`integer_entries`)."""
    counters = {k: a for k, a in (counters or {}).items() if k in new}
    if not counters or all(new[k] is a for k, a in counters.items()):
        return new
    record = ArrayRecord({k: counters.get(k, a) for k, a in new.items()})
    return _adopted(strategy, record)


def non_finite_keys(arrays: Any) -> list[str]:
    """Keys of float arrays with NaN/Inf in a state (an ArrayRecord or a dict of arrays)."""
    bad = []
    for k, v in arrays.items():
        x = from_array(v) if not isinstance(v, np.ndarray) else v
        if x.dtype.kind == "f" and not all_finite(x):  # one BLAS pass per array in the common case
            bad.append(k)
    return bad
