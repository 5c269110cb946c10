"""The paper-scale comparison table beside the paper's own columns (benchmarks/RESULTS_paper.md).

Reads the ``comparison.csv`` files that ``python -m floral_flwr.compare`` writes (one row per
finished run; a sweep still running or resumed later is fine: only finished runs are rows) and
prints, per task and method, mean +- sample std (n - 1) over seeds, the worst 10 % of clients,
the cluster ARI where the method chooses a cluster or a mixture, and the paper's value for the
matching column (``floral-method.md`` §4, Table 1: the paper ran MNIST, we run Fashion-MNIST
with the same protocol, so the columns are the same *protocol*, not the same data)::

    python benchmarks/paper_table.py RUNDIR/comparison.csv [MORE.csv ...] > benchmarks/RESULTS_paper.md
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from floral_flwr.compare_tune import _mean_std  # noqa: E402

# The paper's Table 1 (floral-method.md §4), accuracy %, mean (std) over seeds 0-2: our task
# -> the paper's column with the same protocol; our method -> the paper's row.
PAPER_COLUMN = {"fmnist-rotate": "MNIST-Rot", "fmnist-label-shift": "MNIST-LS",
                "fmnist-rotate-reduced": "MNIST-Rot 5%", "fmnist-label-shift-reduced": "MNIST-LS 5%",
                "mnist-label-shift": "MNIST-LS", "mnist-rotate": "MNIST-Rot"}
PAPER: dict[str, dict[str, str]] = {
    "fedavg": {"MNIST-Rot": "91.5 (0.6)", "MNIST-LS": "25.8 (2.4)", "MNIST-Rot 5%": "78.2 (0.6)", "MNIST-LS 5%": "23.2 (0.9)"},
    "local-adaptor": {"MNIST-Rot": "86.6 (0.3)", "MNIST-LS": "84.5 (1.8)", "MNIST-Rot 5%": "47.4 (5.4)", "MNIST-LS 5%": "32.0 (2.3)"},
    "ensemble": {"MNIST-Rot": "92.0 (0.1)", "MNIST-LS": "93.8 (0.5)", "MNIST-Rot 5%": "66.7 (5.3)", "MNIST-LS 5%": "86.4 (0.4)"},
    "ensemble-oracle": {"MNIST-Rot": "95.8 (0.3)", "MNIST-LS": "95.6 (0.3)", "MNIST-Rot 5%": "88.2 (1.4)", "MNIST-LS 5%": "87.6 (1.3)"},
    "floral": {"MNIST-Rot": "91.3 (0.6)", "MNIST-LS": "89.7 (3.2)", "MNIST-Rot 5%": "73.1 (3.7)", "MNIST-LS 5%": "46.0 (9.9)"},
    "floral-oracle": {"MNIST-Rot": "93.9 (0.8)", "MNIST-LS": "93.7 (0.2)", "MNIST-Rot 5%": "87.3 (1.5)", "MNIST-LS 5%": "87.6 (0.5)"},
}
# methods whose clients choose a cluster or hold a mixture: their ARI is meaningful
CHOOSES = ("floral", "ensemble", "ifca", "fedem", "floral-oracle", "ensemble-oracle")


def _f(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def load(paths: list[Path]) -> list[dict[str, str]]:
    """Rows of all files; a (task, method, seed) seen twice keeps the last file's row."""
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    for p in paths:
        with p.open() as fh:
            for r in csv.DictReader(fh):
                rows[(r["task"], r["method"], r["seed"])] = r
    return list(rows.values())


def table(rows: list[dict[str, str]], methods: list[str] | None = None,
          notes: dict[str, str] | None = None) -> list[str]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    order = methods or list(dict.fromkeys(r["method"] for r in rows))
    out: list[str] = []
    for t in tasks:
        col = PAPER_COLUMN.get(t, "")
        note = (notes or {}).get(t, "")
        out += [f"### {t}" + (f" ({note})" if note else "") + (f", the paper's {col} protocol" if col else ""), "",
                "| method | accuracy % | per seed | worst 10 % | ARI | paper " + (col or "") + " | s/round |",
                "|---|---|---|---|---|---|---|"]
        for m in order:
            rs = sorted((r for r in rows if r["task"] == t and r["method"] == m), key=lambda r: int(r["seed"]))
            if not rs:
                continue
            acc = [_f(r["value"]) for r in rs]
            mu, sd = _mean_std(acc)
            w_mu, _ = _mean_std([_f(r["worst10"]) for r in rs])
            ari = [_f(r.get("cluster-ari", "")) for r in rs]
            ari_s = " / ".join("–" if math.isnan(a) else f"{a:.2f}" for a in ari) if m in CHOOSES else "–"
            per_seed = " / ".join(f"{100 * a:.1f}" for a in acc)
            seeds = ",".join(r["seed"] for r in rs)
            rs_mu, _ = _mean_std([_f(r.get("round-s", "")) for r in rs])
            paper = PAPER.get(m, {}).get(col, "–")
            spread = f"{100 * mu:.1f} ± {100 * sd:.1f}" if len(rs) > 1 else f"{100 * mu:.1f}"  # no std of one
            out.append(f"| {m} | {spread} (n={len(rs)}) | {per_seed} (seeds {seeds}) | "
                       f"{100 * w_mu:.1f} | {ari_s} | {paper} | {rs_mu:.2f} |")
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--methods", nargs="*", default=None, help="row order (default: as found)")
    ap.add_argument("--note", action="append", default=[], metavar="TASK=TEXT",
                    help="a note after a task's heading, e.g. the data it ran on")
    args = ap.parse_args(argv)
    notes = dict(n.split("=", 1) for n in args.note)
    print("\n".join(table(load(args.csv), args.methods, notes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
