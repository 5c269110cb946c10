"""Bit-identity check for refactors: a few short in-process runs, hashed array by array.

    PYTHONPATH=$PWD python benchmarks/check_identical.py before.json
    ... change the code ...
    PYTHONPATH=$PWD python benchmarks/check_identical.py after.json --compare before.json

Each run (:func:`floral_flwr.inline.run_inline`, 8 clients, 6 rounds, evaluation every 2) writes
its final checkpoint (the global state and the server-optimizer state; both depend on every
earlier round) and the clients' private states. The JSON holds the sha256 of every array of every
``.npz`` in the run directory (over dtype, shape and the raw bytes) and of the results with
timings and paths dropped: ``rounds.csv`` (per round: train loss, sampling counts, failures,
bytes, evaluation summary), ``clients.csv`` (every client's personalized metric and mixture on
each evaluation round) and ``summary.json`` (final and holdout summaries, failure counts).
``--compare OLD.json`` exits with status 1 and names every entry that differs, is missing or is
new.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from floral_flwr.inline import run_inline  # noqa: E402
from floral_flwr.results import load_npz  # noqa: E402

NUM_CLIENTS = 8
BASE: dict[str, Any] = {
    "task": "digits-label-shift", "num-server-rounds": 6, "eval-every": 2, "batch-size": 16,
    "min-available-nodes": 1, "mixture-lr": 2.0,
    "aggregation": "mean",  # the plaintext path (secagg's rounding noise is seeded but not bitwise 'mean')
}
# name -> run config on top of BASE; together they touch every part of the server round:
# plain FLoRAL, a server optimizer with moments (FedAdam) and one with a momentum vector plus
# seeded sub-sampling (FedAvgM at fraction 0.5), a baseline (IFCA), sum-only replies with
# held-out clients (holdout summaries).
RUNS: dict[str, dict[str, Any]] = {
    "floral": {"method": "floral"},
    "floral-fedadam": {"method": "floral", "server-optimizer": "fedadam", "server-lr": 0.01},
    "floral-fedavgm-half": {"method": "floral", "server-optimizer": "fedavgm", "fraction-train": 0.5},
    "ifca": {"method": "ifca"},
    "floral-sum-only-holdout": {"method": "floral", "aggregation": "sum-only", "holdout-clients": 0.25},
}
TIMING_COLUMNS = {"elapsed-s", "round-s"}
MACHINE_SUMMARY_KEYS = {"wall-time-s", "mean-round-s", "run-dir"}  # timings and this machine's paths


def _array_digest(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _table_digest(path: Path) -> str:
    """sha256 of a CSV with its timing columns removed (those differ between any two runs)."""
    if not path.exists():
        return "absent"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    for row in rows:
        out.write(",".join(f"{k}={v}" for k, v in row.items() if k not in TIMING_COLUMNS) + "\n")
    return hashlib.sha256(out.getvalue().encode()).hexdigest()


def digest_run(run_dir: Path) -> dict[str, str]:
    """Every array of every ``.npz`` of the run (final checkpoint, client private states), plus
    the result tables, as name -> sha256."""
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    out: dict[str, str] = {"checkpoint-round": str(int(meta["round"]))}
    for path in sorted(run_dir.rglob("*.npz")):
        name = path.relative_to(run_dir).as_posix()
        out.update({f"{name}:{k}": _array_digest(v) for k, v in sorted(load_npz(path).items())})
    for table in ("rounds.csv", "clients.csv"):
        out[table] = _table_digest(run_dir / table)
    summary = json.loads((run_dir / "summary.json").read_text())
    kept = {k: v for k, v in summary.items() if k not in MACHINE_SUMMARY_KEYS}
    out["summary.json"] = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return out


def run_all(names: list[str]) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = {**BASE, **RUNS[name], "output-dir": tmp, "run-name": name}
            run_inline(cfg, NUM_CLIENTS)
            result[name] = digest_run(Path(tmp) / name)
            print(f"[check_identical] {name}: {len(result[name]) - 4} arrays hashed", flush=True)
    return result


def compare(new: dict[str, dict[str, str]], old: dict[str, dict[str, str]]) -> list[str]:
    """Human-readable differences; empty when every entry of every run is identical."""
    diffs = []
    for run in sorted(set(old) | set(new)):
        if run not in new or run not in old:
            diffs.append(f"{run}: only in {'old' if run in old else 'new'}")
            continue
        for key in sorted(set(old[run]) | set(new[run])):
            a, b = old[run].get(key, "missing"), new[run].get(key, "missing")
            if a != b:
                diffs.append(f"{run}: {key} old={a[:12]} new={b[:12]}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the JSON of digests")
    parser.add_argument("--compare", type=Path, metavar="OLD.json", help="digests of the old code")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args(argv)
    new = run_all(args.runs)
    args.output.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    old = json.loads(args.compare.read_text())
    diffs = compare(new, {k: v for k, v in old.items() if k in new})
    n = sum(len(v) for v in new.values())
    if diffs:
        print(f"[check_identical] DIFFERENT: {len(diffs)} of {n} entries", *diffs, sep="\n")
        return 1
    print(f"[check_identical] IDENTICAL: {n} entries over {len(new)} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
