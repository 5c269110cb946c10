"""How many local steps does a client that never trained need to fit what is personal?

Trains each method with ``holdout-clients`` (those clients are never sampled), then, from the final
global state, lets every held-out client fit only its personal part (FLoRAL: the C mixture logits)
with the shared weights frozen for s = 0, 1, 2, 5, ... steps (``ModelHandle.adapt``, the same code
the ClientApp runs at evaluation) and reports the mean test metric of the held-out clients after s
steps, next to the trained clients' personalized metric.

    OMP_NUM_THREADS=1 python benchmarks/bench_holdout.py --task digits-label-shift --rounds 60 \
        --methods floral ensemble local-adaptor --out /tmp/holdout
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from floral_flwr.methods.training import evaluate_local
from floral_flwr.config import parse_run_config
from floral_flwr.holdout import holdout_clients
from floral_flwr.inline import run_inline
from floral_flwr.methods import build_handle
from floral_flwr.results import load_npz
from floral_flwr.tasks import get_task, task_defaults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits-label-shift")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--methods", nargs="+", default=["floral", "ensemble", "local-adaptor"])
    ap.add_argument("--steps", nargs="+", type=int, default=[0, 1, 2, 5, 10, 20, 50, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/holdout")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    K = int(task_defaults(args.task).get("num-clients", 20))
    results = {}
    for method in args.methods:
        cfg = {"task": args.task, "method": method, "seed": args.seed, "num-server-rounds": args.rounds,
               "eval-every": args.rounds, "holdout-clients": args.holdout, "adapt-steps": 0,
               "output-dir": args.out, "run-name": f"{args.task}-{method}-holdout",
               "aggregation": "mean"}  # as measured before secure aggregation became the default
        t0 = time.monotonic()
        summary, _ = run_inline(cfg, K)
        train_s = time.monotonic() - t0
        run_dir = Path(summary["run-dir"])
        state = load_npz(sorted((run_dir / "checkpoint").glob("state-*.npz"))[-1])
        rc = parse_run_config(cfg)
        task = get_task(args.task, num_clients=K, seed=args.seed)
        handle = build_handle(rc, task.build_model)
        handle.bind_task(task)
        metric = task.metric
        held = sorted(holdout_clients(K, args.holdout, args.seed, [task.cluster_of(i) for i in range(K)]))
        curve = {}
        adapt_ms = {}
        for s in args.steps:
            vals, secs = [], 0.0
            for cid in held:
                data = task.client_data(cid)
                handle.load_shared_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
                handle.reset_private()
                handle.prepare_zero_shot(data.train_x, data.train_y, task.loss_fn, rc)
                t1 = time.perf_counter()
                handle.adapt(data.train_x, data.train_y, task.loss_fn, rc, steps=s)
                secs += time.perf_counter() - t1
                vals.append(evaluate_local(handle, data.test_x, data.test_y, task.loss_fn, metric)[1])
            curve[s] = sum(vals) / len(vals)
            adapt_ms[s] = 1000 * secs / len(held)
        f = summary["final"]
        results[method] = {"trained": f.get(f"{metric}-mean"), "holdout": curve, "adapt-ms": adapt_ms,
                           "train-s": train_s, "held-out": held}
        print(method, json.dumps(results[method]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"holdout-{args.task}.json").write_text(json.dumps(results, indent=1))
    lines = [f"task {args.task}, {args.rounds} rounds, {len(held)} of {K} clients held out, seed {args.seed}",
             "", "| method | trained clients | " + " | ".join(f"{s} steps" for s in args.steps) + " |",
             "|---|---|" + "---|" * len(args.steps)]
    for m, r in results.items():
        lines.append(f"| {m} | {r['trained']:.3f} | " + " | ".join(f"{r['holdout'][s]:.3f}" for s in args.steps) + " |")
    lines += ["", "adaptation time per client (ms): " + "; ".join(
        f"{m}: " + ", ".join(f"{s}->{r['adapt-ms'][s]:.0f}" for s in args.steps) for m, r in results.items())]
    (out / f"holdout-{args.task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
