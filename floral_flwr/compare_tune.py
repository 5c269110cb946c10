"""The tuning protocol of ``python -m floral_flwr.compare --tune``: the grid, the choice per task
and method on the validation split, and its record (``tuning.csv`` / ``tuning.json``); plus the
small helpers the comparison runner shares with it (value parsing, mean and sample std).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

# run-config keys that say where a run goes, not what it computes
_PLACEMENT_KEYS = ("output-dir", "run-name", "resume")


def _parse_value(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v.strip("'\"")


def write_rows_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV, one column per key any row has (in the order the keys first appear)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; sd 0 for one value."""
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mu, sd


# keys a --tune grid may not vary: what is compared, how it is seeded and split, where it goes
_UNTUNABLE = ("task", "method", "seed", "validation-fraction", *_PLACEMENT_KEYS)


def parse_grid(specs: list[str]) -> list[dict[str, Any]]:
    """``["mixture-lr=0.3,1,3", "lr=0.05,0.1"]`` -> the 6 points of the product, in order.

    Raises ``ConfigError`` naming an unknown key and its nearest key (the config validator's
    message), or a bad value (the key's reader)."""
    from floral_flwr.config import ConfigError, check_keys, precheck_run_config

    axes: list[tuple[str, list[Any]]] = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--tune expects KEY=V1,V2,..., got {spec!r}")
        key, vals = spec.split("=", 1)
        key = key.strip()
        check_keys({key: None})
        if key in _UNTUNABLE:
            raise ConfigError(f"--tune: {key!r} cannot be tuned (allowed: any run-config key but "
                              f"{', '.join(_UNTUNABLE)})")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--tune: {key!r} is given twice")
        values = [_parse_value(v) for v in vals.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--tune: {key!r} has no values")
        for v in values:
            precheck_run_config({key: v})
        axes.append((key, values))
    points: list[dict[str, Any]] = [{}]
    for key, values in axes:
        points = [{**pt, key: v} for pt in points for v in values]
    return points


def point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "(preset)"


def _better(a: float, b: float, metric: str) -> bool:
    """a strictly better than b (NaN is worst)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if metric == "mse" else a > b


def choose(tuning_rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (task, method): the grid point with the best mean validation metric over the tuning
    seeds (ties: the earlier point). A point with a failed run counts as failed (NaN)."""
    by: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in tuning_rows:
        by.setdefault((r["task"], r["method"], r["point"]), []).append(r)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for (t, m, i), rs in sorted(by.items(), key=lambda kv: kv[0]):
        vals = [r["value"] for r in rs]
        mu, sd = _mean_std(vals)
        if any(not (isinstance(v, (int, float)) and math.isfinite(v)) for v in vals):
            mu = float("nan")
        metric = rs[0]["metric"]
        entry = {"point": i, "values": points[i], "validation-mean": mu, "validation-std": sd,
                 "n": len(rs), "metric": metric}
        cur = chosen.get((t, m))
        if cur is None or _better(mu, cur["validation-mean"], metric):
            chosen[(t, m)] = entry
    return chosen


def write_tuning(rows: list[dict[str, Any]], chosen: dict[tuple[str, str], dict[str, Any]],
                 points: list[dict[str, Any]], tune_seeds: list[int], fraction: float, out: Path) -> None:
    """``tuning.csv`` (one row per tuning run, metric on the validation split) and
    ``tuning.json`` (the grid, the seeds, and the choice per task and method)."""
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out / "tuning.csv", rows)
    doc = {
        "grid": points, "tune-seeds": tune_seeds, "validation-fraction": fraction,
        "selection": "best mean validation metric over the tune seeds (accuracy: highest, mse: lowest)",
        "chosen": {f"{t}/{m}": {**c, "label": point_label(c["values"])} for (t, m), c in chosen.items()},
    }
    tmp = out / "tuning.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out / "tuning.json")
