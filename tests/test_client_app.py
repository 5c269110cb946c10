"""ClientApp unit tests without Ray: messages in, replies out, private state kept private."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from floral_flwr.client import make_client_app
from floral_flwr.client.state_store import StateDir
from floral_flwr.config import parse_run_config
from floral_flwr.inline import InlineGrid  # sets Flower's task identity for message building
from floral_flwr.methods import build_handle
from floral_flwr.tasks import get_task

# the plaintext wire ('mean' replies, reported mixtures); the secure one: tests/test_secagg.py
RUN = {"task": "digits-label-shift", "num-adaptors": 4, "batch-size": 16, "persist-client-state": False,
       "aggregation": "mean", "report-mixtures": True}
NUM_CLIENTS = 8


def _initial_arrays(run=RUN) -> ArrayRecord:
    cfg = parse_run_config(run)
    handle = build_handle(cfg, get_task(cfg.task, num_clients=NUM_CLIENTS, seed=cfg.seed).build_model)
    return ArrayRecord({k: Array(v.detach().numpy()) for k, v in handle.shared_state_dict().items()})


def _message(kind: str, rnd: int, arrays: ArrayRecord | None = None, extra: dict | None = None) -> Message:
    InlineGrid(make_client_app(), 0)  # task identity for building messages outside Flower
    content = RecordDict({"config": ConfigRecord({"server-round": rnd, **(extra or {})})})
    if arrays is not None:
        content["arrays"] = arrays
    mtype = {"train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE, "query": MessageType.QUERY}[kind]
    return Message(content, dst_node_id=42, message_type=mtype)


def _context(pid: int = 1, **node) -> Context:
    return Context(run_id=1, node_id=42, node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS, **node},
                   state=RecordDict(), run_config={})


def test_train_reply_has_shared_state_and_weights_but_no_mixture():
    app = make_client_app(RUN)
    arrays = _initial_arrays()
    reply = app(_message("train", 1, arrays), _context())
    assert not reply.has_error()
    out = reply.content["arrays"]
    assert list(out.keys()) == list(arrays.keys())
    assert not any(k.startswith(("mixture", "local")) for k in out.keys())
    m = reply.content["metrics"]
    n = get_task("digits-label-shift", num_clients=NUM_CLIENTS, seed=0).client_data(1).num_train
    assert m["num-examples"] == n and m["client-id"] == 1
    w = np.array(m["adaptor-weights"])
    assert w.shape == (4,) and (w >= 0).all() and w.sum() == pytest.approx(n, rel=1e-5)
    # the base really trained
    assert any(not np.allclose(out[k].numpy(), arrays[k].numpy()) for k in out.keys() if k.startswith("base."))


def test_mixture_persists_in_context_state_across_rounds():
    app = make_client_app({**RUN, "mixture-lr": 5.0})
    ctx = _context()
    arrays = _initial_arrays()
    app(_message("train", 1, arrays), ctx)
    assert "floral.private" in ctx.state.array_records
    logits1 = ctx.state.array_records["floral.private"]["mixture.logits"].numpy()
    assert not np.allclose(logits1, 0)  # learned something
    r2 = app(_message("train", 2, arrays), ctx)
    # round 2 starts from round 1's mixture: its eval-mode weights differ from uniform
    w2 = np.array(r2.content["metrics"]["adaptor-weights"])
    assert not np.allclose(w2, w2.mean())
    logits2 = ctx.state.array_records["floral.private"]["mixture.logits"].numpy()
    assert not np.allclose(logits1, logits2)
    # a fresh context (another client, same process/cache) starts from uniform logits again
    other = _context(pid=2)
    app(_message("train", 1, arrays), other)
    assert not np.allclose(other.state.array_records["floral.private"]["mixture.logits"].numpy(), logits2)


def test_state_dir_survives_a_restart_and_corrupt_files_start_fresh(tmp_path, caplog):
    app = make_client_app({**RUN, "mixture-lr": 5.0})
    arrays = _initial_arrays()
    ctx = _context(**{"state-dir": str(tmp_path)})
    app(_message("train", 1, arrays), ctx)
    saved = ctx.state.array_records["floral.private"]["mixture.logits"].numpy()
    files = list((tmp_path / "floral-flwr" / "default" / "client-1").glob("round-*.npz"))
    assert len(files) == 1
    # restart: empty context.state, same state dir -> evaluation uses the learned mixture
    restarted = _context(**{"state-dir": str(tmp_path)})
    ev = app(_message("evaluate", 1, arrays), restarted)
    p = np.array(ev.content["metrics"]["mixture"])
    expected = torch.softmax(torch.from_numpy(saved), -1).numpy()
    np.testing.assert_allclose(p, expected, rtol=1e-5)
    # corrupt the file: the client warns and starts from the uniform mixture
    files[0].write_bytes(files[0].read_bytes()[:50])
    ev = app(_message("evaluate", 1, arrays), _context(**{"state-dir": str(tmp_path)}))
    np.testing.assert_allclose(ev.content["metrics"]["mixture"], [0.25] * 4, rtol=1e-6)
    assert "unreadable" in caplog.text


def test_state_store_rejects_tampered_and_foreign_files(tmp_path, caplog):
    store = StateDir(tmp_path, kind="A")
    store.save({"mixture.logits": torch.tensor([1.0, 2.0])}, 3)
    assert store.load(before_round=4).round == 3
    assert store.load(before_round=3) is None  # only states saved before the asked round
    assert store.load(before_round=4, after_round=2).round == 3
    assert store.load(before_round=4, after_round=3) is None  # not newer than the caller's copy
    assert StateDir(tmp_path, kind="B").load() is None
    assert "belongs to" in caplog.text
    # flip array bytes but keep the zip valid: the checksum catches it
    import io

    path = next(tmp_path.glob("round-*.npz"))
    with np.load(path) as z:
        header = bytes(z["__header__"]).decode()
    buf = io.BytesIO()
    np.savez(buf, __header__=np.frombuffer(header.encode(), dtype=np.uint8),
             **{"mixture.logits": np.array([9.0, 9.0], np.float32)})
    path.write_bytes(buf.getvalue())
    assert store.load() is None
    assert "checksum" in caplog.text


def test_evaluate_reports_personalized_metrics_and_true_cluster():
    app = make_client_app(RUN)
    reply = app(_message("evaluate", 1, _initial_arrays()), _context(pid=5))
    m = reply.content["metrics"]
    assert m["client-id"] == 5 and m["true-cluster"] == 5 % 4
    assert 0.0 <= m["accuracy"] <= 1.0 and m["num-examples"] > 0
    np.testing.assert_allclose(m["mixture"], [0.25] * 4, rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["mean", "secagg"])
def test_evaluate_sends_no_mixture_unless_reported(aggregation):
    run = {**RUN, "aggregation": aggregation, "report-mixtures": False}
    ctx = _context(pid=5)
    m = make_client_app(run)(_message("evaluate", 1, _initial_arrays()), ctx).content["metrics"]
    assert "mixture" not in m and m["client-id"] == 5
    # 'mean' reveals n_k p_k anyway, so its ARI uses the plaintext argmax; secagg keeps it local
    assert ("assigned-adaptor" in m) == (aggregation == "mean")
    assert ctx.state.config_records["floral.eval"]["round"] == 1  # for the secure tally


def test_oracle_mixture_is_one_hot_at_the_true_cluster_and_stays_fixed():
    run = {**RUN, "method": "floral-oracle"}
    app = make_client_app(run)
    arrays = _initial_arrays(run)
    ctx = _context(pid=6)
    reply = app(_message("train", 1, arrays), ctx)
    w = np.array(reply.content["metrics"]["adaptor-weights"])
    n = reply.content["metrics"]["num-examples"]
    np.testing.assert_allclose(w, n * np.eye(4)[6 % 4], atol=1e-6)
    ev = app(_message("evaluate", 1, arrays), ctx)
    np.testing.assert_allclose(ev.content["metrics"]["mixture"], np.eye(4)[2], atol=1e-6)


def test_query_reports_identity_and_size():
    reply = make_client_app(RUN)(_message("query", 0), _context(pid=3))
    m = reply.content["metrics"]
    assert m["client-id"] == 3 and m["num-train-examples"] > 0 and m["true-cluster"] == 3


def test_fedavg_client_has_no_adaptors_and_no_private_state():
    run = {**RUN, "method": "fedavg"}
    app = make_client_app(run)
    ctx = _context()
    reply = app(_message("train", 1, _initial_arrays(run)), ctx)
    assert all(k.startswith("base.") for k in reply.content["arrays"].keys())
    assert "adaptor-weights" not in reply.content["metrics"]
    assert "floral.private" not in ctx.state.array_records


def test_missing_partition_id_is_a_clear_error():
    app = make_client_app(RUN)
    ctx = Context(run_id=1, node_id=42, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="partition-id"):
        app(_message("query", 0), ctx)
