"""The warm runtime for SuperNodes (floral_flwr/deploy/warm_executor.py, node_waits.py,
flwr_pins.py) and the server's faster exchange (floral_flwr/strategy/exchange.py, packed arrays
in floral_flwr/wire.py), without a federation: version pins, settings, the adaptive waits, the
packed wire format and the push/pull loop. The real deployment is in test_deploy_e2e.py."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from floral_flwr.deploy import Deployment, DeployError, flwr_pins, node_waits, warm_executor
from floral_flwr.deploy.settings import NodeRuntime
from floral_flwr.inline import InlineGrid
from floral_flwr.strategy.exchange import exchange
from floral_flwr.wire import (PACKED_KEY, from_array, is_packed, pack_content, pack_record, packed_arrays_mod,
                              to_array, unpack_content, unpack_record)

# ----------------------------------------------------------------------------- version pins


def test_supported_flwr_versions_are_pinned_and_the_installed_one_is_among_them():
    assert flwr_pins.flwr_version_problem("1.42.0") is None
    assert flwr_pins.flwr_version_problem("1.41.3") is None
    problem = flwr_pins.flwr_version_problem("1.43.0")
    assert "1.43.0" in problem and "--executor flower" in problem and "1.41.x" in problem
    assert flwr_pins.flwr_version_problem("2.0.0") is not None
    # the installed flwr is one the internals were checked against (fails on an unchecked upgrade)
    assert flwr_pins.flwr_version_problem() is None, flwr_pins.installed_flwr_version()


def test_the_install_requirement_admits_exactly_the_pinned_flwr_versions():
    """pip must not resolve a flwr that every default run (``aggregation = secagg``) and the
    warm executor refuse at start: pyproject's flwr range, the warm runtime's pins and the
    SecAgg+ pins name the same minor versions."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    from floral_flwr.strategy.masked_sum import SUPPORTED_FLOWER

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (flwr_req,) = [r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "flwr"]
    assert tuple(v.rstrip(".") for v in SUPPORTED_FLOWER) == flwr_pins.SUPPORTED_FLWR
    for minor in flwr_pins.SUPPORTED_FLWR:
        assert flwr_req.specifier.contains(f"{minor}.0") and flwr_req.specifier.contains(f"{minor}.9")
    major, last = map(int, flwr_pins.SUPPORTED_FLWR[-1].split("."))
    first_major, first = map(int, flwr_pins.SUPPORTED_FLWR[0].split("."))
    for outside in (f"{major}.{last + 1}.0", f"{major + 1}.0.0", f"{first_major}.{first - 1}.0"):
        assert not flwr_req.specifier.contains(outside), (str(flwr_req.specifier), outside)


def test_an_unsupported_flwr_is_refused_before_anything_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(flwr_pins, "installed_flwr_version", lambda: "9.9.0")
    with pytest.raises(DeployError, match="flwr 9.9.0 is installed.*--executor flower"):
        with Deployment(tmp_path / "w", num_supernodes=2):
            pass
    assert not (tmp_path / "w" / "pids").exists()  # nothing was started
    NodeRuntime(executor="flower", node_poll=0).check()  # Flower's own processes need no pin
    with pytest.raises(DeployError, match="9.9.0"):
        NodeRuntime(executor="flower", node_poll=0.2).check()  # the short waits do
    for main in (warm_executor.main, node_waits.main):  # the scripts check it themselves too
        args = ["--runtime-api-address", "127.0.0.1:1"] if main is warm_executor.main else ["--node-poll", "0.2"]
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == flwr_pins.EXIT_BAD_VERSION
        assert "flwr 9.9.0 is installed" in capsys.readouterr().err


def test_node_runtime_settings_are_checked_with_the_flag_named():
    with pytest.raises(DeployError, match="--executor 'fast'"):
        NodeRuntime(executor="fast").check()
    with pytest.raises(DeployError, match="--node-poll 5"):
        NodeRuntime(node_poll=5).check()
    with pytest.raises(DeployError, match="--task-poll 0.001"):
        NodeRuntime(task_poll=0.001).check()
    NodeRuntime().check()


