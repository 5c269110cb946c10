# size: the comparison runner end to end (job keys, resumable sweep, reports; the tuning protocol is compare_tune.py); one CLI, read top to bottom.
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

``--quick`` uses small budgets (``QUICK_ROUNDS``, ``QUICK_CLIENTS``): the README's first command
(digits-label-shift, FedAvg / FLoRAL / FLoRAL-oracle, one seed) takes a few minutes on 2 cores and
already shows FLoRAL far ahead of FedAvg; all methods on the digits and synthetic tasks with one
seed take longer (``--jobs 2`` runs two runs at a time). Without ``--quick`` each task's preset (the paper's rounds) is used unless
``--rounds`` is given. ``--set key=value`` passes extra run-config keys to every run.
"""

from __future__ import annotations

import argparse
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

from floral_flwr.compare_tune import (  # noqa: F401 - parse_grid, choose, point_label: public here too
    _PLACEMENT_KEYS,
    _mean_std,
    _parse_value,
    choose,
    parse_grid,
    point_label,
    write_rows_csv,
    write_tuning,
)
from floral_flwr.config import METHODS, nearest

DEFAULT_TASKS = ("digits-rotate", "digits-label-shift", "synthetic-linear", "synthetic-mlp")
# rounds per task with --quick (evaluation at the end only)
# digits: 80, because FLoRAL's clusters separate from round ~40 on (digits-label-shift seed 0:
# accuracy 30 % at rounds 10-20, the same as FedAvg, 55 % at 50, 64 % at 60; FedAvg stays ~28 %)
QUICK_ROUNDS = {"digits": 80, "synthetic-linear": 100, "synthetic-mlp": 40, "mnist": 20, "cifar": 10}
METHOD_ORDER = ("fedavg", "fedavg-ft", "local-adaptor", "ditto", "feddpa", "feddpa-capped", "ifca", "fedem",
                "ensemble", "ensemble-oracle", "floral", "floral-oracle")


# clients with --quick (None: the task's K)
QUICK_CLIENTS: dict[str, int | None] = {"digits": 20}


def quick_clients(task: str) -> int | None:
    for prefix, k in QUICK_CLIENTS.items():
        if task.startswith(prefix):
            return k
    return None


def quick_rounds(task: str) -> int:
    for prefix, r in QUICK_ROUNDS.items():
        if task.startswith(prefix):
            return r
    return 20


# keys that say where a run goes, not what it computes


def config_key(resolved: dict[str, Any], num_clients: int) -> str:
    """Short hash of what a run computes: its resolved config and its number of clients."""
    what = {k: v for k, v in resolved.items() if k not in _PLACEMENT_KEYS}
    what["num-clients"] = num_clients
    blob = json.dumps(what, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def run_name(task: str, method: str, seed: int, key: str) -> str:
    return f"{task}__{method}__seed{seed}__{key}"


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


def _fmt(mu: float, sd: float, metric: str) -> str:
    if math.isnan(mu):
        return "–"
    if metric == "accuracy":
        return f"{100 * mu:.1f} ± {100 * sd:.1f}"
    return f"{mu:.4f} ± {sd:.4f}"


def write_reports(rows: list[dict[str, Any]], out: Path, tasks: list[str], methods: list[str],
                  chosen: dict[tuple[str, str], dict[str, Any]] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out / "comparison.csv", rows)
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
    if chosen:
        lines += ["", "## Tuned hyper-parameters", "",
                  "Chosen per task and method on a validation split of each client's train data "
                  "(same grid for every method, seeds disjoint from the reported ones; `tuning.json`, "
                  "`tuning.csv`).", "", "| task | method | chosen | validation metric |", "|---|---|---|---|"]
        for t in tasks:
            for m in methods:
                c = chosen.get((t, m))
                if c is not None:
                    lines.append(f"| {t} | {m} | {point_label(c['values'])} | "
                                 f"{_fmt(c['validation-mean'], c['validation-std'], c['metric'])} |")
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


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"5,6,7"`` -> those seeds (fresh seeds for reporting)."""
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected N or a comma-separated list of seeds, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise ValueError(f"expected N >= 1 or seeds >= 0, got {text!r}")
    if len(parts) == 1 and "," not in str(text):
        return list(range(vals[0]))
    if len(set(vals)) != len(vals):
        raise ValueError(f"seeds repeat in {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m floral_flwr.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--methods", nargs="+", default=["all"], help="method names or 'all'")
    ap.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a list such as 5,6,7 (the reported seeds)")
    ap.add_argument("--quick", action="store_true", help="small budgets (QUICK_ROUNDS, QUICK_CLIENTS)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds for every task (overrides --quick)")
    ap.add_argument("--clients", type=int, default=None, help="number of clients (default: the task's K)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: only the last round")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra run-config keys")
    ap.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a tuning grid axis (repeat for a product grid): every method gets the same "
                         "grid, chosen on a validation split of the train data, then --seeds report")
    ap.add_argument("--tune-seeds", default="100,101",
                    help="seeds of the tuning runs (disjoint from --seeds); default 100,101")
    ap.add_argument("--validation-fraction", type=float, default=0.2,
                    help="with --tune: the fraction of each client's train split held out for tuning")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--out", default="comparison")
    ap.add_argument("--verbose", action="store_true", help="show each run's round lines")
    ap.add_argument("--rerun", action="store_true", help="run again even runs that finished with the same config")
    args = ap.parse_args(argv)

    from floral_flwr.config import ConfigError, precheck_run_config

    tasks = [t for s in args.tasks for t in s.split(",") if t]
    methods = [m for s in args.methods for m in s.split(",") if m]
    if methods == ["all"]:
        methods = [m for m in METHOD_ORDER if m in METHODS]
    try:
        seeds = parse_seeds(args.seeds)
        tune_seeds = parse_seeds(args.tune_seeds) if args.tune else []
    except ValueError as exc:
        print(f"[compare] error: --seeds/--tune-seeds: {exc}", file=sys.stderr)
        return 2
    if set(seeds) & set(tune_seeds):
        print(f"[compare] error: --tune-seeds {tune_seeds} and --seeds {seeds} share "
              f"{sorted(set(seeds) & set(tune_seeds))}: report on fresh seeds (one number N means seeds "
              f"0..N-1; a single seed is written with a comma, e.g. --tune-seeds 100,)", file=sys.stderr)
        return 2
    extra = {}
    for kv in args.set:
        if "=" not in kv:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        extra[k] = _parse_value(v)
    # fast checks first (no torch): every name, every --set value and every grid value
    try:
        points = parse_grid(args.tune) if args.tune else []
        if args.tune:
            precheck_run_config({"validation-fraction": args.validation_fraction})
            if args.validation_fraction <= 0:
                raise ConfigError("--validation-fraction must be > 0 with --tune (tuning never reads test)")
        for t in tasks:
            for m in methods:
                precheck_run_config({"task": t, "method": m, **extra})
    except ConfigError as exc:
        print(f"[compare] error: {exc}", file=sys.stderr)
        return 2
    from floral_flwr.tasks import TASK_NAMES

    for t in tasks:  # a task newer than config.TASKS passes the pre-check; this is the authority
        if t not in TASK_NAMES:
            near = nearest(t, TASK_NAMES)
            print(f"[compare] error: unknown task {t!r}" + (f"; did you mean {near!r}?" if near else "")
                  + " (python -m floral_flwr list tasks)", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    runs_dir = out / "runs"
    sweep = _Sweep(args, tasks, methods, runs_dir)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    if points:
        tune_cells = [(t, m, s, {**extra, **pt, "validation-fraction": args.validation_fraction}, i)
                      for t in tasks for m in methods for i, pt in enumerate(points) for s in tune_seeds]
        try:
            tune_jobs = sweep.jobs(tune_cells)
        except ConfigError as exc:
            print(f"[compare] error: {exc}", file=sys.stderr)
            return 2
        print(f"[compare] tuning: {len(points)} grid point(s) x {len(tune_seeds)} seed(s) for every "
              f"method, on a {args.validation_fraction:g} validation split of each client's train data",
              flush=True)
        tuning_rows: list[dict[str, Any]] = []

        def on_tune(j: dict[str, Any], row: dict[str, Any]) -> None:
            row.update({"point": j["point"], "grid": point_label(points[j["point"]]),
                        "validation-fraction": args.validation_fraction})
            tuning_rows.append(row)
            write_tuning(tuning_rows, chosen, points, tune_seeds, args.validation_fraction, out)

        failures = sweep.execute(tune_jobs, on_tune)
        chosen = choose(tuning_rows, points)
        write_tuning(tuning_rows, chosen, points, tune_seeds, args.validation_fraction, out)
        for (t, m), c in chosen.items():
            print(f"[compare] tuned {t} {m}: {point_label(c['values'])} (validation "
                  f"{c['metric']} {c['validation-mean']:.4f})", flush=True)
        if failures:
            print(f"[compare] {failures} tuning run(s) failed (they count as the worst point)", file=sys.stderr)
    cells = []
    for t in tasks:
        for m in methods:
            pt = chosen[(t, m)]["values"] if (t, m) in chosen else {}
            cells += [(t, m, s, {**extra, **pt}, chosen[(t, m)]["point"] if (t, m) in chosen else None)
                      for s in seeds]
    try:
        jobs = sweep.jobs(cells)
    except ConfigError as exc:
        print(f"[compare] error: {exc}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []

    def on_report(j: dict[str, Any], row: dict[str, Any]) -> None:
        if j["point"] is not None:
            row["tuned"] = point_label(points[j["point"]])
        rows.append(row)
        write_reports(rows, out, tasks, methods, chosen)

    failures = sweep.execute(jobs, on_report)
    write_reports(rows, out, tasks, methods, chosen)
    print(f"[compare] done in {(time.monotonic() - sweep.t0) / 60:.1f} min; {out / 'comparison.md'}", flush=True)
    return 1 if failures else 0


class _Sweep:
    """Builds run jobs (every config checked before the first run) and runs them, reusing
    finished runs with the same resolved config."""

    def __init__(self, args: argparse.Namespace, tasks: list[str], methods: list[str], runs_dir: Path) -> None:
        self.args, self.tasks, self.methods, self.runs_dir = args, tasks, methods, runs_dir
        self.t0 = time.monotonic()

    def jobs(self, cells: list[tuple[str, str, int, dict[str, Any], int | None]]) -> list[dict[str, Any]]:
        from floral_flwr.config import ConfigError, parse_run_config
        from floral_flwr.preflight import check_run_config
        from floral_flwr.tasks import task_defaults

        args = self.args
        jobs = []
        for t, m, s, extra, point in cells:
            # the data directory may hold a prepared subset with its own K (mnist-5k: 20)
            data_dir = str(extra.get("data-dir") or "") or None
            K = args.clients or (quick_clients(t) if args.quick else None) or int(
                task_defaults(t, data_dir=data_dir).get("num-clients", 20))
            rounds = args.rounds or (quick_rounds(t) if args.quick else None)
            cfg = {"task": t, "method": m, "seed": s, **extra}
            if rounds and "num-server-rounds" not in extra:
                cfg["num-server-rounds"] = rounds
            try:  # every config is checked before the first run starts
                cfg["eval-every"] = args.eval_every or parse_run_config(cfg).num_server_rounds
                resolved = check_run_config(cfg, K, fix="give --clients at least that many").to_dict()
            except ConfigError as exc:
                raise ConfigError(f"{t}/{m}: {exc}") from None
            key = config_key(resolved, K)
            jobs.append({"task": t, "method": m, "seed": s, "config": cfg, "num-clients": K,
                         "output-dir": str(self.runs_dir), "run-name": run_name(t, m, s, key),
                         "verbose": args.verbose, "point": point})
        # seed-major order: an interrupted sweep has every cell with fewer seeds, not some cells empty
        jobs.sort(key=lambda j: (j["seed"], self.tasks.index(j["task"]), self.methods.index(j["method"]),
                                 j["point"] or 0))
        return jobs

    def execute(self, jobs: list[dict[str, Any]], on_row: Any) -> int:
        """Run what is not finished; ``on_row(job, row)`` for every finished run. Returns the
        number of failed runs."""
        args, runs_dir = self.args, self.runs_dir
        todo, reused = [], []
        for j in jobs:
            summ = runs_dir / j["run-name"] / "summary.json"
            if summ.exists() and not args.rerun:
                on_row(j, _row(j["task"], j["method"], j["seed"], json.loads(summ.read_text())))
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
              f"results in {runs_dir.parent}", flush=True)
        t0 = time.monotonic()
        done = 0
        failures = 0

        def report(j: dict[str, Any], summary: dict[str, Any] | None, err: str | None) -> None:
            nonlocal done
            done += 1
            el = time.monotonic() - t0
            eta = el / done * (len(todo) - done)
            i = n_total - len(todo) + done
            if summary is not None:
                r = _row(j["task"], j["method"], j["seed"], summary)
                on_row(j, r)
                res = f"{r['metric']} {r['value']:.4f}"
            else:
                res = f"FAILED: {err}"
            print(f"[compare] run {i}/{n_total} {j['task']} {j['method']} seed {j['seed']} | {res} | "
                  f"elapsed {el / 60:.1f} min | ETA {eta / 60:.1f} min", flush=True)

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
        return failures


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
