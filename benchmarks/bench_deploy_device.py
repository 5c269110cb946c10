"""A loopback deployment whose SuperNodes share one device: FedAvg vs FLoRAL, samples/s and memory.

    python benchmarks/bench_deploy_device.py --device cuda [--nodes 4] [--partitions N] [--rounds 4] \\
        [--train-per-node 2048] [--batch-size 64] --work /tmp/dep [--json out.json] [--markdown out.md]

For each method (FedAvg, then FLoRAL with C = 4, rho = 0.1) one throw-away deployment runs through
the deployment CLI only (``python -m floral_flwr.deploy local``: a SuperLink and ``--nodes``
SuperNodes as plain processes on loopback, no Ray, every process stopped by PID afterwards), on
the ``cifar10-label-shift`` task (CIFAR-10 CNN) with random images in the hub schema written to a
local ``data-dir`` (``write_fake_dataset``; no download), split into ``--partitions`` clients
(default ``--nodes``; node i hosts partition i, ``--train-per-node`` rows each). Every node trains
every round (``fraction-train = 1``) for one local epoch; the last round also evaluates.

Reported per method: the run status; the wall time of the whole deployment; each round's seconds
(``rounds.csv``); the *warm* round (median of rounds 2 .. R-1: no set-up, no evaluation; with
fewer rounds the last one); samples/s = the training rows of all clients / warm round seconds;
and with ``--device cuda`` the GPU memory from ``nvidia-smi`` sampled every 0.5 s: the largest
per-process figure (a ClientApp process: CUDA context + allocations; Flower starts one
``flwr-clientapp`` process per message) and the peak of the whole GPU above its idle value.
Exit code 0 only when every run finished with status ``finished:completed``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fedavg", "floral")


class GpuMemorySampler:
    """Polls ``nvidia-smi`` in a thread: per-process used memory (max per pid) and the whole
    GPU's used memory (max), in MiB. Does nothing when ``nvidia-smi`` is absent."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.exe = shutil.which("nvidia-smi")
        self.per_pid: dict[str, float] = {}
        self.total_max = 0.0
        self.idle = self._total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _query(self, *args: str) -> list[list[str]]:
        if self.exe is None:
            return []
        try:
            out = subprocess.run([self.exe, *args, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def _total(self) -> float:
        rows = self._query("--query-gpu=memory.used")
        try:
            return sum(float(r[0]) for r in rows)
        except (ValueError, IndexError):
            return 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            for row in self._query("--query-compute-apps=pid,used_memory"):
                try:
                    self.per_pid[row[0]] = max(self.per_pid.get(row[0], 0.0), float(row[1]))
                except (ValueError, IndexError):
                    continue
            self.total_max = max(self.total_max, self._total())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "GpuMemorySampler":
        if self.exe is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def figures(self) -> dict[str, Any]:
        if self.exe is None:
            return {}
        return {"gpu_mem_per_process_max_mib": max(self.per_pid.values(), default=None),
                "gpu_processes_seen": len(self.per_pid),
                "gpu_mem_total_peak_above_idle_mib": max(0.0, self.total_max - self.idle)}


def run_config(args: argparse.Namespace, method: str, out: Path, data: Path) -> str:
    items = {
        "task": "'cifar10-label-shift'", "method": f"'{method}'", "device": f"'{args.device}'",
        "data-dir": f"'{data}'", "num-server-rounds": args.rounds, "eval-every": args.rounds,
        "fraction-train": 1.0, "fraction-evaluate": 1.0, "min-available-nodes": args.nodes,
        "local-epochs": 1, "batch-size": args.batch_size, "num-adaptors": 4, "rank": 0.1,
        "node-wait-timeout": 120.0, "reply-timeout": float(args.timeout),
        "output-dir": f"'{out}'", "run-name": f"'dep-{method}'",
    }
    return " ".join(f"{k}={v}" for k, v in items.items()) + (f" {args.extra}" if args.extra else "")


def round_seconds(run_dir: Path) -> list[float]:
    path = run_dir / "rounds.csv"
    if not path.exists():
        return []
    return [float(r["round-s"]) for r in csv.DictReader(path.open())]


def warm_round(secs: list[float]) -> float | None:
    """Median of rounds 2 .. R-1 (no set-up, no evaluation); with fewer rounds, the last."""
    if not secs:
        return None
    return statistics.median(secs[1:-1]) if len(secs) >= 3 else secs[-1]


def run_method(args: argparse.Namespace, method: str, data: Path, log) -> dict[str, Any]:
    out = Path(args.work) / "runs"
    cmd = [sys.executable, "-m", "floral_flwr.deploy", "local", "--num-supernodes", str(args.nodes),
           "--num-partitions", str(args.partitions),
           "--work", str(Path(args.work) / f"deploy-{method}"), "--timeout", str(args.timeout),
           "--run-config", run_config(args, method, out, data)]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    with GpuMemorySampler() if args.device == "cuda" else _Null() as sampler:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - t0
    secs = round_seconds(out / f"dep-{method}")
    warm = warm_round(secs)
    train_rows = args.nodes * args.train_per_node
    res: dict[str, Any] = {
        "status": "finished:completed" if proc.returncode == 0 else f"exit code {proc.returncode}",
        "wall_s": wall, "round_s": secs, "warm_round_s": warm,
        "samples_per_s": train_rows / warm if warm else None, "train_rows_per_round": train_rows,
    }
    res.update(sampler.figures())
    return res


class _Null:
    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def figures(self) -> dict[str, Any]:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=0, help="clients the data is split into (default: --nodes)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--train-per-node", type=int, default=2048, help="random training images per SuperNode")
    ap.add_argument("--test-per-node", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per deployment run")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--extra", default="", help="more run config, 'key=value ...'")
    ap.add_argument("--work", required=True, help="scratch: data, deployment work dirs, run outputs")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    args.partitions = args.partitions or args.nodes
    if args.partitions < args.nodes:
        ap.error(f"--partitions {args.partitions} < --nodes {args.nodes}: every node hosts one partition")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from floral_flwr.tasks.sources import write_fake_dataset

    data = work / "data"
    t0 = time.monotonic()
    write_fake_dataset("cifar10", data / "cifar10", num_train=args.partitions * args.train_per_node,
                       num_test=args.partitions * args.test_per_node)
    print(f"wrote {args.partitions * args.train_per_node} random CIFAR-10 training images in "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    results: dict[str, Any] = {}
    with open(work / "deploy.log", "a") as log:
        for method in args.methods:
            results[method] = r = run_method(args, method, data, log)
            print(f"{method}: {r['status']}, wall {r['wall_s']:.0f} s, rounds "
                  f"{', '.join(f'{s:.2f}' for s in r['round_s'])} s, samples/s {r['samples_per_s'] or 0:.0f}"
                  + (f", GPU MiB per process {r.get('gpu_mem_per_process_max_mib')}" if args.device == "cuda" else ""),
                  flush=True)
    if any(r["status"] != "finished:completed" for r in results.values()):
        print((work / "deploy.log").read_text(errors="replace")[-6000:], flush=True)
    lines = [f"loopback deployment, {args.nodes} SuperNodes (clients 0..{args.nodes - 1} of {args.partitions}) "
             f"on one {args.device} device, {args.rounds} rounds, "
             f"cifar10-label-shift (CIFAR-10 CNN) on {args.train_per_node} random images per node, batch "
             f"{args.batch_size}, 1 local epoch",
             "", "| method | status | wall s | round s | warm round s | samples/s | GPU MiB per process (max) |",
             "|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['status']} | {r['wall_s']:.0f} | {', '.join(f'{s:.2f}' for s in r['round_s'])} | "
                     f"{r['warm_round_s'] or 0:.2f} | {r['samples_per_s'] or 0:.0f} | "
                     f"{r.get('gpu_mem_per_process_max_mib', 'n/a')} |")
    if all(results.get(m, {}).get("samples_per_s") for m in METHODS):
        ratio = results["floral"]["samples_per_s"] / results["fedavg"]["samples_per_s"]
        results["floral_over_fedavg_samples_per_s"] = ratio
        lines += ["", f"FLoRAL / FedAvg samples/s: {ratio:.3f}"]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    ok = all(r["status"] == "finished:completed" for m, r in results.items() if m in METHODS)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
