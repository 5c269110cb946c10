"""Deployed round time on loopback, today's path vs the warm path, with simulation as reference;
per-message ClientApp start-up; round time and wire bytes on shaped (edge-like) links.

    python benchmarks/bench_deploy.py [--rounds 7] [--out /tmp/bench-deploy] [--only 2|2warm|6|6warm|links|nodewait|evalfold]

Every setting runs the same digits-label-shift run config (``aggregation='mean'``, evaluation
only in the last round, ``num-threads=1``), so warm rounds 2..R-1 are training only (>= 5 with
the default 7 rounds) and round R adds the evaluation:

- **today**: Flower's own SuperExec (a fresh ``flwr-clientapp`` per message), the stock
  ``flower-supernode`` (3 s idle wait), ``reply-poll=0`` (``send_and_receive``, 3 s pulls, one
  wire object per array), SuperExec task poll 1 s (Flower's defaults);
- **warm**: the deploy tooling's defaults (warm executor, 0.2 s node poll, task poll 0.1 s,
  ``reply-poll=0.1`` with packed arrays);
- **simulation**: ``python -m floral_flwr.launch`` (Ray) with the same clients.

"evalfold": the warm path with an evaluation every 2nd round, folded into the next round's train
messages (``fold-evaluation=true``, the default) vs a separate evaluate exchange (``false``); the
mean of rounds 2..R-1 is then (training-only round + evaluation round) / 2.

"2": 2 SuperNodes hosting clients 0, 1 of 4 (``fraction-train = fraction-evaluate = 0.5``: one
client trains per round) vs a 4-client simulation; "6": 6 SuperNodes vs 6 simulated clients (all
train); "2warm" / "6warm": only the warm path of "2" / "6". All SuperNodes talk to the SuperLink through a byte-counting loopback proxy. "nodewait": the warm
path with the stock SuperNode waits (``--node-poll 0``: what the 3 s idle wait costs). "links":
the warm path, 2 nodes, behind the proxy shaped as edge links (one-way delay and bandwidth per
direction, no loss: this kernel has no ``tc netem``; ``tests/test_deploy_netns.py`` uses netem
where the kernel has it). Per-message start-up: the warm executor logs, per message, the time
from the fork to the ClientApp handler; a cold ``flwr-clientapp`` pays at least the imports,
timed here as a fresh interpreter importing torch, Flower's ClientApp runtime and the app.
Each row also gives the 1-minute load average sampled every 2 s while that setting ran (min /
median / max; the machine is shared). Prints a Markdown report (also ``<out>/results.md``, raw
numbers in ``<out>/results.json``, rewritten after every setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from floral_flwr.deploy.deployment import Deployment  # noqa: E402
from floral_flwr.deploy.settings import NodeRuntime  # noqa: E402

TODAY = NodeRuntime(executor="flower", node_poll=0, task_poll=1.0)
WARM = NodeRuntime()
WARM_STOCK_WAITS = NodeRuntime(node_poll=0)  # the warm executor with flower-supernode's own 3 s / 0.5 s waits
LINKS = [(0.0, None), (0.025, 10e6), (0.05, 5e6), (0.1, 1e6)]  # one-way delay s, bit/s per direction


def follow_marking_rounds(d: Deployment, run_id: str, run_dir: Path, mark: Any) -> tuple[str, dict[int, Any]]:
    """Follow the run to its end while a watcher records ``mark()`` the first moment
    ``run_dir/rounds.csv`` holds each number of rounds (it grows by one row per round):
    (the run's final status, rounds recorded -> ``mark()`` then)."""
    marks: dict[int, Any] = {}
    stop = threading.Event()

    def watch() -> None:
        p = run_dir / "rounds.csv"
        while not stop.is_set():
            done = max(0, len(p.read_text().splitlines()) - 1) if p.exists() else 0
            marks.setdefault(done, mark())
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    status, _ = d.follow(run_id, 7200)
    stop.set()
    watcher.join()
    return status, marks


def _cfg(out: Path, name: str, rounds: int, extra: str) -> str:
    every = "" if "eval-every=" in extra else f"eval-every={rounds} "  # a key may appear once
    # one message per client and round ('mean'; secagg sends 4) unless the caller chooses
    aggregation = "" if "aggregation=" in extra else "aggregation='mean' "
    return (f"task='digits-label-shift' num-server-rounds={rounds} {every}"
            f"batch-size=16 num-threads=1 output-dir='{out}' run-name='{name}' node-wait-timeout=600.0 "
            f"reply-timeout=600.0 {aggregation}{extra}").strip()


def _rounds(run_dir: Path) -> dict:
    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    elapsed = [float(r["elapsed-s"]) for r in rows]
    durations = [b - a for a, b in zip(elapsed, elapsed[1:])]  # round i+2, as the D check reads it
    warm = durations[:-1]  # rounds 2..R-1: training only
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "rounds": len(rows),
        "first-round-s": float(rows[0]["round-s"]),
        "warm-rounds-s": [round(x, 3) for x in warm],
        "median-warm-round-s": statistics.median(warm) if warm else None,
        "mean-warm-round-s": statistics.mean(warm) if warm else None,
        "eval-round-s": durations[-1] if durations else None,
        "train-loss": [r["train-loss"] for r in rows],
        "payload-up": summary.get("bytes-up-per-round"),
        "payload-down": summary.get("bytes-down-per-round"),
    }


