"""The first hour of a new user (issue 16): plain ``flwr run .`` on Flower's default federation,
Ctrl-C, fast one-line config errors, what a run prints and records, discoverability.

The slow tests start real Flower processes (a simulation SuperLink, Ray); each marks them with
an environment variable of its own and checks, through /proc, that none is left.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from floral_flwr import launch
from floral_flwr.config import DEFAULTS, ConfigError
from floral_flwr.inline import run_inline
from floral_flwr.provenance import source_hash
from floral_flwr.results import RunRecorder

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
TEST_MARK = "FLORAL_TEST_MARK"


def _marked(value: str) -> list[int]:
    """PIDs whose environment has TEST_MARK=value (this test's processes and their children)."""
    needle = f"{TEST_MARK}={value}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """Start time of a live (non-zombie) process; None if gone or a zombie."""
    f = _stat(pid)
    return None if f is None or f[0] == "Z" else f[19]


def _descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> start time (a reused pid is another process)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        f = _stat(int(d.name)) if d.name.isdigit() else None
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(d.name))
    out: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        p = todo.pop()
        t = _start_time(p)
        if t is not None and p not in out:
            out[p] = t
            todo += children.get(p, [])
    return out


def _cmdline(pid: int) -> str:
    """What a left-over process is, for the failure message."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _kill_marked(value: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked(value):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(3)


def _env(mark: str, **extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), TEST_MARK: mark, **extra}


# ------------------------------------------------------------------ config errors, before anything starts


@pytest.mark.parametrize("run_config,fragments", [
    ("num-adaptor=4", ["'num-adaptor'", "did you mean 'num-adaptors'?"]),
    ("method='floarl'", ["'method'", "did you mean 'floral'?"]),
    ("task='digits-rotat'", ["'task'", "did you mean 'digits-rotate'?"]),
    ("device='cpy'", ["'device'", "did you mean 'cpu'?"]),
    ("num-server-rounds=0", ["'num-server-rounds'", ">= 1"]),
    ("min-available-nodes=30", ["'min-available-nodes'", "--num-supernodes 20"]),
])
def test_launch_reports_a_bad_config_in_one_line_and_starts_nothing(run_config, fragments, monkeypatch, capsys):
    def nothing_may_start(*a, **k):  # launch() is what starts the SuperLink
        raise AssertionError("the launch started before the config was valid")

    monkeypatch.setattr(launch, "launch", nothing_may_start)
    assert launch.main(["--run-config", run_config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(f in err[0] for f in fragments), err


def test_launch_refuses_a_federation_smaller_than_the_task(monkeypatch, capsys):
    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("started"))
    assert launch.main(["--num-supernodes", "2"]) == 2  # digits-label-shift has 4 clusters
    err = capsys.readouterr().err
    assert "at least 4 clients" in err and "2 clients were asked for" in err and "--num-supernodes" in err


def test_the_simulation_check_compares_supernodes_with_the_task_clusters():
    """In simulation one SuperNode is one client: 2 SuperNodes cannot hold 4 clusters."""
    from flwr.superlink.grid import InMemoryGrid

    from floral_flwr.config import parse_run_config
    from floral_flwr.inline import InlineGrid
    from floral_flwr.server import check_simulated_federation

    class FakeSimulationGrid(InMemoryGrid):
        def __init__(self, n: int) -> None:  # no state: only the node ids are asked for
            self.n = n

        def get_node_ids(self):
            return list(range(1, self.n + 1))

    cfg = parse_run_config({"task": "digits-label-shift"})
    with pytest.raises(ConfigError) as info:
        check_simulated_federation(FakeSimulationGrid(2), cfg, 4)
    msg = str(info.value)
    assert "2 simulated SuperNodes" in msg and "num-supernodes=20" in msg and "floral_flwr.launch" in msg
    check_simulated_federation(FakeSimulationGrid(4), cfg, 4)
    # deployment-like grids are not judged by their node count (num-partitions sizes the task)
    grid = object.__new__(InlineGrid)
    grid.contexts = {1: None, 2: None}
    check_simulated_federation(grid, cfg, 4)


def test_a_client_setup_error_becomes_the_clients_own_one_line_message():
    from floral_flwr.server import _setup_error_line
    from floral_flwr.strategy.nodes import ClientSetupError

    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()'\n"
              "  File \"x.py\", line 3, in run\n    raise ClientAppException(str(ex)) from ex\n"
              "flwr.clientapp.client_app.ClientAppException: \n"
              "Exception ClientAppException occurred. Message: dataset 'mnist' was not found\n in /data'>")
    line = _setup_error_line(ClientSetupError(f"all 2 node(s) failed to set up the task; first error: {reason}"))
    assert line == "every client failed to set up the task: dataset 'mnist' was not found in /data"


