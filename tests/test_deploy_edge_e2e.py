"""``deploy local`` end to end with its defaults (warm executor, short waits, packed arrays):

1. ``test_deploy_local_streams_rounds_and_changes_no_number`` (default suite): the per-round
   lines reach stdout while the run is still going, the closing summary is printed, every
   ClientApp message and the ServerApp were served by forked children of the warm executors (no
   cold ``flwr-clientapp`` / ``flwr-serverapp``), and the train loss of every round and every
   client's evaluation (round 2's folded into round 3's train messages, round 3's sent at once)
   are exactly the in-process run's.
2. ``test_ctrl_c_stops_everything_deploy_local_started`` (slow): SIGINT in the middle of a run
   ends ``deploy local`` with exit code 130 and leaves none of its processes running.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from floral_flwr import deploy
from floral_flwr.client import make_client_app
from floral_flwr.deploy.processes import _is_zombie, load_procs
from floral_flwr.inline import InlineGrid
from floral_flwr.server import run_server

ROOT = Path(__file__).resolve().parents[1]
ROUND_LINE = "[floral] round "  # the ServerApp's progress line, once per round


def _config(out: Path, name: str, rounds: int) -> dict:
    # num-threads=1 in both runs: a float32 sum over 1 or 2 threads differs in the last bits;
    # plaintext 'mean': one train message per client, and the evaluation folds into it
    return {"task": "digits-label-shift", "aggregation": "mean", "num-server-rounds": rounds, "eval-every": 2, "batch-size": 16,
            "num-threads": 1,
            "fraction-train": 0.5, "fraction-evaluate": 0.5, "min-available-nodes": 2,
            "node-wait-timeout": 300.0, "reply-timeout": 300.0, "output-dir": str(out), "run-name": name}


def _as_run_config(cfg: dict) -> str:
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())


def _losses(run_dir: Path) -> list[str]:
    return [r["train-loss"] for r in csv.DictReader((run_dir / "rounds.csv").open())]


def _evaluations(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "clients.csv").open()))


def _rows(run_dir: Path) -> int:
    p = run_dir / "rounds.csv"
    return max(0, len(p.read_text().splitlines()) - 1) if p.exists() else 0


def _start_local(work: Path, cfg: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "floral_flwr.deploy", "local", "--num-supernodes", "2",
                             "--num-partitions", "4", "--work", str(work), "--timeout", "900",
                             "--run-config", _as_run_config(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _our_pids(work: Path) -> list[int]:
    pids = [p.pid for p in load_procs(work)]
    return pids + [d for p in pids for d in deploy.descendants(p)]


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]


def test_deploy_local_streams_rounds_and_changes_no_number(tmp_path):
    rounds = 3
    cfg = _config(tmp_path / "out", "dep", rounds)
    proc = _start_local(tmp_path / "w", cfg)
    lines, rows_at_first_round_line, pids = [], None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if ROUND_LINE in line and rows_at_first_round_line is None:
            rows_at_first_round_line = _rows(tmp_path / "out" / "dep")
            pids = _our_pids(tmp_path / "w")
    assert proc.wait(timeout=60) == 0, "".join(lines)[-4000:]
    text = "".join(lines)
    # live: the first round's line arrived while later rounds were still to come
    assert rows_at_first_round_line is not None and rows_at_first_round_line < rounds, text[-3000:]
    assert "finished:completed" in text and f"{rounds} round(s); round time median" in text
    assert not _alive(pids)  # the deployment is gone
    # every message went through a forked child of the warm executor, none through a cold start
    execs = [(tmp_path / "w" / "logs" / f"supernode-{i}.log").read_text() for i in range(2)]  # node + executor
    served = sum(e.count("ClientApp started") for e in execs)
    assert served >= rounds + 2  # >= one train message per round, the discovery queries, the evaluation
    assert not any("Start `flwr-clientapp` process" in e for e in execs)
    # ... and the ServerApp was a forked child of the SuperLink's warm executor, not a cold flwr-serverapp
    assert "[warm-executor" in (tmp_path / "w" / "logs" / "superlink.log").read_text()
    assert "run directory: " in text and "Start `flwr-serverapp` process" not in text
    # the same numbers as the same federation in-process (clients 0 and 1 of 4)
    inline_cfg = {**cfg, "run-name": "inline"}
    grid = InlineGrid(make_client_app(inline_cfg), 2, node_config=lambda k: {"num-partitions": 4})
    threads = torch.get_num_threads()
    try:
        run_server(grid, inline_cfg)
    finally:
        torch.set_num_threads(threads)
    assert _losses(tmp_path / "out" / "dep") == _losses(tmp_path / "out" / "inline")
    evaluated = _evaluations(tmp_path / "out" / "dep")
    assert {r["round"] for r in evaluated} == {"2", "3"}
    assert evaluated == _evaluations(tmp_path / "out" / "inline")


@pytest.mark.slow
def test_ctrl_c_stops_everything_deploy_local_started(tmp_path):
    proc = _start_local(tmp_path / "w", _config(tmp_path / "out", "cut", 20))
    lines, pids = [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if ROUND_LINE in line:
            pids = _our_pids(tmp_path / "w")
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert pids, "".join(lines)[-3000:]
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted" in rest
    deadline = time.monotonic() + 30  # detached grandchildren may take a moment to be reaped
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pids)
    assert not list((tmp_path / "w" / "pids").glob("*.pid"))
