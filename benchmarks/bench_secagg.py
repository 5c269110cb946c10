"""What secure aggregation costs per round: ``mean`` vs ``sum-only`` vs ``secagg``, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_secagg.py [--clients 20] [--rounds 4] \\
        [--repeats 2] [--cifar-train 64] [--workloads digits cifar10] [--modes ...] [--markdown out.md]

Workloads (the project's real ServerApp logic and ClientApp, in-process through the inline
engine, i.e. Flower's protobuf round trip per message and Flower's SecAgg+ workflow and mod):

* ``digits``: ``digits-label-shift``, FLoRAL C = 4 (the default job), ``--clients`` clients;
* ``cifar10``: ``cifar10-label-shift`` (the CIFAR-10 CNN with FLoRAL C = 4) on synthetic images
  (``write_fake_dataset``: ``--cifar-train`` random images per client, the hub schema; the real
  task has 2500 per client).

Modes: ``mean``, ``sum-only``, ``secagg`` (default neighbourhood k = min(N, 5)) and ``secagg``
with k = 3 and k = 11 (``secagg-num-shares``).

Every repetition runs the three aggregation modes one after the other (the order rotates) with
the same clients, seed and rounds; evaluation only in the last round. Per training round
(rounds 2..R-1: round 1 builds each client's model and data, round R also evaluates and, under
secagg, runs the ARI tally):

* ``round``: the train phase (``RoundStats.seconds_train``: sample, send, every stage, aggregate);
* ``client``: time inside the ClientApp for train-type messages (local SGD, encoding, Flower's
  key agreement, secret sharing and masking in secagg's four stages);
* ``server``: ``RoundStats.seconds_aggregate`` (validate + accumulate; secagg: the workflow's own
  work outside waiting for clients, i.e. routing keys and shares, unmasking, plus decoding);
* ``other``: ``round - client - server`` (protobuf round trips, sampling);
* ``up`` / ``down``: payload bytes per round (arrays; secagg: every stage's keys, shares and the
  masked vectors).

The table gives the median over rounds and repetitions and the ratio to ``mean`` of each
repetition's median round (median over repetitions).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# label -> run-config overrides; secagg at the default neighbourhood (k = min(N, 5)) and at the
# two ends of the cost range (k = 3: Flower's example; k = 11: 2 ceil(log2 N) + 1 at N = 20)
MODES: dict[str, dict[str, Any]] = {
    "mean": {"aggregation": "mean"},
    "sum-only": {"aggregation": "sum-only"},
    "secagg": {"aggregation": "secagg"},
    "secagg k=3": {"aggregation": "secagg", "secagg-num-shares": 3},
    "secagg k=11": {"aggregation": "secagg", "secagg-num-shares": 11},
}


def timed_grid(cfg: dict[str, Any], clients: int):
    """The inline grid, timing the ClientApp per message type."""
    from floral_flwr.client import make_client_app
    from floral_flwr.inline import InlineGrid

    grid = InlineGrid(make_client_app(cfg), clients)
    inner = grid.client_app
    grid.client_s = {"train": 0.0}

    def timed(msg, context):
        t0 = time.perf_counter()
        try:
            return inner(msg, context)
        finally:
            kind = msg.metadata.message_type
            grid.client_s[kind] = grid.client_s.get(kind, 0.0) + time.perf_counter() - t0

    grid.client_app = timed
    return grid


def run_once(cfg: dict[str, Any], clients: int) -> list[dict[str, float]]:
    """One run; per-round stats of the training phase."""
    from floral_flwr.server import run_server

    grid = timed_grid(cfg, clients)
    rows: list[dict[str, float]] = []
    seen = {"train": 0.0}

    def hook(rnd: int, strategy: Any) -> None:
        s = strategy.stats
        client = grid.client_s["train"] - seen["train"]
        seen["train"] = grid.client_s["train"]
        rows.append({"round": rnd, "round_s": s.seconds_train, "client_s": client,
                     "server_s": s.seconds_aggregate, "other_s": s.seconds_train - client - s.seconds_aggregate,
                     "up": s.bytes_up, "down": s.bytes_down, "received": s.received})

    run_server(grid, cfg, round_hook=hook)
    return rows


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in rows[0] if k != "round"]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def workload_config(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base: dict[str, Any] = {
        "num-server-rounds": args.rounds, "eval-every": 10**6, "fraction-train": 1.0,
        "fraction-evaluate": 1.0, "min-available-nodes": args.clients, "num-threads": 1,
        "output-dir": str(work / "runs"), "persist-client-state": False, "seed": 0,
    }
    if name == "digits":
        return {**base, "task": "digits-label-shift"}
    if name == "cifar10":
        from floral_flwr.tasks.sources import write_fake_dataset

        data = work / "data"
        if not (data / "cifar10").exists():
            write_fake_dataset("cifar10", data / "cifar10", num_train=args.cifar_train * args.clients,
                               num_test=10 * args.clients)
        return {**base, "task": "cifar10-label-shift", "data-dir": str(data), "local-epochs": 1}
    raise SystemExit(f"unknown workload {name!r}: allowed digits, cifar10")


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cifar-train", type=int, default=64, help="synthetic CIFAR-10 train images per client")
    ap.add_argument("--workloads", nargs="*", default=["digits", "cifar10"])
    ap.add_argument("--modes", nargs="*", default=list(MODES), help=f"of {list(MODES)}")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be >= 3 (round 1 and the last round are not measured)")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    print(f"load average at start {os.getloadavg()}", flush=True)
    lines = [f"Per training round, {args.clients} clients, rounds 2..{args.rounds - 1}, {args.repeats} "
             f"repetitions, in-process (inline engine); load average at start "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.", ""]
    for name in args.workloads:
        cfg = workload_config(name, args, work)
        modes = [m for m in MODES if m in args.modes]
        per_mode: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            order = modes[rep % len(modes):] + modes[: rep % len(modes)]
            for mode in order:
                t0 = time.perf_counter()
                run_name = f"{name}-{mode.replace(' ', '-').replace('=', '')}-{rep}"
                rows = run_once({**cfg, **MODES[mode], "run-name": run_name}, args.clients)
                med = median_rows(rows[1:-1])  # round 1 builds the setups; the last evaluates
                per_mode[mode].append(med)
                print(f"{name} rep {rep + 1} {mode:8s} ({time.perf_counter() - t0:.0f} s): "
                      + " ".join(f"{k} {v:.4g}" for k, v in med.items()), flush=True)
        lines += [f"### {name} ({cfg['task']})", "",
                  "| mode | round s | client s | server s | other s | up / round | down / round | round / mean |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode in modes:
            meds = per_mode[mode]
            m = {k: statistics.median(r[k] for r in meds) for k in meds[0]}
            ratio = statistics.median(r["round_s"] / b["round_s"] for r, b in zip(meds, per_mode["mean"]))
            lines.append(f"| `{mode}` | {m['round_s']:.3f} | {m['client_s']:.3f} | {m['server_s']:.3f} | "
                         f"{m['other_s']:.3f} | {fmt_bytes(m['up'])} | {fmt_bytes(m['down'])} | {ratio:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