# ------------------------------------------------------------------ what a run prints and records


def _inline(tmp_path, capfd, **kw):
    cfg = {"task": "synthetic-linear", "method": "fedavg", "num-server-rounds": 3, "eval-every": 2,
           "output-dir": str(tmp_path), "run-name": "r", **kw}
    summary, _ = run_inline(cfg, 4)
    out, err = capfd.readouterr()
    return summary, out.strip().splitlines(), err


def test_a_run_prints_provenance_one_line_per_round_and_a_summary_table(tmp_path, capfd, caplog, monkeypatch):
    import logging

    caplog.set_level(logging.INFO, logger="flwr")
    monkeypatch.setenv("FLORAL_SOURCE_REVISION", "0123456789abcdef0123")
    summary, out, err = _inline(tmp_path, capfd)
    logged = [r.getMessage() for r in caplog.records]
    assert any("Starting FloralStrategy" in m for m in logged)  # Flower's log is seen here
    # the strategy's per-round INFO lines are not: the one progress line per round says it
    assert not any(m.startswith(("configure_train:", "aggregate_train:")) for m in logged)
    run = tmp_path / "r"
    assert all(line.startswith("[fedavg] ") for line in out)  # the method, not "floral"
    assert "floral-flwr" in out[0] and "git 0123456789ab" in out[0] and source_hash()[:12] in out[0]
    for rnd in (1, 2, 3):
        assert sum(f"round {rnd}/3 |" in line for line in out) == 1
    assert "start-up + round 1" in next(line for line in out if "round 1/3" in line)
    assert "ETA" in next(line for line in out if "round 2/3" in line)
    table = out[out.index("[fedavg] summary") + 1:]
    labels = [line.split()[1] for line in table]
    assert labels == ["run", "final", "worst", "cluster", "rounds", "wall", "results"]
    final = summary["final"]["mse-mean"]
    assert f"{final:.4f}" in table[1] and f"{summary['final']['mse-worst10']:.4f}" in table[2]
    assert out[-1].endswith(str(run))  # the last line says where the results are


