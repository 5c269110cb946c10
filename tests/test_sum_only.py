"""Sum-only aggregation (run config ``aggregation = "sum-only"``) and misbehaving clients.

Sum-only: clients send n_k * base_k, w_k(c) * adaptor_c^k and the weights; the server only adds
up and divides once. It must give the same global model as the normal (mean) mode.
Faults: a client that sends NaN/Inf, wrong shapes/dtypes, absurd num-examples or adaptor weights,
extra or private keys (the test-only node config ``fault``) is rejected, and the global model is
exactly what it would be had that client failed outright.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Error, Message

from floral_flwr.client.faults import FAULT_KINDS, pick
from floral_flwr.inline import run_inline
from floral_flwr.results import load_npz
from floral_flwr.strategy.aggregate import FloralAccumulator, scale_for_sum

NUM_CLIENTS = 5


def _cfg(tmp_path, name, **kw):
    return {
        "task": "digits-label-shift", "num-server-rounds": 3, "eval-every": 3, "batch-size": 16,
        "output-dir": str(tmp_path), "run-name": name, "min-available-nodes": 1, "mixture-lr": 2.0,
        "aggregation": "mean", **kw,  # the plaintext modes (secagg: tests/test_secagg.py)
    }


def _final(tmp_path, name):
    meta = json.loads((tmp_path / name / "checkpoint" / "meta.json").read_text())
    return load_npz(tmp_path / name / "checkpoint" / f"state-{meta['round']:06d}.npz")


def test_scale_for_sum_then_sum_equals_weighted_mean():
    rng = np.random.default_rng(0)
    template = {"base.w": rng.normal(size=(3, 2)).astype(np.float32),
                "adaptor.l.in": rng.normal(size=(2, 4)).astype(np.float32),
                "base.count": np.array(5, dtype=np.int64)}
    replies = []
    for n in (10.0, 25.0, 7.0):
        arrays = {k: (v + rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
                  for k, v in template.items()}
        p = rng.dirichlet([1.0, 1.0])
        replies.append((arrays, n, (n * p).tolist()))
    mean, summed = FloralAccumulator(template, 2), FloralAccumulator(template, 2)
    for arrays, n, w in replies:
        mean.add(arrays, n, w)
        summed.add(scale_for_sum(arrays, n, w), n, w, presummed=True)
    a, b = mean.result(), summed.result()
    for k in template:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_sum_only_run_gives_the_same_global_model(tmp_path, optimizer):
    extra = {"server-optimizer": optimizer, "server-lr": 0.01 if optimizer == "fedadam" else 1.0}
    run_inline(_cfg(tmp_path, "mean", **extra), NUM_CLIENTS)
    _, grid = run_inline(_cfg(tmp_path, "sum", aggregation="sum-only", **extra), NUM_CLIENTS)
    a, b = _final(tmp_path, "mean"), _final(tmp_path, "sum")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # and the replies really were pre-scaled: a base tensor is ~n_k times a plain one
    train = [m for m in grid.replies_seen if m.metadata.message_type == "train"]
    n = float(train[0].content["metrics"]["num-examples"])
    key = next(k for k in a if k.startswith("base.") and a[k].dtype.kind == "f" and np.abs(a[k]).max() > 0.05)
    ratio = np.abs(train[-1].content["arrays"][key].numpy()).max() / np.abs(a[key]).max()
    assert ratio > n / 10


def test_fault_kinds_cycle_by_round():
    assert pick("nan,shape", 1) == "nan" and pick("nan,shape", 2) == "shape" and pick("nan,shape", 3) == "nan"
    with pytest.raises(ValueError, match="'fault'"):
        pick("explode", 1)


def test_misbehaving_client_is_rejected_and_the_model_is_unaffected(tmp_path, caplog):
    bad = 3
    kinds = ",".join(FAULT_KINDS[4:])  # one kind per round (the real-process test covers the rest)
    rounds = 4
    node_config = lambda k: {"fault": kinds} if k == bad else {}  # noqa: E731
    summary, grid = run_inline(_cfg(tmp_path, "faulty", **{"num-server-rounds": rounds, "eval-every": rounds}),
                               NUM_CLIENTS, node_config=node_config)
    assert summary["rejected"] == rounds
    bad_node = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == bad)
    rejected = [r for r in caplog.records if "rejected reply from node" in r.getMessage()]
    assert len(rejected) == rounds and all(str(bad_node) in r.getMessage() for r in rejected)

    def fail_bad(node, reply):  # the same client failing outright instead
        if node == bad_node and reply.metadata.message_type == "train":
            return Message(Error(code=0, reason="crashed"), reply_to=reply)
        return reply

    # (the error reply is built from the reply; only its content matters to the strategy)
    run_inline(_cfg(tmp_path, "failed", **{"num-server-rounds": rounds, "eval-every": rounds}),
               NUM_CLIENTS, reply_hook=fail_bad)
    a, b = _final(tmp_path, "faulty"), _final(tmp_path, "failed")
    for k in a:
        assert np.isfinite(a[k]).all()
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_aggregation_key_is_validated():
    from floral_flwr.config import ConfigError, parse_run_config

    assert parse_run_config({"aggregation": "sum-only"}).aggregation == "sum-only"
    with pytest.raises(ConfigError, match="'aggregation'"):
        parse_run_config({"aggregation": "secure"})
