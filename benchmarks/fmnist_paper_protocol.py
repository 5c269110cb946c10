"""FLoRAL at the paper's MNIST protocol on Fashion-MNIST, in-process (results_fmnist/README.md).

Runs ``run_inline`` with 300 clients for every (method, seed) and prints one CSV row each
(accuracy, worst 10 %, cluster ARI, first evaluation round with ARI >= 0.9, wall seconds).
The task's preset is the paper's protocol (300 clients, 10 % per round, 500 rounds, batch 32,
lr 0.1, MLP 784-200-10); ``--set key=value`` overrides run-config keys (the ablation)::

    python benchmarks/fmnist_paper_protocol.py --data-dir DIR --task mnist-label-shift \\
        --methods floral,floral-oracle --seeds 5,6,7 [--set adaptor-init=zero] [--csv out.csv]

``DIR`` holds Fashion-MNIST as ``train.parquet`` / ``test.parquet`` in the hub schema the MNIST
tasks read (the data command writes it). One run takes ~2.5-4 min on an idle core.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ["task", "method", "seed", "set", "accuracy", "worst10", "ari", "ari_ge_0.9_from", "wall_s"]


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def first_round_ari(run_dir: Path, threshold: float = 0.9) -> str:
    """First evaluated round whose cluster ARI reaches ``threshold`` ('never' if none)."""
    with open(run_dir / "rounds.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("cluster-ari") and float(row["cluster-ari"]) >= threshold:
                return row["round"]
    return "never"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", default="mnist-label-shift")
    ap.add_argument("--methods", default="floral,floral-oracle")
    ap.add_argument("--seeds", default="5,6,7")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--csv", default="")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # two spinning intra-op threads on a loaded machine cost ~10x
    from floral_flwr.inline import run_inline

    overrides = dict(kv.split("=", 1) for kv in args.set)
    out = tempfile.mkdtemp(prefix="fmnist-protocol-")
    writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS)
    writer.writeheader()
    rows = []
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.task}-{method}-s{seed}"
            cfg = {"task": args.task, "method": method, "seed": seed, "data-dir": args.data_dir,
                   "output-dir": out, "run-name": name, "eval-every": args.eval_every,
                   "num-threads": 1, "persist-client-state": False,
                   **{k: _value(v) for k, v in overrides.items()}}
            t0 = time.time()
            summary, _ = run_inline(cfg, 300)
            f = summary["final"]
            row = {"task": args.task, "method": method, "seed": seed, "set": " ".join(args.set),
                   "accuracy": round(f.get("accuracy-mean", float("nan")), 4),
                   "worst10": round(f.get("accuracy-worst10", float("nan")), 4),
                   "ari": round(f.get("cluster-ari", float("nan")), 3),
                   "ari_ge_0.9_from": first_round_ari(Path(out) / name) if "cluster-ari" in f else "",
                   "wall_s": round(time.time() - t0)}
            writer.writerow(row)
            sys.stdout.flush()
            rows.append(row)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