class LoadSampler:
    """The 1-minute load average, sampled every ``every`` s while a setting runs (the machine is
    shared: each row says how loaded it was during that row, not only at the end)."""

    def __init__(self, every: float = 2.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)

    def _sample(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"load-min": min(s), "load-median": statistics.median(s), "load-max": max(s)}


def _startups(work: Path) -> list[float]:
    out = []
    for log in sorted((work / "logs").glob("supernode-*.log")):
        out += [float(x) for x in re.findall(r"ClientApp started ([0-9.]+) s after the fork", log.read_text())]
    return out


def deployment(out: Path, name: str, nodes: int, partitions: int, rounds: int, extra: str,
               runtime: NodeRuntime, delay_s: float = 0.0, rate: float | None = None) -> dict:
    work = out / f"work-{name}"
    t0 = time.monotonic()
    poll = "" if runtime.executor == "warm" else "reply-poll=0"
    with LoadSampler() as load, Deployment(work, nodes, partitions, state_root=work / "state", proxy=True,
                                           runtime=runtime, proxy_delay_s=delay_s, proxy_rate_bit_s=rate) as d:
        d.wait_warm()
        run_id = d.submit(ROOT, _cfg(out, name, rounds, f"{extra} {poll} min-available-nodes={nodes}"))
        # rounds recorded -> proxy byte counts at that moment
        status, marks = follow_marking_rounds(d, run_id, out / name, d.byte_counter.snapshot)
        up, down = d.byte_counter.snapshot()
    res = _rounds(out / name)
    warm = [(marks[r + 1][0] - marks[r][0], marks[r + 1][1] - marks[r][1])
            for r in range(1, rounds - 1) if r in marks and r + 1 in marks]
    starts = _startups(work)
    res.update(status=status, wall_s=time.monotonic() - t0, wire_up=up, wire_down=down,
               warm_wire=[statistics.median(x) for x in zip(*warm)] if warm else None,
               startup_median_s=statistics.median(starts[1:]) if len(starts) > 1 else None,
               startup_n=len(starts), **load.summary())
    return res


def simulation(out: Path, name: str, clients: int, rounds: int, extra: str) -> dict:
    t0 = time.monotonic()
    with LoadSampler() as load:
        p = subprocess.run([sys.executable, "-m", "floral_flwr.launch", "--num-supernodes", str(clients),
                            "--work-dir", str(out / f"work-{name}"),
                            "--run-config", _cfg(out, name, rounds, extra + f" min-available-nodes={clients}")],
                           cwd=ROOT, capture_output=True, text=True, timeout=7200)
    res = _rounds(out / name)
    res.update(status="finished:completed" if p.returncode == 0 else f"rc {p.returncode}",
               wall_s=time.monotonic() - t0, **load.summary())
    return res


