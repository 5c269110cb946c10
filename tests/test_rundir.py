"""Results that cannot be lost or mixed: run names, refusal of existing runs, locks, resume
checks, two checkpoints with fallback, and real faults (kill -9 mid-write, a full disk)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from floral_flwr.config import ConfigError
from floral_flwr.inline import run_inline
from floral_flwr.rundir import (Checkpoints, CheckpointWriteError, NonFiniteState, RunDirError,
                                claim_run_dir)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, name="r", **kw):
    return {"task": "synthetic-linear", "num-server-rounds": 2, "eval-every": 1, "output-dir": str(tmp_path),
            "run-name": name, "min-available-nodes": 1, **kw}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_an_existing_run_name_without_resume_is_refused_and_nothing_changes(tmp_path):
    run_inline(_cfg(tmp_path), 4)
    before = _snapshot(tmp_path / "r")
    with pytest.raises(RunDirError, match="'run-name' = 'r'.*already holds a run.*resume=true"):
        run_inline(_cfg(tmp_path, seed=3), 4)
    assert _snapshot(tmp_path / "r") == before


def test_automatic_names_get_a_fresh_directory_and_say_so(tmp_path, capsys):
    first = tmp_path / "task-method-seed0-20250101-000000"
    first.mkdir()
    (first / "rounds.csv").write_text("round\n1\n")
    claimed = claim_run_dir(first, {"seed": 0}, resume=False, auto_named=True)
    try:
        assert claimed.path.name == first.name + "-2"
        assert "writes to" in capsys.readouterr().out
        assert (first / "rounds.csv").read_text() == "round\n1\n"
    finally:
        claimed.release()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../escape", ".hidden", "a\\b"])
def test_run_names_that_leave_the_output_dir_are_refused(tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="'run-name'"):
        run_inline(_cfg(out, name), 4)
    assert not any(p.name in ("rounds.csv", "config.json") for p in tmp_path.rglob("*"))


def test_resume_of_a_finished_run_is_a_no_op_that_keeps_its_summary(tmp_path):
    first, _ = run_inline(_cfg(tmp_path), 4)
    before = _snapshot(tmp_path / "r")
    again, _ = run_inline(_cfg(tmp_path, resume=True), 4)
    assert again == json.loads(before["summary.json"]) and again["final"] == first["final"]
    assert again["final"]["round"] == 2  # the final metrics are still there
    assert _snapshot(tmp_path / "r") == before


def test_resume_refuses_a_change_to_computation_keys_naming_each(tmp_path):
    run_inline(_cfg(tmp_path), 4)
    with pytest.raises(RunDirError) as err:
        run_inline(_cfg(tmp_path, resume=True, seed=1, method="fedavg", **{"num-server-rounds": 3}), 4)
    text = str(err.value)
    assert "'method' = 'fedavg' (the run has 'floral')" in text and "'seed' = 1 (the run has 0)" in text
    assert "num-server-rounds" not in text
    # keys that do not change the computation may change: more rounds, another eval cadence
    summary, _ = run_inline(_cfg(tmp_path, resume=True, **{"num-server-rounds": 3, "eval-every": 3}), 4)
    rows = list(csv.DictReader((tmp_path / "r" / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3] and summary["final"]["round"] == 3


def test_a_second_concurrent_run_is_refused_with_the_first_ones_pid(tmp_path):
    run = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from floral_flwr.rundir import claim_run_dir
            d = claim_run_dir(__import__('pathlib').Path({str(run)!r}), {{}}, False, False)
            print('locked', flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid}"):
            claim_run_dir(run, {}, resume=True, auto_named=False)
        with pytest.raises(RunDirError, match="in use"):
            run_inline(_cfg(tmp_path, "busy"), 4)
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run releases its lock
        holder.wait()
    claim_run_dir(run, {}, resume=True, auto_named=False).release()


# ------------------------------------------------------------------ checkpoints


def _state(value: float, size: int = 8) -> dict[str, np.ndarray]:
    return {"base.w": np.full(size, value, np.float32), "base.n": np.array(int(value), np.int64)}


def test_two_checkpoints_are_kept_and_a_corrupt_newest_falls_back_with_a_warning(tmp_path, capsys):
    ck = Checkpoints(tmp_path / "checkpoint")
    for rnd in (1, 2, 3):
        ck.save(rnd, _state(rnd), {"m_t/base.w": np.zeros(8)}, {"elapsed-s": float(rnd)})
    assert sorted(p.name for p in ck.folder.glob("state-*.npz")) == ["state-000002.npz", "state-000003.npz"]
    newest = ck.folder / "state-000003.npz"
    newest.write_bytes(newest.read_bytes()[:40])  # torn by something outside our atomic writes
    rnd, arrays, _, meta = ck.load()
    assert rnd == 2 and float(arrays["base.w"][0]) == 2.0 and meta["elapsed-s"] == 2.0
    assert "newest checkpoint is unreadable" in capsys.readouterr().out
    (ck.folder / "state-000002.npz").write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="no checkpoint .* is readable.*round 3.*round 2"):
        ck.load()


def test_a_resumed_run_falls_back_to_the_older_checkpoint_and_loses_no_round(tmp_path, capsys):
    run_inline(_cfg(tmp_path, **{"num-server-rounds": 3}), 4)
    newest = tmp_path / "r" / "checkpoint" / "state-000003.npz"
    newest.write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "r" / "summary.json").unlink()  # as if killed before the summary
    summary, _ = run_inline(_cfg(tmp_path, resume=True, **{"num-server-rounds": 3}), 4)
    assert "resuming from the checkpoint of round 2" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "r" / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3] and summary["final"]["round"] == 3


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    ck = Checkpoints(tmp_path / "checkpoint")
    ck.save(1, _state(1.0), {}, {})
    bad = _state(2.0)
    bad["base.w"][3] = np.inf
    with pytest.raises(NonFiniteState, match="round 2.*NaN/Inf in \\['base.w'\\].*round 1 is kept"):
        ck.save(2, bad, {}, {})
    assert ck.load()[0] == 1


_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from floral_flwr.rundir import Checkpoints
    ck = Checkpoints({folder!r})
    for rnd in range(1, 10_000):
        ck.save(rnd, {{"base.w": np.full(400_000, rnd, np.float32)}}, {{"m": np.full(400_000, -rnd, np.float32)}},
                {{"elapsed-s": float(rnd)}})
        print(rnd, flush=True)
""")


