"""Paper scale: fmnist-label-shift (300 clients, 10 % sampled), FLoRAL vs FedAvg, in-process and `flwr run`.

    OMP_NUM_THREADS=1 python benchmarks/bench_paper_scale.py --data-dir DIR \\
        [--rounds 25] [--repeats 2] [--aggregations mean secagg] [--methods fedavg floral] \\
        [--flwr-rounds 10] [--engines inline flwr] [--ray-worker-niceness 0] \\
        [--yield-to bench_deploy.py] [--table-runs SWEEP/runs] [--markdown out.md] [--json out.json]

Results and their reading: ``benchmarks/RESULTS_paper_scale.md``.

``DIR`` holds Fashion-MNIST in the hub schema (``python -m floral_flwr.data prepare
fashion-mnist DIR``). Every run uses the task's paper preset (300 clients, 10 % sampled per
round, batch 32, lr 0.1, MLP 784-200-10) with ``R`` rounds and evaluation (all 300 clients)
only in the last round, ``num-threads=1``.

* ``inline``: every (method, aggregation) runs ``floral_flwr.inline.run_inline`` in a fresh
  child process of this script (``torch.set_num_threads(1)``): what one user's in-process run
  pays, data loading included; the peak RSS is that process's ``ru_maxrss`` (``os.wait4``).
  The child also reads its CPU clock at the end of every round: the run is single-threaded,
  so CPU seconds per round are its cost on an idle core, whatever the machine's load.
* ``flwr``: ``python -m floral_flwr.launch --num-supernodes 300`` (private SuperLink,
  ``flwr run --stream``, Ray simulation engine with 2 concurrent ClientApps of 1 CPU); the peak
  RSS is the maximum over time of the summed RSS of the launch process and all its descendants
  (``bench_scale.tree_rss_mb``: SuperLink, SuperExec, the simulation, Ray's daemons and
  workers), sampled every 0.5 s, and cross-checked with every process that inherited this
  benchmark's marker variable (a process Ray re-parents out of the tree is still counted).
  ``--ray-worker-niceness 0``: Ray starts its actors at +15, which on a shared machine starves
  them (and then the server's 120 s client discovery can time out; see the results file).

Per round: ``round-s`` of the run's ``rounds.csv`` (the train phase plus, on the last round,
the evaluation), the same clock the printed round lines use; the figure is the median over
rounds 2..R-1 (round 1 pays the clients' set-up, round R the evaluation). The 500-round run
time is extrapolated from the measured one by replacing its middle rounds with 498 median
rounds (:func:`extrapolate`): start-up + round 1 + 498 x median + the evaluation round + the
end-of-run work, all as measured. Methods alternate their order between repetitions (A/B,
then B/A) so that a change of load hits both. ``--table-runs`` also reads the real wall time
of finished 500-round runs (``summary.json`` ``wall-time-s``) for comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_round import machine  # noqa: E402
from bench_scale import tree_rss_mb  # noqa: E402

TASK = "fmnist-label-shift"
CLIENTS = 300
METHODS = ("fedavg", "floral")
TARGET_ROUNDS = 500
RESULT_TAG = "BENCH-RESULT "
MARK_ENV = "FLORAL_BENCH_PAPER_SCALE"
_ROUND_LINE = re.compile(r"\] round (\d+)/(\d+) \|")
_RESULTS_IN = re.compile(r"results in (\S.*)$")


# ---------------------------------------------------------------------------- pure helpers


def middle_median(round_s: Sequence[float]) -> float:
    """Median seconds of rounds 2..R-1 (``round_s[0]`` is round 1): neither the set-up round
    nor the final evaluation round. Needs at least 3 rounds."""
    if len(round_s) < 3:
        raise ValueError(f"need >= 3 rounds to leave out the first and the last, got {len(round_s)}")
    return statistics.median(round_s[1:-1])


def extrapolate(wall_s: float, round_s: Sequence[float], target_rounds: int = TARGET_ROUNDS) -> float:
    """Run time of a ``target_rounds`` run from a measured shorter one of the same set-up.

    The measured wall time keeps everything but the middle rounds (start-up, round 1, the last
    round with its evaluation, end-of-run work); its ``R - 2`` middle rounds are replaced by
    ``target_rounds - 2`` rounds of their median."""
    if target_rounds < 3:
        raise ValueError(f"target_rounds must be >= 3, got {target_rounds}")
    middle = round_s[1:-1]
    return wall_s - sum(middle) + (target_rounds - 2) * middle_median(round_s)


def round_durations(start: float, ends: Sequence[float]) -> list[float]:
    """Per-round durations from a clock read at the start and at the end of every round
    (round 1 includes everything before it)."""
    return [b - a for a, b in zip([start, *ends[:-1]], ends)]


def alternating(methods: Sequence[str], repetition: int) -> list[str]:
    """The methods in the given order on even repetitions, reversed on odd ones (A/B, B/A)."""
    return list(methods) if repetition % 2 == 0 else list(methods)[::-1]


def read_round_seconds(run_dir: Path) -> list[float]:
    """``round-s`` of every round in ``rounds.csv``, in round order."""
    with open(run_dir / "rounds.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["round"]))
    return [float(r["round-s"]) for r in rows]


def run_config_text(cfg: dict[str, Any]) -> str:
    """``--run-config`` text for ``flwr run`` / launch: strings quoted, the rest as TOML."""
    parts = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}='{v}'")
    return " ".join(parts)


# ---------------------------------------------------------------------------- environment


def public_argv(argv: Sequence[str], args: argparse.Namespace) -> str:
    """The command line with this machine's data and sweep paths replaced by placeholders
    (output files by their names)."""
    swap = {args.data_dir: "DIR", args.table_runs: "SWEEP/runs"}
    for out in (getattr(args, "markdown", ""), getattr(args, "json", "")):
        if out:
            swap[out] = Path(out).name
    return " ".join(["benchmarks/bench_paper_scale.py", *(swap.get(a, a) if a else a for a in argv[1:])])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("flwr", "torch", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def base_config(args: argparse.Namespace, rounds: int, method: str, aggregation: str, name: str,
                out: Path) -> dict[str, Any]:
    return {"task": TASK, "method": method, "aggregation": aggregation, "seed": args.seed,
            "num-server-rounds": rounds, "eval-every": rounds, "num-threads": 1,
            "data-dir": args.data_dir, "output-dir": str(out), "run-name": name}


# ---------------------------------------------------------------------------- in-process


def worker(cfg_json: str) -> None:
    """Child process: one in-process run; prints one RESULT_TAG line of JSON."""
    import torch

    torch.set_num_threads(1)  # two spinning intra-op threads on a loaded machine cost ~10x
    from floral_flwr.inline import run_inline

    from floral_flwr.results import RunRecorder

    cfg = json.loads(cfg_json)
    # CPU seconds of this process at the end of every round (the run is single-threaded): what
    # a round costs without the time other processes took the core away
    cpu_at_round_end: list[float] = []
    record_round = RunRecorder.record_round

    def timed_record_round(recorder, stats, num_adaptors):
        cpu_at_round_end.append(time.process_time())
        return record_round(recorder, stats, num_adaptors)

    RunRecorder.record_round = timed_record_round
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary, _ = run_inline(cfg, CLIENTS)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    run_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    print(RESULT_TAG + json.dumps({"wall_s": wall, "cpu_s": cpu, "round_s": read_round_seconds(run_dir),
                                   "round_cpu_s": round_durations(cpu0, cpu_at_round_end),
                                   "summary_wall_s": summary.get("wall-time-s")}), flush=True)


def run_inline_child(cfg: dict[str, Any], nice: int) -> dict[str, Any]:
    """One in-process run in a fresh child; its result, process wall time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    load_start = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    assert proc.stdout is not None
    log, result = [], None
    for line in proc.stdout:
        log.append(line)
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    process_wall = time.perf_counter() - t0
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"in-process run {cfg['run-name']} failed (exit {proc.returncode}):\n" + "".join(log[-30:]))
    return {**result, "process_wall_s": process_wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "load_start": load_start, "load_end": load()}