def cold_import_s(repeats: int = 3) -> float:
    """What every cold ``flwr-clientapp`` pays before its handler: a fresh interpreter importing
    torch, Flower's ClientApp runtime and the app (median of ``repeats``)."""
    code = ("import time; t = time.monotonic(); import torch, torch.optim, torch._dynamo; "
            "import flwr.supernode.runtime.run_clientapp; import client_app; print(time.monotonic() - t)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600, check=True).stdout.split()[-1]) for _ in range(repeats)]
    return statistics.median(runs)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(results: dict, cold: float | None, started: float) -> str:
    load = os.getloadavg()
    lines = [f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
             f"benchmark wall time {(time.monotonic() - started) / 60:.0f} min", ""]
    if cold is not None:
        lines += [f"cold ClientApp imports (fresh interpreter: torch + Flower's ClientApp runtime + the app): "
                  f"{cold:.2f} s", ""]
    lines += ["| setting | status | load avg min/median/max | round 1 s | warm rounds s (2..R-1) | median warm round s | eval round s | "
              "mean s | ClientApp start-up s (median, n) | payload up/down per round | wire up/down, warm round | train losses |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        warm = r.get("warm_wire")
        wire = f"{warm[0]:,.0f} / {warm[1]:,.0f}" if warm else ("n/a (in-process)" if "wire_up" not in r else "n/a")
        start = (f"{_fmt(r['startup_median_s'], 3)} ({r['startup_n']})" if r.get("startup_median_s") is not None
                 else ("cold process" if "wire_up" in r else "n/a"))
        row_load = (f"{r['load-min']:.1f} / {r['load-median']:.1f} / {r['load-max']:.1f}" if "load-min" in r
                    else "n/a")
        lines.append(f"| {k} | {r['status']} | {row_load} | {_fmt(r['first-round-s'], 1)} | {r['warm-rounds-s']} | "
                     f"**{_fmt(r['median-warm-round-s'])}** | {_fmt(r['eval-round-s'])} | {_fmt(r['mean-warm-round-s'])} | {start} | "
                     f"{r['payload-up']:,.0f} / {r['payload-down']:,.0f} | {wire} | "
                     f"{', '.join(x[:8] for x in r['train-loss'])} |")
    return "\n".join(lines)


class SavedResults(dict):
    """The results so far, rewritten to ``<out>/results.json`` after every setting (a long run that
    fails in its last setting keeps the others)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.cold: float | None = None

    def __setitem__(self, key: str, value: dict) -> None:
        super().__setitem__(key, value)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({"cold-import-s": self.cold, **self}, indent=1, default=str))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="/tmp/bench-deploy")
    ap.add_argument("--only", choices=["2", "2warm", "6", "6warm", "links", "nodewait", "evalfold"], default=None)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    results = SavedResults(out / "results.json")
    cold = results.cold = cold_import_s() if a.only in (None, "2") else None
    half = "fraction-train=0.5 fraction-evaluate=0.5"
    if a.only in (None, "2"):
        results["2 nodes, today"] = deployment(out, "today2", 2, 4, a.rounds, half, TODAY)
    if a.only in (None, "2", "2warm"):
        results["2 nodes, warm"] = deployment(out, "warm2", 2, 4, a.rounds, half, WARM)
    if a.only in (None, "2"):
        results["2-of-4 simulation"] = simulation(out, "sim2", 4, a.rounds, half)
    if a.only in (None, "6"):
        results["6 nodes, today"] = deployment(out, "today6", 6, 6, a.rounds, "", TODAY)
    if a.only in (None, "6", "6warm"):
        results["6 nodes, warm"] = deployment(out, "warm6", 6, 6, a.rounds, "", WARM)
    if a.only in (None, "6"):
        results["6-client simulation"] = simulation(out, "sim6", 6, a.rounds, "")
    if a.only in (None, "evalfold"):  # every 2nd round evaluates: folded into the next round vs separate
        for fold in ("true", "false"):
            results[f"2 nodes, warm, eval-every=2, fold-evaluation={fold}"] = deployment(
                out, f"evalfold-{fold}", 2, 4, a.rounds, f"{half} eval-every=2 fold-evaluation={fold}", WARM)
    if a.only in (None, "nodewait"):  # what the SuperNode's fixed 3 s idle wait costs on its own
        results["2 nodes, warm executor, stock SuperNode waits"] = deployment(out, "nodewait2", 2, 4, a.rounds, half,
                                                                             WARM_STOCK_WAITS)
    if a.only in (None, "links"):
        for delay, rate in LINKS:
            label = f"2 nodes, warm, link {delay * 1000:.0f} ms one way, " + (
                f"{rate / 1e6:g} Mbit/s" if rate else "unlimited")
            results[label] = deployment(out, f"link{int(delay * 1000)}", 2, 4, a.rounds, half, WARM, delay, rate)
    text = report(results, cold, started)
    print(text)
    (out / "results.md").write_text(text + "\n")
    results.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
