"""TEST-ONLY fault injection: a SuperNode that deliberately sends bad train replies.

Enabled by the hidden node-config key ``fault`` (``--node-config 'fault="nan,shape"'``), used by
the deployment fault tests (``tests/test_deploy_e2e.py``) to check, with real processes, that the
server rejects and logs such replies and that the global model is unaffected. Never set it on a
real node. A comma list cycles by round: round r uses kind ``kinds[(r - 1) % len(kinds)]``.

Kinds: ``nan``, ``inf`` (a non-finite value), ``shape`` (a wrong shape), ``dtype`` (float64),
``examples`` (absurd num-examples), ``weights`` (adaptor weights > num-examples),
``extra-key`` (an array the global state lacks), ``private-key`` (a ``mixture.logits`` array).

Under ``aggregation='secagg'`` single replies are masked, so these kinds do not apply; the hidden
node-config key ``secagg-drop-at`` = a SecAgg+ stage (``setup``, ``share_keys``,
``collect_masked_vectors``, ``unmask``) makes the node fail at that stage of every secure exchange
instead (a dropout, handled in :mod:`floral_flwr.client.secure`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

FAULT_KINDS = ("nan", "inf", "shape", "dtype", "examples", "weights", "extra-key", "private-key")


def pick(spec: str, server_round: int) -> str:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"node config 'fault' = {spec!r}: unknown kind(s) {unknown}; allowed {FAULT_KINDS}")
    return kinds[(server_round - 1) % len(kinds)]


def inject_fault(spec: str, content: RecordDict, server_round: int) -> RecordDict:
    """Return a corrupted copy of a train reply's content."""
    kind = pick(spec, server_round)
    arrays = {k: np.array(a.numpy(), copy=True) for k, a in content["arrays"].items()}
    metrics = dict(content["metrics"])
    first = next(k for k, a in arrays.items() if a.dtype.kind == "f")
    if kind == "nan":
        arrays[first].flat[0] = np.nan
    elif kind == "inf":
        arrays[first].flat[0] = np.inf
    elif kind == "shape":
        arrays[first] = np.zeros(arrays[first].shape + (2,), dtype=arrays[first].dtype)
    elif kind == "dtype":
        arrays[first] = arrays[first].astype(np.float64)
    elif kind == "examples":
        metrics["num-examples"] = 10**12
    elif kind == "weights":
        w = metrics.get("adaptor-weights") or [1.0]
        metrics["adaptor-weights"] = [1e9 for _ in w]
    elif kind == "extra-key":
        arrays["base.injected"] = np.ones(3, dtype=np.float32)
    elif kind == "private-key":
        arrays["mixture.logits"] = np.zeros(4, dtype=np.float32)
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics),
    })