# ---------------------------------------------------------------------------- flwr run


class TreeSampler(threading.Thread):
    """Peak summed RSS of a process tree (``tree_rss_mb``) and of every process carrying a
    marker variable, every ``period`` seconds."""

    def __init__(self, root: int, marker: str, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.needle, self.period = root, f"{MARK_ENV}={marker}".encode(), period
        self.peak_tree = self.peak_marked = 0.0
        self.procs_tree = self.procs_marked = 0
        self.stop = False

    def marked_rss_mb(self) -> tuple[float, int]:
        page, total, n = os.sysconf("SC_PAGE_SIZE"), 0, 0
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if self.needle not in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                    continue
                with open(f"/proc/{d}/statm") as f:
                    total += int(f.read().split()[1]) * page
                n += 1
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20, n

    def run(self) -> None:
        while not self.stop:
            mb, n = tree_rss_mb(self.root)
            if mb > self.peak_tree:
                self.peak_tree, self.procs_tree = mb, n
            mb, n = self.marked_rss_mb()
            if mb > self.peak_marked:
                self.peak_marked, self.procs_marked = mb, n
            time.sleep(self.period)


def run_flwr(cfg: dict[str, Any], nice: int, timeout: float, log_path: Path,
             ray_worker_niceness: int | None = None) -> dict[str, Any]:
    """One run through ``python -m floral_flwr.launch`` (flwr run, Ray simulation engine).
    ``ray_worker_niceness``: Ray's ``RAY_worker_niceness`` for the ClientApp actors (Ray's
    default 15 starves them behind any other work on a shared machine); None: Ray's default."""
    marker = uuid.uuid4().hex
    home = Path(tempfile.mkdtemp(prefix="bench-paper-flwr-home-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", MARK_ENV: marker,
           "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if ray_worker_niceness is not None:
        env["RAY_worker_niceness"] = str(ray_worker_niceness)
    cmd = [sys.executable, "-m", "floral_flwr.launch", "--num-supernodes", str(CLIENTS),
           "--run-config", run_config_text(cfg), "--timeout", str(timeout)]
    load_start = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    sampler = TreeSampler(proc.pid, marker)
    sampler.start()
    assert proc.stdout is not None
    arrivals: dict[int, float] = {}
    run_dir = None
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = _ROUND_LINE.search(line)
            if m:
                arrivals.setdefault(int(m.group(1)), time.perf_counter() - t0)
            m = _RESULTS_IN.search(line)
            if m:
                run_dir = Path(m.group(1).strip())
    proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    if proc.returncode != 0:
        text = log_path.read_text(errors="replace")
        cause = next((ln.strip() for ln in reversed(text.splitlines()) if "run stopped:" in ln or "error:" in ln), "")
        return {"failed": True, "exit": proc.returncode, "wall_s": wall, "cause": cause[-400:],
                "peak_rss_mb": max(sampler.peak_tree, sampler.peak_marked), "load_start": load_start,
                "load_end": load()}
    run_dir = run_dir or Path(cfg["output-dir"]) / cfg["run-name"]
    round_s = read_round_seconds(run_dir)
    lines = [arrivals[r] for r in sorted(arrivals)]
    return {"wall_s": wall, "round_s": round_s,
            # when the first round line reached us: SuperLink + FAB + Ray + ServerApp start-up + round 1
            "first_round_line_s": lines[0] if lines else None,
            # the round lines' arrival times: a cross-check of rounds.csv (log streaming batches them)
            "line_gaps_median_s": statistics.median(b - a for a, b in zip(lines[1:-1], lines[2:-1]))
            if len(lines) >= 4 else None,
            "peak_rss_mb": max(sampler.peak_tree, sampler.peak_marked),
            "peak_tree_mb": sampler.peak_tree, "procs_tree": sampler.procs_tree,
            "peak_marked_mb": sampler.peak_marked, "procs_marked": sampler.procs_marked,
            "load_start": load_start, "load_end": load()}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b"bench_paper_scale"  # gone: not a reason to wait


def wait_while_running(pattern: str, poll: float = 60.0) -> float:
    """Before a measured run: wait while a process whose command line matches ``pattern``
    runs (``pgrep -f``; another timing-sensitive benchmark); returns the seconds waited."""
    def others() -> list[int]:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        # not this benchmark itself (its own command line names the pattern after --yield-to)
        return [int(p) for p in found if b"bench_paper_scale" not in _cmdline(int(p))]

    waited = 0.0
    while pattern and others():
        print(f"waiting: a '{pattern}' process is running (re-check in {poll:.0f} s)", flush=True)
        time.sleep(poll)
        waited += poll
    return waited


# ---------------------------------------------------------------------------- sweep table


def table_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Finished runs of a comparison sweep: method, aggregation, rounds, wall and round time."""
    rows = []
    for summary_path in sorted(runs_dir.glob("*/summary.json")):
        s = json.loads(summary_path.read_text())
        cfg_path = summary_path.parent / "resolved-config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if s.get("wall-time-s") is None:
            continue
        round_s = read_round_seconds(summary_path.parent)
        rows.append({"run": summary_path.parent.name, "method": s.get("method"), "task": s.get("task"),
                     "aggregation": cfg.get("aggregation", "?"), "rounds": s.get("rounds"),
                     "wall_s": s["wall-time-s"], "round1_s": round_s[0],
                     "median_round_s": middle_median(round_s) if len(round_s) >= 3 else None})
    return rows


# ---------------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per run: the median middle round, the extrapolated 500-round time."""
    for r in runs:
        r["median_round_s"] = middle_median(r["round_s"])
        r["round1_s"] = r["round_s"][0]
        r["last_round_s"] = r["round_s"][-1]
        r["extrapolated_500_s"] = extrapolate(r["wall_s"], r["round_s"])
        if r.get("round_cpu_s"):
            r["median_round_cpu_s"] = middle_median(r["round_cpu_s"])
            r["extrapolated_500_cpu_s"] = extrapolate(r["cpu_s"], r["round_cpu_s"])
    return runs


def fmt_load(a: list[float], b: list[float]) -> str:
    return f"{a[0]:.1f} -> {b[0]:.1f}"


def markdown(args: argparse.Namespace, info: dict[str, Any], runs: list[dict[str, Any]],
             sweep: list[dict[str, Any]]) -> str:
    med = statistics.median
    lines = [f"`python {public_argv(sys.argv, args)}`", "",
             f"{TASK}, {CLIENTS} clients, 10 % sampled, batch 32, seed {args.seed}; {info['machine']}; "
             f"usable CPUs {info['usable_cpus']}; flwr {info['versions']['flwr']}, torch {info['versions']['torch']}, "
             f"ray {info['versions']['ray']}; load average (1 min) at start {info['load_start'][0]:.1f}, "
             f"at end {info['load_end'][0]:.1f}", ""]
    for engine in args.engines:
        eng = [r for r in runs if r["engine"] == engine]
        if not eng:
            continue
        rounds = eng[0]["rounds"]
        title = ("in-process (`run_inline`, one child process per run, 1 torch thread)" if engine == "inline"
                 else f"`flwr run` (launch, Ray simulation, {CLIENTS} SuperNodes, 2 concurrent ClientApps of 1 CPU)")
        cpu = all("median_round_cpu_s" in r for r in eng)
        lines += [f"**{title}**, {rounds} rounds, evaluation in round {rounds}:", "",
                  "| method | aggregation | rep | s/round (median 2..R-1) | round 1 s | last round (eval) s | "
                  "run wall s | 500 rounds extrapolated | " + ("CPU s/round | 500 rounds in CPU time | " if cpu else "")
                  + "peak RSS MiB | load 1 min start -> end |",
                  "|---|---|---|---|---|---|---|---|" + ("---|---|" if cpu else "") + "---|---|"]
        for r in eng:
            lines.append(f"| {r['method']} | {r['aggregation']} | {r['rep']} | {r['median_round_s']:.3f} | "
                         f"{r['round1_s']:.1f} | {r['last_round_s']:.1f} | {r['wall_s']:.1f} | "
                         f"{r['extrapolated_500_s'] / 60:.2f} min | "
                         + (f"{r['median_round_cpu_s']:.3f} | {r['extrapolated_500_cpu_s'] / 60:.2f} min | " if cpu else "")
                         + f"{r['peak_rss_mb']:.0f} | {fmt_load(r['load_start'], r['load_end'])} |")
        keys = [("median_round_s", "extrapolated_500_s", "wall")]
        if cpu:
            keys.append(("median_round_cpu_s", "extrapolated_500_cpu_s", "CPU time"))
        lines += ["", "| aggregation | clock | FLoRAL s/round | FedAvg s/round | FLoRAL / FedAvg (median of "
                  "per-repetition ratios) | FLoRAL 500 rounds | FedAvg 500 rounds |", "|---|---|---|---|---|---|---|"]
        for agg in args.aggregations:
            fl = sorted((r for r in eng if r["aggregation"] == agg and r["method"] == "floral"), key=lambda r: r["rep"])
            fa = sorted((r for r in eng if r["aggregation"] == agg and r["method"] == "fedavg"), key=lambda r: r["rep"])
            if not fl or not fa:
                continue
            for per_round, total, clock in keys:
                ratios = [a[per_round] / b[per_round] for a, b in zip(fl, fa)]
                lines.append(f"| {agg} | {clock} | {med(r[per_round] for r in fl):.3f} | "
                             f"{med(r[per_round] for r in fa):.3f} | {med(ratios):.2f} "
                             f"({', '.join(f'{x:.2f}' for x in ratios)}) | "
                             f"{med(r[total] for r in fl) / 60:.2f} min | {med(r[total] for r in fa) / 60:.2f} min |")
        if engine == "flwr":
            lines += ["", "flwr run details: " + "; ".join(
                f"{r['method']}/{r['aggregation']}: first round line after {r['first_round_line_s'] or float('nan'):.0f} s, "
                f"round-line gaps median {r['line_gaps_median_s'] or float('nan'):.2f} s, peak tree "
                f"{r['peak_tree_mb']:.0f} MiB ({r['procs_tree']} processes), marked {r['peak_marked_mb']:.0f} MiB "
                f"({r['procs_marked']} processes)" for r in eng)]
        lines.append("")
    if sweep:
        lines += ["**Real 500-round runs** (the comparison sweep, `--jobs 2`, other load on the machine):", "",
                  "| run | method | aggregation | rounds | wall | round 1 s | s/round (median 2..R-1) |",
                  "|---|---|---|---|---|---|---|"]
        for s in sweep:
            lines.append(f"| {s['run']} | {s['method']} | {s['aggregation']} | {s['rounds']} | "
                         f"{s['wall_s'] / 60:.2f} min | {s['round1_s']:.1f} | "
                         f"{s['median_round_s'] if s['median_round_s'] is not None else float('nan'):.3f} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("FLORAL_FMNIST_DIR", ""))
    ap.add_argument("--rounds", type=int, default=25, help="rounds of each in-process run")
    ap.add_argument("--flwr-rounds", type=int, default=10, help="rounds of each flwr run")
    ap.add_argument("--repeats", type=int, default=2, help="in-process repetitions (order alternates)")
    ap.add_argument("--flwr-repeats", type=int, default=1)
    ap.add_argument("--aggregations", nargs="+", default=["mean", "secagg"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--engines", nargs="+", choices=("inline", "flwr"), default=["inline", "flwr"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nice", type=int, default=0, help="niceness of the measured processes")
    ap.add_argument("--flwr-timeout", type=float, default=1800.0)
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness of the ClientApp actors (Ray's default: 15)")
    ap.add_argument("--yield-to", default="", metavar="PATTERN",
                    help="before every run, wait while `pgrep -f PATTERN` finds a process")
    ap.add_argument("--table-runs", default="", help="a sweep's runs/ folder: real 500-round wall times")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if not args.data_dir:
        ap.error("--data-dir is required (Fashion-MNIST in the hub schema)")
    if min(args.rounds, args.flwr_rounds) < 3:
        ap.error("--rounds and --flwr-rounds must be >= 3 (round 1 and the last are left out of the median)")

    work = Path(tempfile.mkdtemp(prefix="bench-paper-scale-"))
    info = {"machine": machine(), "usable_cpus": len(os.sched_getaffinity(0)), "versions": versions(),
            "python": platform.python_version(), "load_start": load()}
    print(f"machine: {info}; work dir {work}", flush=True)
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    plan = []
    if "inline" in args.engines:
        plan += [("inline", rep) for rep in range(args.repeats)]
    if "flwr" in args.engines:
        plan += [("flwr", rep) for rep in range(args.flwr_repeats)]
    for engine, rep in plan:
        rounds = args.rounds if engine == "inline" else args.flwr_rounds
        for agg in args.aggregations:
            for method in alternating(args.methods, rep):
                name = f"{engine}-{method}-{agg}-r{rep}"
                cfg = base_config(args, rounds, method, agg, name, work)
                waited = wait_while_running(args.yield_to)
                if engine == "inline":
                    r = run_inline_child(cfg, args.nice)
                else:
                    r = run_flwr(cfg, args.nice, args.flwr_timeout, work / f"{name}.log", args.ray_worker_niceness)
                r.update(engine=engine, method=method, aggregation=agg, rep=rep, rounds=rounds, waited_s=waited)
                if r.get("failed"):
                    failed.append(r)
                    print(f"{name}: FAILED (exit {r['exit']}) after {r['wall_s']:.0f} s: {r['cause']}", flush=True)
                    continue
                summarize([r])
                runs.append(r)
                if args.json:  # partial results survive an interrupted sweep
                    Path(args.json).write_text(json.dumps({"runs": runs, "failed": failed}, indent=1) + "\n")
                print(f"{name}: {r['median_round_s']:.3f} s/round, round 1 {r['round1_s']:.1f} s, wall "
                      f"{r['wall_s']:.1f} s, 500 rounds ~{r['extrapolated_500_s'] / 60:.2f} min, peak RSS "
                      f"{r['peak_rss_mb']:.0f} MiB, load {r['load_start'][0]:.1f} -> {r['load_end'][0]:.1f}",
                      flush=True)
    info["load_end"] = load()
    sweep = table_runs(Path(args.table_runs)) if args.table_runs else []
    text = markdown(args, info, runs, sweep)
    for r in failed:
        text += (f"\nFAILED: {r['engine']} {r['method']}/{r['aggregation']} (exit {r['exit']}, after "
                 f"{r['wall_s']:.0f} s, load {fmt_load(r['load_start'], r['load_end'])}): {r['cause']}\n")
    print(text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": public_argv(sys.argv, args),
                                               "machine": info, "runs": runs, "failed": failed, "sweep": sweep}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
