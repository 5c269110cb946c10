"""The comparison runner: every (task, method, seed) through the real apps, one table.

```
python -m floral_flwr.compare --tasks digits-rotate digits-label-shift synthetic-linear synthetic-mlp \
    --methods all --seeds 3 --quick --out comparison/
```

Each run is the real ServerApp logic against the real ClientApp in this process
(:func:`floral_flwr.inline.run_inline`: the same strategy, aggregation, private-state store and
results code as ``flwr run``, without Ray). A run lives in
``<out>/runs/<task>__<method>__seed<s>__<key>``, where ``<key>`` hashes the run's full resolved
config (every key after the task's presets are applied, and the number of clients): another
``--rounds``, ``--clients``, ``--eval-every`` or ``--set`` is another run, never a stale one. A run
is *finished* when its ``summary.json`` exists, so re-running the same command resumes an
interrupted sweep: finished runs are reused (and said to be), a run with a checkpoint resumes
from its last completed round (``resume=true``), anything else restarts; ``--rerun`` runs
everything again. At the end (and after every run) it
writes ``comparison.csv`` (one row per run), ``comparison.md`` (mean ± std over seeds per task and
method, the best cell of each column in bold, as the paper's Table 1; plus wall time and bytes per
round) and ``comparison.png``.

``--quick`` uses small round budgets (``QUICK_ROUNDS``) that fit a 2-core machine in about 15
minutes for the digits and synthetic tasks with all methods and one seed (``--jobs 2`` runs two
runs at a time). Without ``--quick`` each task's preset (the paper's rounds) is used unless
``--rounds`` is given. ``--set key=value`` passes extra run-config keys to every run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from floral_flwr.config import METHODS, nearest

DEFAULT_TASKS = ("digits-rotate", "digits-label-shift", "synthetic-linear", "synthetic-mlp")
# rounds per task with --quick (evaluation at the end only)
QUICK_ROUNDS = {"digits": 20, "synthetic-linear": 100, "synthetic-mlp": 40, "mnist": 20, "cifar": 10}
METHOD_ORDER = ("fedavg", "fedavg-ft", "local-adaptor", "ditto", "feddpa", "ifca", "fedem",
                "ensemble", "ensemble-oracle", "floral", "floral-oracle")


def quick_rounds(task: str) -> int:
    for prefix, r in QUICK_ROUNDS.items():
        if task.startswith(prefix):
            return r
    return 20


# keys that say where a run goes, not what it computes
_PLACEMENT_KEYS = ("output-dir", "run-name", "resume")


def config_key(resolved: dict[str, Any], num_clients: int) -> str:
    """Short hash of what a run computes: its resolved config and its number of clients."""
    what = {k: v for k, v in resolved.items() if k not in _PLACEMENT_KEYS}
    what["num-clients"] = num_clients
    blob = json.dumps(what, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def run_name(task: str, method: str, seed: int, key: str) -> str:
    return f"{task}__{method}__seed{seed}__{key}"


def _parse_value(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v.strip("'\"")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one federation; returns its summary. Runs in a worker process."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from floral_flwr.inline import run_inline

    from floral_flwr.config import parse_run_config

    run_dir = Path(job["output-dir"]) / job["run-name"]
    cfg = dict(job["config"])
    meta = run_dir / "checkpoint" / "meta.json"
    done = -1
    if meta.exists():
        try:
            done = int(json.loads(meta.read_text())["round"])
        except (ValueError, KeyError, OSError):
            done = -1
    if 0 < done < parse_run_config(cfg).num_server_rounds:
        cfg["resume"] = True  # interrupted mid-run: continue from the last completed round
    elif run_dir.exists():
        # nothing usable (or complete but its summary was lost: the final metrics are gone
        # with it), so run again from scratch
        shutil.rmtree(run_dir)
    cfg.update({"output-dir": job["output-dir"], "run-name": job["run-name"]})
    if not job.get("verbose"):
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            summary, _ = run_inline(cfg, job["num-clients"])
    else:
        summary, _ = run_inline(cfg, job["num-clients"])
    return summary


def _row(task: str, method: str, seed: int, summary: dict[str, Any]) -> dict[str, Any]:
    m = summary.get("metric", "accuracy")
    f = summary.get("final", {})
    row = {
        "task": task, "method": method, "seed": seed, "metric": m,
        "value": f.get(f"{m}-mean", float("nan")),
        "worst10": f.get(f"{m}-worst10", float("nan")),
        "cluster-ari": f.get("cluster-ari", ""),
        "rounds": summary.get("rounds"),
        "wall-time-s": summary.get("wall-time-s"),
        "round-s": summary.get("mean-round-s"),
        "bytes-up-per-round": summary.get("bytes-up-per-round"),
        "bytes-down-per-round": summary.get("bytes-down-per-round"),
    }
    for k in (f"holdout-{m}-zero-shot", f"holdout-{m}-adapted", "holdout-adapt-steps"):
        if k in f:
            row[k.replace(f"-{m}", "")] = f[k]
    return row


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)) if len(vals) > 1 else 0.0
    return mu, sd


def _fmt(mu: float, sd: float, metric: str) -> str:
    if math.isnan(mu):
        return "–"
    if metric == "accuracy":
        return f"{100 * mu:.1f} ± {100 * sd:.1f}"
    return f"{mu:.4f} ± {sd:.4f}"


def write_reports(rows: list[dict[str, Any]], out: Path, tasks: list[str], methods: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with (out / "comparison.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        cell.setdefault((r["task"], r["method"]), []).append(r)
    metric_of = {r["task"]: r["metric"] for r in rows}
    lines = ["# Comparison", "",
             "Personalized test metric at the last round, mean ± std over seeds (accuracy in %, "
             "MSE for the synthetic tasks; lower is better there). Best per column in **bold**. "
             "n = number of finished seeds.", ""]
    lines.append("| method | " + " | ".join(f"{t} ({metric_of.get(t, '?')})" for t in tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    best: dict[str, float] = {}
    stats: dict[tuple[str, str], tuple[float, float, int]] = {}
    for t in tasks:
        for m in methods:
            rs = cell.get((t, m), [])
            mu, sd = _mean_std([r["value"] for r in rs])
            stats[(t, m)] = (mu, sd, len(rs))
            if not math.isnan(mu):
                lower = metric_of.get(t) == "mse"
                if t not in best or (mu < best[t] if lower else mu > best[t]):
                    best[t] = mu
    for m in methods:
        cells = []
        for t in tasks:
            mu, sd, n = stats[(t, m)]
            s = _fmt(mu, sd, metric_of.get(t, "accuracy"))
            if not math.isnan(mu) and mu == best.get(t):
                s = f"**{s}**"
            cells.append(f"{s} (n={n})" if n else s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost per round", "",
              "Mean over tasks' runs of this method: wall time of one round (train + evaluation "
              "rounds amortised, in-process, 2 shared CPU cores) and bytes per round (all sampled "
              "clients; float32).", ""]
    lines.append("| method | " + " | ".join(f"{t} s/round" for t in tasks) + " | " +
                 " | ".join(f"{t} MB up/round" for t in tasks) + " |")
    lines.append("|---|" + "---|" * (2 * len(tasks)))
    for m in methods:
        a = [_mean_std([r["round-s"] for r in cell.get((t, m), [])])[0] for t in tasks]
        b = [_mean_std([r["bytes-up-per-round"] for r in cell.get((t, m), [])])[0] for t in tasks]
        lines.append(f"| {m} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in a) + " | " +
                     " | ".join("–" if math.isnan(v) else f"{v / 1e6:.3f}" for v in b) + " |")
    hold = [r for r in rows if "holdout-adapted" in r]
    if hold:
        lines += ["", "## Clients that never trained (holdout)", "",
                  "| task | method | zero-shot | adapted | adapt steps |", "|---|---|---|---|---|"]
        for t in tasks:
            for m in methods:
                rs = [r for r in cell.get((t, m), []) if "holdout-adapted" in r]
                if rs:
                    met = metric_of.get(t, "accuracy")
                    z = _mean_std([r.get("holdout-zero-shot", float("nan")) for r in rs])
                    a = _mean_std([r["holdout-adapted"] for r in rs])
                    lines.append(f"| {t} | {m} | {_fmt(*z, met)} | {_fmt(*a, met)} | "
                                 f"{rs[0].get('holdout-adapt-steps', '')} |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(stats, tasks, methods, metric_of, out / "comparison.png")
    except Exception as exc:  # plotting must never lose the tables
        print(f"[compare] plot failed: {exc}", file=sys.stderr)


def _plot(stats, tasks, methods, metric_of, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.6), squeeze=False)
    n_seeds = max((n for (_, _, n) in stats.values()), default=0)
    fig.suptitle(f"Personalized test metric at the last round (mean ± std over {n_seeds} seed"
                 f"{'s' * (n_seeds != 1)}; FLoRAL in red)")
    for ax, t in zip(axes[0], tasks):
        mus = [stats[(t, m)][0] for m in methods]
        sds = [stats[(t, m)][1] for m in methods]
        colors = ["tab:red" if m.startswith("floral") else "tab:gray" for m in methods]
        mus = [0.0 if math.isnan(v) else v for v in mus]
        sds = [0.0 if math.isnan(v) else v for v in sds]
        low = [min(sd, 0.9 * mu) for mu, sd in zip(mus, sds)]  # log axis: keep the bar positive
        ax.bar(range(len(methods)), mus, yerr=[low, sds], color=colors)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=70, fontsize=8)
        met = metric_of.get(t, "accuracy")
        ax.set_title(f"{t} ({met}, {'lower' if met == 'mse' else 'higher'} is better)", fontsize=9)
        ax.set_ylabel(met)
        if met == "mse" and any(v > 0 for v in mus):
            ax.set_yscale("log")
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # leave room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m floral_flwr.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--methods", nargs="+", default=["all"], help="method names or 'all'")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--quick", action="store_true", help="small round budgets (QUICK_ROUNDS)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds for every task (overrides --quick)")
    ap.add_argument("--clients", type=int, default=None, help="number of clients (default: the task's K)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: only the last round")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra run-config keys")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--out", default="comparison")
    ap.add_argument("--verbose", action="store_true", help="show each run's round lines")
    ap.add_argument("--rerun", action="store_true", help="run again even runs that finished with the same config")
    args = ap.parse_args(argv)

    from floral_flwr.config import ConfigError, parse_run_config, precheck_run_config
    from floral_flwr.preflight import check_run_config

    tasks = [t for s in args.tasks for t in s.split(",") if t]
    methods = [m for s in args.methods for m in s.split(",") if m]
    if methods == ["all"]:
        methods = [m for m in METHOD_ORDER if m in METHODS]
    extra = {}
    for kv in args.set:
        if "=" not in kv:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        extra[k] = _parse_value(v)
    # fast checks first (no torch): every name and every --set value
    try:
        for t in tasks:
            for m in methods:
                precheck_run_config({"task": t, "method": m, **extra})
    except ConfigError as exc:
        print(f"[compare] error: {exc}", file=sys.stderr)
        return 2
    from floral_flwr.tasks import TASK_NAMES, task_defaults

    for t in tasks:  # a task newer than config.TASKS passes the pre-check; this is the authority
        if t not in TASK_NAMES:
            near = nearest(t, TASK_NAMES)
            print(f"[compare] error: unknown task {t!r}" + (f"; did you mean {near!r}?" if near else "")
                  + " (python -m floral_flwr list tasks)", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    runs_dir = out / "runs"
    jobs = []
    for t in tasks:
        # the data directory may hold a prepared subset with its own K (mnist-5k: 20)
        data_dir = str(extra.get("data-dir") or "") or None
        K = args.clients or int(task_defaults(t, data_dir=data_dir).get("num-clients", 20))
        rounds = args.rounds or (quick_rounds(t) if args.quick else None)
        for m in methods:
            for s in range(args.seeds):
                cfg = {"task": t, "method": m, "seed": s, **extra}
                if rounds:
                    cfg["num-server-rounds"] = rounds
                try:  # every config is checked before the first run starts
                    cfg["eval-every"] = args.eval_every or parse_run_config(cfg).num_server_rounds
                    resolved = check_run_config(cfg, K, fix="give --clients at least that many").to_dict()
                except ConfigError as exc:
                    print(f"[compare] error: {t}/{m}: {exc}", file=sys.stderr)
                    return 2
                key = config_key(resolved, K)
                jobs.append({"task": t, "method": m, "seed": s, "config": cfg, "num-clients": K,
                             "output-dir": str(runs_dir), "run-name": run_name(t, m, s, key),
                             "verbose": args.verbose})
    # seed-major order: an interrupted sweep has every cell with fewer seeds, not some cells empty
    jobs.sort(key=lambda j: (j["seed"], tasks.index(j["task"]), methods.index(j["method"])))
    rows: list[dict[str, Any]] = []
    todo = []
    reused = []
    for j in jobs:
        summ = runs_dir / j["run-name"] / "summary.json"
        if summ.exists() and not args.rerun:
            rows.append(_row(j["task"], j["method"], j["seed"], json.loads(summ.read_text())))
            reused.append(j["run-name"])
        else:
            if args.rerun:
                shutil.rmtree(runs_dir / j["run-name"], ignore_errors=True)
            todo.append(j)
    n_total = len(jobs)
    if reused:
        print(f"[compare] reusing {len(reused)} finished run(s) with the same resolved config "
              f"(--rerun to run them again): {', '.join(reused)}", flush=True)
    print(f"[compare] {n_total} runs ({len(jobs) - len(todo)} already finished, {len(todo)} to do); "
          f"results in {out}", flush=True)
    t0 = time.monotonic()
    done = 0

    def report(j: dict[str, Any], summary: dict[str, Any] | None, err: str | None) -> None:
        nonlocal done
        done += 1
        el = time.monotonic() - t0
        eta = el / done * (len(todo) - done)
        i = n_total - len(todo) + done
        if summary is not None:
            r = _row(j["task"], j["method"], j["seed"], summary)
            rows.append(r)
            res = f"{r['metric']} {r['value']:.4f}"
            write_reports(rows, out, tasks, methods)
        else:
            res = f"FAILED: {err}"
        print(f"[compare] run {i}/{n_total} {j['task']} {j['method']} seed {j['seed']} | {res} | "
              f"elapsed {el / 60:.1f} min | ETA {eta / 60:.1f} min", flush=True)

    failures = 0
    if args.jobs <= 1:
        for j in todo:
            try:
                report(j, run_one(j), None)
            except Exception as exc:  # one failed run must not stop the sweep
                failures += 1
                report(j, None, f"{type(exc).__name__}: {exc}")
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_one, j): j for j in todo}
            for fut in as_completed(futs):
                j = futs[fut]
                try:
                    report(j, fut.result(), None)
                except Exception as exc:
                    failures += 1
                    report(j, None, f"{type(exc).__name__}: {exc}")
    write_reports(rows, out, tasks, methods)
    print(f"[compare] done in {(time.monotonic() - t0) / 60:.1f} min; {out / 'comparison.md'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