# ----------------------------------------------------------------------------- SuperNode waits


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_adaptive_waits_are_short_only_while_a_round_is_on():
    t = FakeTime()
    waits = node_waits.AdaptiveWaits(poll=0.2, hot_window=10.0, clock=t.clock, sleep=t.sleep)
    waits.sleep(3)  # idle from the start: Flower's 3 s
    assert t.slept == [3]
    waits.sleep(0.5)  # waiting for a ClientApp's reply: the node is busy, local poll is short
    assert t.slept[-1] == pytest.approx(0.05)
    waits.sleep(3)  # right after a message: the next one is due soon
    assert t.slept[-1] == 0.2
    t.now += 10.0  # no message for the whole hot window: back to Flower's wait
    waits.sleep(3)
    assert t.slept[-1] == 3
    waits.sleep(1.7)  # any other wait is left alone
    assert t.slept[-1] == 1.7
    assert waits.monotonic is time.monotonic  # the rest of the time module is untouched


def test_dropping_an_app_forgets_its_modules_and_path(tmp_path, monkeypatch):
    app = tmp_path / "apps" / "pub.app.1.0.0.abcd1234"
    (app / "pkg_for_drop_test").mkdir(parents=True)
    (app / "pkg_for_drop_test" / "__init__.py").write_text("VALUE = 1\n")
    (app / "pkg_for_drop_test" / "sub.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(app))
    import pkg_for_drop_test.sub  # noqa: F401

    assert {"pkg_for_drop_test", "pkg_for_drop_test.sub"} <= set(warm_executor._modules_under(app))
    warm_executor._drop_app(app)
    assert "pkg_for_drop_test" not in sys.modules and "pkg_for_drop_test.sub" not in sys.modules
    assert str(app) not in sys.path
    assert "numpy" in sys.modules  # modules elsewhere stay


def test_the_installed_app_dir_is_found_by_the_fab_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    d = tmp_path / "apps" / "floral-flwr.floral-flwr.0.1.0.0123abcd"
    d.mkdir(parents=True)
    assert warm_executor._installed_app_dir("0123abcd" + "f" * 56) is None  # no pyproject: not installed
    (d / "pyproject.toml").write_text("[project]\n")
    assert warm_executor._installed_app_dir("0123abcd" + "f" * 56) == d
    assert warm_executor._installed_app_dir("ffffffff" + "0" * 56) is None


def _fake_app(tmp_path, name: str, warm_up_body: str):
    app = tmp_path / "apps" / f"pub.{name}.1.0.0.abcd1234"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "1.0.0"\n'
        f'[tool.flwr.app]\npublisher = "pub"\n[tool.flwr.app.components]\nclientapp = "{name}:app"\nserverapp = "{name}:app"\n')
    (app / f"{name}.py").write_text(
        "from flwr.clientapp import ClientApp\napp = ClientApp()\nCALLS = []\n"
        f"def warm_up():\n    {warm_up_body}\n")
    return app


def test_the_warm_parent_runs_the_apps_warm_up_once_and_survives_a_failing_one(tmp_path, capsys):
    app = _fake_app(tmp_path, "warm_app_ok", "CALLS.append(1)")
    try:
        warm_executor._import_client_app(app)
        assert sys.modules["warm_app_ok"].CALLS == [1]  # done in this (the parent) process
        assert "ran the app's warm_up()" in capsys.readouterr().out
    finally:
        warm_executor._drop_app(app)
    for name, body, shown in (("warm_app_bad", "raise RuntimeError('no data here')", "RuntimeError('no data here')"),
                              ("warm_app_exit", "raise SystemExit(3)", "SystemExit(3)")):
        bad = _fake_app(tmp_path, name, body)
        try:
            assert warm_executor._import_client_app(bad) is sys.modules[name].app
            assert f"warm_up() failed ({shown})" in capsys.readouterr().out
        finally:
            warm_executor._drop_app(bad)


def test_this_apps_warm_up_decodes_the_embedded_digits_for_the_children():
    import client_app
    from floral_flwr.tasks import digits

    digits._DIGITS.clear()
    client_app.warm_up()
    assert "xy" in digits._DIGITS and digits._DIGITS["xy"][0].shape == (1797, 8, 8)


