"""What Flower's server optimizers leave on the strategy, made safe to keep between rounds.

FedAdam / FedYogi / FedAdagrad keep their moments in ``m_t`` / ``v_t`` (dicts of arrays) and
FedAvgM its ``momentum_vector`` (a list of arrays): :func:`optimizer_state` flattens them into
the named arrays of the run checkpoint and :func:`load_optimizer_state` puts them back on resume.
They also compute in numpy and can promote float32/int64 entries to float64: :class:`DtypePin`
casts the global state back to the dtypes it had in round 1 (the model's own, which clients
answer in).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

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
