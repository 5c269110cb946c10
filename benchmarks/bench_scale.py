"""Scale: a Ray simulation with many clients (fraction-train 0.05), peak RSS of all processes.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py \\
        [--task synthetic-mlp] [--clients 100 1000] [--rounds 10] [--method floral] [--markdown out.md]

For every client count, one ``flwr.simulation.run_simulation`` of the project's ServerApp and
ClientApp (fraction-train 0.05, fraction-evaluate 0.05, evaluation only in the last round,
2 concurrent ClientApps of 1 CPU). A sampler thread reads /proc every 0.5 s and sums the RSS of
this process and all its descendants (the ServerApp runs in this process; Ray's GCS, raylet,
dashboard and the ClientApp actors are descendants): ``peak`` is the maximum of that sum; RSS
counts shared pages (torch libraries) once per process, so it over-states the real footprint in
the same way for every client count. Reported with the median seconds per training round
(round 1 excluded) and what the ClientApp processes cached: set-ups built (model + data) and the
number of distinct clients they served.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_round import Collector, machine, timed_client_app  # noqa: E402


def tree_rss_mb(root: int) -> tuple[float, int]:
    """Summed RSS (MiB) of ``root`` and its descendants, and the number of processes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid = int(parts[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, count, stack = 0, 0, [root]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        count += 1
        stack.extend(children.get(p, []))
    return total / 2**20, count


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.procs, self.stop = 0.0, 0, False
        self.samples: list[float] = []

    def run(self) -> None:
        while not self.stop:
            mb, n = tree_rss_mb(os.getpid())
            self.samples.append(mb)
            if mb > self.peak:
                self.peak, self.procs = mb, n
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="synthetic-mlp")
    ap.add_argument("--method", default="floral")
    ap.add_argument("--clients", nargs="+", type=int, default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from flwr.simulation import run_simulation

    from floral_flwr.server import make_server_app

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    for n in args.clients:
        cfg = {"task": args.task, "method": args.method, "num-server-rounds": args.rounds,
               "eval-every": 10**6, "fraction-train": args.fraction, "fraction-evaluate": args.fraction,
               "min-available-nodes": n, "output-dir": str(work), "run-name": f"n{n}",
               "node-wait-timeout": 600.0, "aggregation": "mean"}  # one message per client and round
        base_mb, _ = tree_rss_mb(os.getpid())
        sampler = Sampler()
        sampler.start()
        col = Collector()
        restore = col.install()
        t0 = time.perf_counter()
        try:
            run_simulation(make_server_app(cfg), timed_client_app(cfg), num_supernodes=n,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": args.concurrency}})
        finally:
            restore()
            sampler.stop = True
            sampler.join()
        wall = time.perf_counter() - t0
        train = [r for r in col.rounds if r["round"] > 1 and not r["eval"]]
        per_round = statistics.median(r["train_s"] for r in train) if train else float("nan")
        clients = [c for r in col.rounds for c in r["clients"]]
        setups = {(int(c["bench-pid"]), int(c["bench-setup-id"])) for c in clients}
        sampled = sum(r["received"] for r in col.rounds)
        row = dict(clients=n, wall=wall, per_round=per_round, peak=sampler.peak, procs=sampler.procs,
                   base=base_mb, setups=len(setups), sampled=sampled,
                   per_train_round=statistics.median(len(r["clients"]) for r in train) if train else 0)
        rows.append(row)
        print(row, flush=True)

    lines = [f"`{' '.join(sys.argv)}`", "",
             f"task {args.task}, method {args.method}, fraction-train {args.fraction}, {args.rounds} rounds, "
             f"{args.concurrency} concurrent ClientApps; {machine()}", "",
             "| clients | replies per round | s per train round (median) | peak RSS all processes (MiB) | processes at peak | RSS before start (MiB) | ClientApp set-ups built | train replies over the run | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['per_train_round']:.0f} | {r['per_round']:.3f} | {r['peak']:.0f} | "
                     f"{r['procs']} | {r['base']:.0f} | {r['setups']} | {r['sampled']} | {r['wall']:.0f} |")
    if len(rows) > 1:
        lines.append("")
        lines.append(f"peak RSS ratio {rows[-1]['clients']} vs {rows[0]['clients']} clients: "
                     f"{rows[-1]['peak'] / rows[0]['peak']:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