# ----------------------------------------------------------------------------- packed arrays


@pytest.fixture
def task_identity():
    """Flower builds messages only inside a runtime that set the task identity (as InlineGrid does)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _record(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({
        "w": to_array(rng.standard_normal((3, 4)).astype(np.float32)),
        "b": to_array(rng.standard_normal(4).astype(np.float32)),
        "n": to_array(np.arange(5, dtype=np.int64)),
        "empty": to_array(np.zeros((0, 2), np.float64)),
        "scalar": to_array(np.array(2.5, np.float32)),
        "flag": to_array(np.array([True, False])),
    })


def test_packing_a_record_is_one_array_and_unpacks_bit_for_bit():
    rec = _record()
    packed = pack_record(rec)
    assert list(packed.keys()) == [PACKED_KEY] and is_packed(packed)
    back = unpack_record(packed)
    assert list(back.keys()) == list(rec.keys())
    for k in rec:  # the very .npy bytes Flower would have carried, so every count stays equal
        assert back[k].data == rec[k].data and back[k].shape == rec[k].shape and back[k].dtype == rec[k].dtype
    single = ArrayRecord({"only": to_array(np.ones(3, np.float32))})
    assert pack_record(single) is single  # nothing to gain
    assert unpack_record(rec) is rec  # not packed: untouched
    content = RecordDict({"arrays": rec, "config": ConfigRecord({"server-round": 3})})
    assert list(unpack_content(pack_content(content))["arrays"].keys()) == list(rec.keys())
    assert pack_content(content)["config"]["server-round"] == 3


def _packed_with(buf: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: to_array(np.frombuffer(buf, np.uint8))})


def _frame(layout: str, payload: bytes) -> bytes:
    head = layout.encode()
    return len(head).to_bytes(8, "little") + head + payload


@pytest.mark.parametrize("buf,match", [
    (_frame('[["a", "<f4", [2]]]', b"\0" * 4), "runs past the end"),
    (_frame('[["a", "<f4", [1]]]', b"\0" * 8), "bytes left after"),
    (_frame('[["a", "|O", [1]]]', b"\0" * 8), "not numeric"),
    (_frame('{"a": 1}', b""), "bad layout entry"),
    (_frame('[["a", "<f4", [-1]]]', b""), "bad layout entry"),
    (_frame("not json", b""), "not JSON"),
    ((10**6).to_bytes(8, "little") + b"[]", "longer than the buffer"),
])
def test_malformed_packed_records_are_refused(buf, match):
    with pytest.raises(ValueError, match=match):
        unpack_record(_packed_with(buf))


def test_the_client_mod_unpacks_for_the_handler_and_packs_the_reply(task_identity):
    rec = _record()
    seen = {}

    def handler(msg: Message, _ctx) -> Message:
        seen["keys"] = list(msg.content["arrays"].keys())
        doubled = {k: to_array(np.asarray(from_array(a)) * 2) for k, a in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(doubled), "metrics": MetricRecord({"x": 1.0})}),
                       reply_to=msg)

    incoming = Message(pack_content(RecordDict({"arrays": rec})), dst_node_id=5, message_type="train")
    incoming.metadata.__dict__["_message_id"] = "m1"
    reply = packed_arrays_mod(incoming, None, handler)
    assert seen["keys"] == list(rec.keys())  # the handler saw the usual record
    assert is_packed(reply.content["arrays"]) and reply.metadata.reply_to_message_id == "m1"
    back = unpack_record(reply.content["arrays"])
    np.testing.assert_array_equal(from_array(back["w"]), 2 * from_array(rec["w"]))
    plain = Message(RecordDict({"arrays": rec}), dst_node_id=5, message_type="train")
    plain.metadata.__dict__["_message_id"] = "m2"
    out = packed_arrays_mod(plain, None, handler)  # an unpacked message: untouched both ways
    assert not is_packed(out.content["arrays"])


# ----------------------------------------------------------------------------- push/pull exchange


class FakeGrid:
    """push_messages / pull_messages only; node n answers after ``delays[n]`` pulls (None: never)."""

    def __init__(self, delays: dict[int, int | None]) -> None:
        self.delays = delays
        self.pushed: list[Message] = []
        self.pulls = 0
        self._due: dict[str, tuple[int, Message]] = {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"id{len(self.pushed)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed.append(msg)
            node = msg.metadata.dst_node_id
            if self.delays[node] is not None:
                content = msg.content  # what the client would receive: packed arrays
                arrays = unpack_record(content["arrays"])
                reply = Message(pack_content(RecordDict({"arrays": arrays, "metrics": MetricRecord({"n": node})})),
                                reply_to=msg)
                self._due[mid] = (self.delays[node], reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = [r for mid, (d, r) in list(self._due.items()) if mid in set(message_ids) and d < self.pulls]
        for r in out:
            del self._due[r.metadata.reply_to_message_id]
        return out

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - must not be used
        raise AssertionError("exchange() must use push/pull")


def _broadcast(nodes: list[int]) -> list[Message]:
    content = RecordDict({"arrays": _record(), "config": ConfigRecord({"server-round": 1})})
    return [Message(content, dst_node_id=n, message_type="train") for n in nodes]


def test_exchange_pushes_packed_arrays_and_pulls_until_every_reply_is_in(task_identity):
    grid = FakeGrid({1: 0, 2: 3, 3: 1})
    replies = exchange(grid, _broadcast([1, 2, 3]), timeout=60, poll=0.01)
    assert sorted(int(r.content["metrics"]["n"]) for r in replies) == [1, 2, 3]
    assert grid.pulls == 4  # pulled again at the short interval until all were in, then stopped
    assert all(is_packed(m.content["arrays"]) for m in grid.pushed)  # one wire object per record
    assert grid.pushed[0].content is grid.pushed[1].content  # a broadcast is packed once
    rec = _record()
    for r in replies:  # the strategy gets the usual per-array record, bit for bit
        assert {k: a.data for k, a in r.content["arrays"].items()} == {k: a.data for k, a in rec.items()}


def test_exchange_returns_what_arrived_when_the_timeout_passes(task_identity):
    grid = FakeGrid({1: 0, 2: None})
    replies = exchange(grid, _broadcast([1, 2]), timeout=0.3, poll=0.01)
    assert [int(r.content["metrics"]["n"]) for r in replies] == [1]


def test_a_reply_still_uploading_does_not_hold_the_round_past_the_timeout(task_identity):
    """Flower's pull_messages blocks while a reply's arrays are still arriving (a slow link):
    the round must end at the timeout anyway, and the late reply is dropped."""
    release = threading.Event()

    class SlowUpload(FakeGrid):
        def pull_messages(self, message_ids):
            got = super().pull_messages(message_ids)
            if any(int(r.content["metrics"]["n"]) == 2 for r in got):
                release.wait(30)  # node 2's reply: its header is in, its arrays trickle in
            return got

    grid = SlowUpload({1: 0, 2: 1})
    result: list = []
    worker = threading.Thread(target=lambda: result.append(exchange(grid, _broadcast([1, 2]), timeout=0.5, poll=0.01)))
    worker.start()
    worker.join(timeout=20)
    finished_before_the_upload = not worker.is_alive()
    release.set()
    worker.join(timeout=20)
    assert finished_before_the_upload
    assert [int(r.content["metrics"]["n"]) for r in result[0]] == [1]


def test_a_grid_error_while_pulling_reaches_the_round(task_identity):
    class Broken(FakeGrid):
        def pull_messages(self, message_ids):
            raise ConnectionError("SuperLink gone")

    with pytest.raises(ConnectionError, match="SuperLink gone"):
        exchange(Broken({1: 0}), _broadcast([1]), timeout=5, poll=0.01)


def test_exchange_keeps_flowers_send_and_receive_with_poll_zero_and_in_process(task_identity):
    class Recorder(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            self.sent = list(messages)
            return []

    grid = Recorder({1: 0})
    assert exchange(grid, _broadcast([1]), timeout=5, poll=0) == []
    assert not is_packed(grid.sent[0].content["arrays"]) and grid.pulls == 0  # today's path, unchanged
    assert InlineGrid.in_process is True  # the tests' in-process grid keeps send_and_receive