def test_kill_9_during_checkpoint_writes_leaves_a_consistent_checkpoint(tmp_path):
    """A real SIGKILL at arbitrary points of the write sequence: what load() returns is always
    one complete round (state, optimizer and meta of the same round)."""
    for attempt in range(4):
        folder = tmp_path / f"ck{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), folder=str(folder))],
                                stdout=subprocess.PIPE, text=True)
        first = int(proc.stdout.readline())  # one round is complete
        time.sleep(0.05 + 0.13 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rnd, arrays, optimizer, meta = Checkpoints(folder).load()
        assert rnd >= first and meta["round"] == rnd and meta["elapsed-s"] == float(rnd)
        assert (arrays["base.w"] == rnd).all() and (optimizer["m"] == -rnd).all()
        assert len(list(folder.glob("state-*.npz"))) <= 3  # old rounds pruned (+ one in flight)


@pytest.fixture
def small_disk(tmpfs):
    """A 1 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    return tmpfs("1m")


def test_a_full_disk_stops_with_the_file_named_and_keeps_the_previous_checkpoint(small_disk):
    ck = Checkpoints(small_disk / "checkpoint")
    ck.save(1, _state(1.0, 1000), {}, {"elapsed-s": 1.0})
    with pytest.raises(CheckpointWriteError, match="round 2 .*No space left on device.*round 1 is intact"):
        ck.save(2, _state(2.0, 400_000), {}, {"elapsed-s": 2.0})
    rnd, arrays, _, _ = ck.load()
    assert rnd == 1 and (arrays["base.w"] == 1.0).all()
    assert not list(ck.folder.glob(".tmp-*"))  # no partial file left behind
    assert json.loads((ck.folder / "meta.json").read_text())["round"] == 1
