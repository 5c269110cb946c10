"""aggregation='secagg' end to end, in-process (the inline engine runs Flower's SecAgg+ stages).

- Everything the server receives: every record (arrays, metrics, configs, and the .npy bytes
  inside configs) of every reply, for every message type, is searched for each client's real
  mixture p_k (from its saved private state), for n_k p_k and for the logits, in every window of
  every numeric vector; none may be found under secagg. The same search finds them where they are
  sent ('mean' train replies, report-mixtures), so it is not blind.
- secagg gives the 'mean' global model within the documented quantization error.
- Dropouts in a later stage and a client outside the clipping range: the round completes with
  the others; the result equals 'mean' over the clients that contributed.
- Bad input stops the run before round 1 with the key named.
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid

import floral_flwr.strategy.masked_sum as masked_sum
from floral_flwr.client import make_client_app
from floral_flwr.client import secure as client_secure
from floral_flwr.config import ConfigError
from floral_flwr.inline import InlineGrid, run_inline
from floral_flwr.results import load_npz
from floral_flwr.rundir import RunFailed
from floral_flwr.server import run_server

NUM_CLIENTS = 4


def _cfg(tmp_path, name, **kw):
    return {"task": "digits-label-shift", "num-server-rounds": 2, "eval-every": 2, "batch-size": 32,
            "mixture-lr": 2.0, "output-dir": str(tmp_path), "run-name": name, "min-available-nodes": 1, **kw}


def _final(tmp_path, name, rnd=None):
    meta = json.loads((tmp_path / name / "checkpoint" / "meta.json").read_text())
    return load_npz(tmp_path / name / "checkpoint" / f"state-{(rnd or meta['round']):06d}.npz")


# ----------------------------------------------------------------------------- the leak search


def _vectors(msg: Message):
    """Every numeric vector in a reply: arrays, number lists, the scalars of each record taken
    together, and .npy payloads carried as bytes in config records (SecAgg+'s masked vectors)."""
    c = msg.content
    for rec in c.array_records.values():
        for a in rec.values():
            try:
                yield np.asarray(a.numpy(), dtype=float).ravel()
            except Exception:  # noqa: BLE001 - e.g. Flower's empty placeholder array
                continue
    for rec in list(c.metric_records.values()) + list(c.config_records.values()):
        scalars = []
        for val in rec.values():
            items = val if isinstance(val, list) else [val]
            nums = [float(x) for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if isinstance(val, list) and nums:
                yield np.asarray(nums)
            elif nums:
                scalars.extend(nums)
            for x in items:
                if isinstance(x, bytes) and x[:6] == b"\x93NUMPY":
                    yield np.load(io.BytesIO(x), allow_pickle=False).astype(float).ravel()
        if scalars:
            yield np.asarray(scalars)


def _private_mixtures(run_dir) -> dict[int, list[tuple[np.ndarray, np.ndarray | None]]]:
    """client id -> [(p, logits or None)] for every saved round of its private state."""
    out: dict[int, list] = {}
    for f in glob.glob(f"{run_dir}/**/client-*/round-*.npz", recursive=True):
        cid = int(os.path.basename(os.path.dirname(f)).split("-")[1])
        with np.load(f, allow_pickle=False) as z:
            for k in z.files:
                v = z[k].astype(float)
                if k == "mixture.logits":
                    e = np.exp(v - v.max(-1, keepdims=True))
                    p = (e / e.sum(-1, keepdims=True)).reshape(-1, v.shape[-1]).mean(0)
                    out.setdefault(cid, []).append((p, v.ravel()))
                elif k == "fedem.pi":
                    out.setdefault(cid, []).append((v / v.sum(), None))
                elif k == "ifca.cluster" and v >= 0:
                    out.setdefault(cid, []).append((int(v), None))
    return out


def _leaks(caught, run_dir, num_adaptors) -> dict[str, int]:
    """message type -> number of vectors in which some client's p_k (normalised window), or its
    logits, were found."""
    private = _private_mixtures(run_dir)
    node_client = {}
    for node, r in caught:
        if not r.has_error():
            for rec in r.content.metric_records.values():
                if "client-id" in rec:
                    node_client[node] = int(rec["client-id"])
    found: dict[str, int] = {}
    for node, r in caught:
        if r.has_error() or node not in node_client:
            continue
        targets = []
        for p, logits in private.get(node_client[node], []):
            if isinstance(p, int):  # IFCA: the choice, as a one-hot mixture
                p = np.eye(num_adaptors)[p]
            targets.append((p, logits))
        for v in _vectors(r):
            if v.size < num_adaptors or not np.all(np.isfinite(v)):
                continue
            win = np.lib.stride_tricks.sliding_window_view(v, num_adaptors)
            sums = win.sum(1, keepdims=True)
            pos = sums[:, 0] > 0
            q = win[pos] / sums[pos]
            hit = False
            for p, logits in targets:
                if len(q) and (np.abs(q - p).max(1) < 1e-4).any():
                    hit = True
                if logits is not None and logits.size <= v.size:
                    lw = np.lib.stride_tricks.sliding_window_view(v, logits.size)
                    hit |= bool((np.abs(lw - logits).max(1) < 1e-6).any())
            if hit:
                t = r.metadata.message_type
                found[t] = found.get(t, 0) + 1
    return found


def _run_and_catch(tmp_path, name, clients=NUM_CLIENTS, **kw):
    caught = []

    def hook(node, reply):
        caught.append((node, reply))
        return reply

    summary, grid = run_inline(_cfg(tmp_path, name, **kw), clients, reply_hook=hook)
    return summary, caught


@pytest.mark.parametrize("method", ["floral", "ensemble", "ifca", "fedem"])
def test_the_server_receives_no_mixture_under_secagg(tmp_path, method):
    extra = {"export-models": True} if method == "floral" else {}
    summary, caught = _run_and_catch(tmp_path, method, method=method, **extra)
    kinds = {r.metadata.message_type for _, r in caught}
    assert {"train", "evaluate", "query"} <= kinds
    assert {_stage_of(r) for _, r in caught} >= {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert _private_mixtures(tmp_path / method), "no private state to recover from"
    assert _leaks(caught, tmp_path / method, 4) == {}
    assert summary["final"]["accuracy-mean"] > 0


@pytest.mark.parametrize("mode", ["mean", "sum-only"])
def test_the_search_finds_the_mixture_where_it_is_sent(tmp_path, mode):
    """'mean' and 'sum-only' reveal n_k p_k in every train reply; report-mixtures reveals p_k in
    evaluation (under secagg too)."""
    _, caught = _run_and_catch(tmp_path, mode, aggregation=mode)
    found = _leaks(caught, tmp_path / mode, 4)
    assert found.get("train", 0) >= NUM_CLIENTS * 2 and "evaluate" not in found
    if mode == "sum-only":
        return
    _, caught = _run_and_catch(tmp_path, "report", **{"report-mixtures": True})
    found = _leaks(caught, tmp_path / "report", 4)
    assert found.get("evaluate", 0) >= NUM_CLIENTS and "train" not in found


# ----------------------------------------------------------------------------- same model as mean


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_secagg_gives_the_mean_global_model(tmp_path, optimizer):
    extra = {"server-optimizer": optimizer, "server-lr": 0.01 if optimizer == "fedadam" else 1.0,
             "num-server-rounds": 3}
    run_inline(_cfg(tmp_path, "mean", aggregation="mean", **extra), NUM_CLIENTS)
    summary, _ = run_inline(_cfg(tmp_path, "secure", **extra), NUM_CLIENTS)
    a, b = _final(tmp_path, "mean"), _final(tmp_path, "secure")
    prec = masked_sum.precision(8.0, NUM_CLIENTS)
    for k in a:
        # three rounds of the per-round bound (N delta / S_n, S_n ~ N) plus float32 rounding
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=30 * prec.step + 1e-6, err_msg=k)
    assert not all(np.array_equal(a[k], b[k]) for k in a), "secagg must not have run the plaintext path"
    assert summary["failures"] == 0


def test_secure_ari_is_the_plaintext_ari(tmp_path):
    mean, _ = run_inline(_cfg(tmp_path, "mean", aggregation="mean"), NUM_CLIENTS)
    secure, _ = run_inline(_cfg(tmp_path, "secure"), NUM_CLIENTS)
    assert "cluster-ari" in secure["final"]
    assert secure["final"]["cluster-ari"] == pytest.approx(mean["final"]["cluster-ari"])
    # no per-client mixture was stored anywhere on the server's side
    header = (tmp_path / "secure" / "clients.csv").read_text().splitlines()[0]
    assert "p0" not in header.split(",")


# ----------------------------------------------------------------------------- dropouts


def _stage_of(reply: Message) -> str:
    rec = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if rec is None:
        return ""
    keys = set(rec.keys())
    if {"masked_params"} & keys:
        return "collect_masked_vectors"
    if {"nids", "shares"} <= keys:
        return "unmask"
    if {"pk1", "pk2"} <= keys:
        return "setup"
    return "share_keys"


def _drop(victim: int, stage: str):
    """A reply hook losing ``victim``'s reply in ``stage`` (the node looks dead from then on)."""
    def hook(node, reply):
        return None if node == victim and _stage_of(reply) == stage else reply

    return hook


def _fail_train_of(victim: int):
    def hook(node, reply):
        if node == victim and reply.metadata.message_type == "train":
            return Message(Error(code=0, reason="dropped"), reply_to=reply)
        return reply

    return hook


@pytest.mark.parametrize("stage", ["collect_masked_vectors", "unmask"])
def test_a_dropout_in_a_later_stage_is_survived(tmp_path, stage):
    victim = 1000 + 7919 * 2  # the inline engine's node id of client 2
    one = {"num-server-rounds": 1, "eval-every": 1}
    summary, grid = run_inline(_cfg(tmp_path, "secure", **one), NUM_CLIENTS, reply_hook=_drop(victim, stage))
    # the same round in plaintext: the victim trains in both, its update counts only where it was
    # in the secure sum (a dropout after sending its masked vector is still in it)
    hook = _fail_train_of(victim) if stage == "collect_masked_vectors" else None
    run_inline(_cfg(tmp_path, "mean", aggregation="mean", **one), NUM_CLIENTS, reply_hook=hook)
    a, b = _final(tmp_path, "mean"), _final(tmp_path, "secure")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    rows = (tmp_path / "secure" / "rounds.csv").read_text().splitlines()
    head, row = rows[0].split(","), rows[1].split(",")
    received = int(row[head.index("received")])
    assert received == (NUM_CLIENTS - 1 if stage == "collect_masked_vectors" else NUM_CLIENTS)
    assert summary["failures"] == NUM_CLIENTS - received


def test_a_client_outside_the_clipping_range_is_dropped_with_the_key_named(tmp_path, monkeypatch):
    """Clients 5 and 6 of 8 produce a vector outside [-secagg-clip, secagg-clip]: they do not send
    it (SecAgg+ would clip it silently), the round completes with the other six, and the result
    is the 'mean' of those six."""
    real = client_secure.secure_train
    bad = {1000 + 7919 * 5, 1000 + 7919 * 6}

    def oversized(msg, context, run_config):
        vector, plain = real(msg, context, run_config)
        return (vector * 1e4 if plain["client-id"] in (5, 6) else vector), plain

    monkeypatch.setattr(client_secure, "secure_train", oversized)
    caught = []

    def hook(node, reply):
        caught.append(reply)
        return reply

    one = {"num-server-rounds": 1, "eval-every": 1}
    summary, _ = run_inline(_cfg(tmp_path, "clip", **one), 8, reply_hook=hook)
    errors = [r.error.reason for r in caught if r.has_error()]
    assert len(errors) == 2 and all("'secagg-clip' = 8" in e and "outside [-8, 8]" in e for e in errors)
    assert summary["failures"] == 2
    run_inline(_cfg(tmp_path, "mean", aggregation="mean", **one), 8,
               reply_hook=lambda node, r: _fail_train_of(node)(node, r) if node in bad else r)
    a, b = _final(tmp_path, "mean"), _final(tmp_path, "clip")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- bad input


class _DeploymentLikeGrid(Grid):
    """An in-process grid that is neither the simulation's nor the inline one (like HttpGrid)."""

    def __init__(self, inner: InlineGrid) -> None:
        self.inner = inner

    def set_run(self, run_id):  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        return self.inner.create_message(*a, **k)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return self.inner.send_and_receive(messages, timeout=timeout)


def _train_replies(grid: InlineGrid) -> list[Message]:
    return [r for r in grid.replies_seen if r.metadata.message_type == "train"]


@pytest.mark.parametrize("extra, fragment", [
    ({"fraction-train": 0.25}, "'aggregation' = 'secagg' needs at least 2 clients per round"),
    ({"secagg-num-shares": 5}, "'secagg-num-shares' = 5 exceeds the 4 clients"),
])
def test_too_few_clients_stop_before_round_1(tmp_path, extra, fragment):
    cfg = _cfg(tmp_path, "few", **extra)
    grid = InlineGrid(make_client_app(cfg), NUM_CLIENTS)
    with pytest.raises(ConfigError, match=fragment):
        run_server(grid, cfg)
    assert not grid.replies_seen  # not even discovery: stopped before round 1
    assert not (tmp_path / "few").exists()  # and before the run directory


def test_untested_flower_version_stops_before_round_1(tmp_path, monkeypatch):
    monkeypatch.setattr(masked_sum, "flower_version", lambda: "1.43.0")
    cfg = _cfg(tmp_path, "version")
    grid = InlineGrid(make_client_app(cfg), NUM_CLIENTS)
    with pytest.raises(ConfigError, match=r"'aggregation' = 'secagg' .* installed flwr is 1\.43\.0"):
        run_server(grid, cfg)
    assert not grid.replies_seen


def test_report_mixtures_in_deployment_needs_the_acknowledgement(tmp_path):
    # reply-poll 0: the grid below has only send_and_receive (the exchange's push/pull is tested elsewhere)
    cfg = _cfg(tmp_path, "deploy", **{"report-mixtures": True, "num-server-rounds": 1, "eval-every": 1,
                                      "reply-poll": 0})
    inner = InlineGrid(make_client_app(cfg), NUM_CLIENTS)
    with pytest.raises(ConfigError, match="'report-mixtures-acknowledged'"):
        run_server(_DeploymentLikeGrid(inner), cfg)
    assert not inner.replies_seen
    ack = {**cfg, "report-mixtures-acknowledged": True, "run-name": "deploy-ack"}
    inner = InlineGrid(make_client_app(ack), NUM_CLIENTS)
    run_server(_DeploymentLikeGrid(inner), ack)
    header = (tmp_path / "deploy-ack" / "clients.csv").read_text().splitlines()[0]
    assert "p0" in header.split(",")


def test_a_secagg_client_refuses_a_plaintext_train_request(tmp_path):
    cfg = _cfg(tmp_path, "refuse", **{"num-server-rounds": 1, "eval-every": 1})
    grid = InlineGrid(make_client_app(cfg), NUM_CLIENTS)  # the clients run with the default: secagg
    with pytest.raises(RunFailed, match="'aggregation' = 'secagg'"):  # nothing trained: the run stops
        run_server(grid, {**cfg, "aggregation": "mean"})  # a server asking for plaintext
    train = _train_replies(grid)
    assert len(train) == NUM_CLIENTS and all(r.has_error() for r in train)
    assert all("'aggregation' = 'secagg'" in r.error.reason for r in train)



def test_secure_stages_use_the_short_push_pull_when_a_reply_poll_is_set(monkeypatch):
    """Each SecAgg+ stage goes out through ``exchange`` (push, then pull every ``reply-poll`` s),
    not Flower's ``send_and_receive`` with its fixed 3 s poll; ``poll = 0`` keeps Flower's call."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from floral_flwr.strategy.secagg import SecureSum, _MeteredGrid

    class SilentGrid:  # records the calls; no node ever answers
        def __init__(self):
            self.calls = []

        def push_messages(self, messages):
            self.calls.append("push")
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.calls.append("pull")
            return []

        def send_and_receive(self, messages, *, timeout=None):
            self.calls.append("send_and_receive")
            return []

    def stage():
        return [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
                for n in (1, 2)]

    from floral_flwr.strategy import exchange as exchange_module

    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("run_id", "node_id", "task_id"):  # a Message needs a task identity, as in the runtimes
        monkeypatch.setattr(TaskIdentity, f"_{attr}", 1, raising=False)
    monkeypatch.setattr(exchange_module, "_packed", list)  # packing is not the point here
    slow, fast = SilentGrid(), SilentGrid()
    out = SecureSum(sampled=[1, 2])
    assert _MeteredGrid(slow, out, poll=0.0).send_and_receive(stage(), timeout=5) == []
    assert slow.calls == ["send_and_receive"]
    assert list(_MeteredGrid(fast, out, poll=0.01).send_and_receive(stage(), timeout=0.3)) == []
    assert fast.calls[0] == "push" and "pull" in fast.calls and "send_and_receive" not in fast.calls
    assert out.silent  # both nodes are recorded as silent in that stage