def test_config_json_records_what_ran_where_and_result_files_are_world_readable(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("FLORAL_SOURCE_REVISION", "feedbeef")
    _inline(tmp_path, capfd)
    run = tmp_path / "r"
    info = json.loads((run / "config.json").read_text())
    import flwr
    import torch

    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"] == torch.__version__
    assert info["versions"]["flwr"] == flwr.__version__
    assert info["git-revision"] == "feedbeef" and info["source-sha256"] == source_hash()
    host = info["host"]
    assert host["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert host["torch-threads"] == torch.get_num_threads() and host["cpus"] == os.cpu_count()
    for name in ("config.json", "summary.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_the_source_hash_follows_the_code(tmp_path):
    pkg = tmp_path / "floral_flwr"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    first = source_hash(pkg)
    assert source_hash(pkg) == first
    (pkg / "a.py").write_text("x = 2\n")
    assert source_hash(pkg) != first


def test_a_failed_resume_leaves_no_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="'resume' = true"):
        run_inline({"task": "synthetic-linear", "method": "fedavg", "output-dir": str(tmp_path),
                    "run-name": "never-ran", "resume": True}, 4)
    assert not (tmp_path / "never-ran").exists()


def test_eta_leaves_out_the_start_up_and_prices_evaluation_rounds_apart(tmp_path, monkeypatch, capsys):
    rec = RunRecorder(tmp_path, "accuracy", num_rounds=10, eval_every=5)
    now = {"s": 0.0}
    monkeypatch.setattr(rec, "elapsed", lambda: now["s"])
    ends = {1: 30.0, 2: 31.0, 3: 32.0, 4: 33.0, 5: 36.0}  # round 1 ends after 30 s of start-up

    def stats(rnd: int, evaluated: bool):
        now["s"] = ends[rnd]
        return SimpleNamespace(server_round=rnd, train_loss=1.0, failures=0, rejected=0, sampled=4,
                               received=4, eval_summary={"accuracy-mean": 0.5} if evaluated else {})

    rec.progress(stats(1, False))
    assert rec.eta_seconds(1) is None and rec.startup_s == 30.0
    rec.progress(stats(2, False))
    # 8 rounds left at the 1 s of round 2 (the 30 s start-up would give 8 * 15.5 s)
    assert rec.eta_seconds(2) == 8 * 1.0
    for rnd in (3, 4):
        rec.progress(stats(rnd, False))
    rec.progress(stats(5, True))  # the evaluation round took 3 s
    # left: 6..9 train only (1 s each), 10 evaluates (3 s)
    assert rec.eta_seconds(5) == 4 * 1.0 + 1 * 3.0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and "start-up + round 1: 30.0 s" in lines[0] and "ETA 0:07" in lines[-1]


def test_tensorboard_events_hold_the_rounds(tmp_path, capfd):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _inline(tmp_path, capfd, **{"eval-every": 1})
    run = tmp_path / "r"
    events = EventAccumulator(str(run))
    events.Reload()
    rows = list(csv.DictReader((run / "rounds.csv").open()))
    for tag, col in (("train/loss", "train-loss"), ("mse/mean", "mean"), ("mse/worst10", "worst10"),
                     ("bytes/up", "bytes-up"), ("bytes/down", "bytes-down")):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [int(r["round"]) for r in rows], tag
        assert [e.value for e in got] == pytest.approx([float(r[col]) for r in rows], rel=1e-6), tag


# ------------------------------------------------------------------ discoverability


def test_list_shows_every_task_method_and_key_from_the_registries(capsys):
    from floral_flwr.__main__ import main
    from floral_flwr.config import CHOICES, KEY_HELP
    from floral_flwr.methods import METHOD_SPECS
    from floral_flwr.tasks import TASK_NAMES, task_info

    main(["list", "tasks"])
    out = capsys.readouterr().out
    for name in TASK_NAMES:
        row = next(line for line in out.splitlines() if line.split()[:1] == [name])
        info = task_info(name)
        assert row.split()[1:5] == [info.metric, str(info.num_clusters), str(info.defaults["num-clients"]),
                                    str(info.defaults["num-server-rounds"])]
    main(["list", "methods"])
    out = capsys.readouterr().out
    for name, spec in METHOD_SPECS.items():
        assert any(line.startswith(name + " ") and spec.description in line for line in out.splitlines())
    main(["list", "keys"])
    out = capsys.readouterr().out
    for key, default in DEFAULTS.items():
        row = next(line for line in out.splitlines() if line.split()[:1] == [key])
        assert KEY_HELP[key] in row
        assert all(c in row for c in CHOICES.get(key, ()))


# ------------------------------------------------------------------ stopping what was started


def test_stop_marked_ends_every_marked_process_even_in_another_session_ignoring_sigterm(tmp_path):
    mark = uuid.uuid4().hex
    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'], start_new_session=True); "
                "time.sleep(300)")
    env = {**os.environ, launch.MARK_ENV: mark, TEST_MARK: mark}
    parent = subprocess.Popen([sys.executable, "-c", stubborn], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(_marked(mark)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_marked(mark)) == 2
    assert launch.stop_marked(mark, [parent], term_grace=1.0, kill_grace=5.0) == 2
    parent.wait(timeout=10)
    left = [p for p in _marked(mark) if Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
    assert not left


def test_stop_marked_ends_descendants_that_lost_the_mark(tmp_path):
    """Ray's agents rename themselves (setproctitle), which overwrites the environment /proc shows:
    they carry no mark, outlive their raylet as orphans, and were left behind by Ctrl-C in CI.
    Here a marked parent starts a child with an empty environment; both ignore SIGTERM."""
    mark = uuid.uuid4().hex
    pidfile = tmp_path / "child.pid"
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)")
    parent = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}], env={{}}); "
              f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(300)")
    env = {**os.environ, launch.MARK_ENV: mark}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    kid = int(pidfile.read_text())
    try:
        assert launch.MARK_ENV.encode() not in Path(f"/proc/{kid}/environ").read_bytes()
        assert launch.stop_marked(mark, [proc], term_grace=0.5, kill_grace=5.0) == 2
        proc.wait(timeout=10)
        time.sleep(0.3)
        gone = not Path(f"/proc/{kid}").exists() or Path(f"/proc/{kid}/stat").read_text().split()[2] == "Z"
        assert gone, f"the unmarked child {kid} outlived stop_marked"
    finally:
        for p in (kid, proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_stop_marked_also_kills_a_child_forked_after_the_first_sigkill(monkeypatch):
    """A dying parent can fork between the /proc scan and the SIGKILL; the newcomer must get one too."""
    alive = {101}
    sent: list[tuple[int, int]] = []

    def fake_signal_all(pids, sig):
        for pid in pids:
            sent.append((pid, sig))
            if sig == signal.SIGKILL and pid in alive:
                alive.discard(pid)
                if pid == 101:  # the parent's last fork lands just as it dies
                    alive.add(202)

    monkeypatch.setattr(launch, "_stop_targets", lambda mark, known: {p: "t" for p in alive})
    monkeypatch.setattr(launch, "_signal_all", fake_signal_all)
    assert launch.stop_marked("m", [], term_grace=0.3, kill_grace=3.0) == 1
    assert (202, signal.SIGKILL) in sent and not alive


def _pump_lines(stream, q: "queue.Queue[str]") -> None:
    for line in stream:
        q.put(line)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_every_process_launch_started(tmp_path):
    """SIGINT to launch mid-run: a message, exit 130, none of its processes left, no temp folder."""
    mark = uuid.uuid4().hex
    tmp = Path(tempfile.mkdtemp(prefix="flt-", dir="/tmp"))  # short: Ray's socket paths live here
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "floral_flwr.launch", "--num-supernodes", "4", "--run-config",
             f"output-dir='{tmp_path}' num-server-rounds=400 run-name='ctrl-c'"],
            cwd=ROOT, env=_env(mark, TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump_lines, args=(proc.stdout, lines), daemon=True).start()
        seen: list[str] = []
        deadline = time.monotonic() + 400
        while not any("round 2/400" in s for s in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen[-30:])
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert len(_marked(mark)) > 3  # SuperLink, superexec, simulation, Ray: all carry the mark
        tree = _descendants(proc.pid)  # Ray's agents carry no readable mark (they rename themselves)
        assert len(tree) > 3
        proc.send_signal(signal.SIGINT)
        # launch returns only once its processes are gone (0.7-4.5 s in the acceptance check;
        # the issue asks for 10 s); a generous bound here, so that a busy machine is no failure
        assert proc.wait(timeout=120) == 130
        time.sleep(0.5)
        while not lines.empty():
            seen.append(lines.get())
        text = "".join(seen)
        assert "Ctrl-C: stopping run" in text and "stopped" in seen[-1] and "resume=true" in seen[-1]
        left = [p for p in _marked(mark) if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        assert not left, [(p, _cmdline(p)) for p in left]
        alive = [p for p, start in tree.items() if _start_time(p) == start]
        assert not alive, [(p, _cmdline(p)) for p in alive]
        assert not list(tmp.glob("floral-launch-*"))  # its SuperLink folder is gone too
        assert (tmp_path / "ctrl-c" / "checkpoint" / "meta.json").exists()  # resumable
    finally:
        _kill_marked(mark)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


@pytest.mark.slow
def test_plain_flwr_run_on_the_default_federation_stops_with_the_fix(tmp_path):
    """What every Flower user types first: ``flwr run .`` with Flower's 2 simulated SuperNodes."""
    env = _env(uuid.uuid4().hex, FLWR_HOME=str(tmp_path / "flwr-home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for attempt in range(3):
        mark = env[TEST_MARK] = uuid.uuid4().hex
        try:
            res = subprocess.run(
                ["flwr", "run", ".", "--stream", "--run-config", f"output-dir='{tmp_path / 'out'}'"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        finally:
            _kill_marked(mark)  # `flwr run .` leaves its local SuperLink running
        # Flower gives its managed local SuperLink a fixed 15 s to start: on an overloaded
        # machine it can run out; that is Flower's limit, not the app's, so try again
        if "Failed to start local SuperLink" not in res.stdout:
            break
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in res.stdout.splitlines()]
    # Flower ends a run with an empty INFO line (its exit message for code 0)
    last = [line for line in lines if not re.fullmatch(r"\s*(INFO\s*:)?\s*", line)]
    assert "stopped before round 1" in last[-1], res.stdout[-3000:]
    assert "num-supernodes=20" in last[-1] and "floral_flwr.launch" in last[-1]
    assert not any("Traceback" in line for line in lines), lines
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_round_chatter_of_flowers_workflows_is_dropped_but_nothing_else():
    """One line per round: Flower's per-round INFO lines (FedAvg's and the SecAgg+ workflow's,
    four per secure exchange) are filtered from the run's output; warnings and other INFO stay."""
    import logging

    from floral_flwr.server import _DropRoundChatter

    def record(level, msg, *args):
        return logging.LogRecord("flwr", level, __file__, 1, msg, args, None)

    drop = _DropRoundChatter()
    for msg, args in [("configure_fit: strategy sampled %s clients (out of %s)", (20, 20)),
                      ("aggregate_fit: received %s results and %s failures", (20, 0)),
                      ("Secure aggregation commencing.", ()), ("Secure aggregation completed.", ()),
                      ("configure_train: Sampled %s nodes (out of %s)", (4, 4))]:
        assert not drop.filter(record(logging.INFO, msg, *args)), msg
    assert drop.filter(record(logging.WARNING, "Secure aggregation commencing."))  # never a warning
    assert drop.filter(record(logging.INFO, "Starting FloralStrategy: rounds 1..150"))
