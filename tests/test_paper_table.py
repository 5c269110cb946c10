"""benchmarks/paper_table.py: the paper-scale table's numbers against an independent computation."""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_table  # noqa: E402

FIELDS = ["task", "method", "seed", "metric", "value", "worst10", "cluster-ari", "round-s"]


def _write(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIELDS)
        w.writerows(rows)
    return path


def test_mean_sample_std_paper_column_and_ari_only_where_a_cluster_is_chosen(tmp_path):
    a = _write(tmp_path / "a.csv", [
        ["fmnist-label-shift", "floral", 5, "accuracy", 0.80, 0.6, 1.0, 0.4],
        ["fmnist-label-shift", "floral", 6, "accuracy", 0.90, 0.7, 0.5, 0.4],
        ["fmnist-label-shift", "fedavg", 5, "accuracy", 0.20, 0.0, "", 0.2],
    ])
    b = _write(tmp_path / "b.csv", [  # a later piece of the sweep: seed 7, and seed 6 run again
        ["fmnist-label-shift", "floral", 7, "accuracy", 0.85, 0.65, 1.0, 0.4],
        ["fmnist-label-shift", "floral", 6, "accuracy", 0.95, 0.7, 1.0, 0.4],
        ["fmnist-label-shift", "fedavg", 6, "accuracy", 0.30, 0.0, 0.3, 0.2],
    ])
    lines = paper_table.table(paper_table.load([a, b]), ["floral", "fedavg"])
    floral = next(l for l in lines if l.startswith("| floral |"))
    fedavg = next(l for l in lines if l.startswith("| fedavg |"))
    accs = [80.0, 95.0, 85.0]  # seed 6 from the later file
    assert f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f} (n=3)" in floral
    assert "80.0 / 95.0 / 85.0 (seeds 5,6,7)" in floral
    assert "1.00 / 1.00 / 1.00" in floral and "89.7 (3.2)" in floral  # the paper's MNIST-LS FLoRAL(1%)
    assert "| – | 25.8 (2.4) |" in fedavg  # no ARI for a method without a cluster choice
    assert any("MNIST-LS protocol" in l for l in lines)
    noted = paper_table.table(paper_table.load([a]), ["floral"], {"fmnist-label-shift": "Fashion-MNIST"})
    assert noted[0] == "### fmnist-label-shift (Fashion-MNIST), the paper's MNIST-LS protocol"
