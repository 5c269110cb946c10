"""Robustness: attempts per category and their outcomes, accuracy under one attacker per robust
mode, and the cost of each robust mode, side by side in one process.

    PYTHONPATH=$PWD python benchmarks/bench_robust.py --json out.json [--markdown out.md]
        [--rounds 40] [--clients 20] [--skip-accuracy] [--code DIR]

1. **Attempts** (``tests/adversary.py``): every malicious train, discovery and evaluation reply
   of the battery, rebuilt from real ClientApp replies and sent through Flower's serialization
   to the strategy's own code, plus operator mistakes and faults on real runs (inline engine):
   reused run names, resumes of finished runs or with other keys, ``..`` as run name, two runs
   on one directory, a corrupt newest checkpoint, a disk that fills mid-run. Outcomes:
   ``rejected`` (dropped / refused with a message, nothing lost), ``bounded`` (accepted with a
   bounded effect / recovered), ``crash`` (an exception escaped: a raw traceback), ``loss``
   (taken over, non-finite, or results lost or mixed). ``--code DIR`` runs the same battery
   against another checkout's ``floral_flwr`` (e.g. the code before this work).
2. **Accuracy**: FLoRAL on digits-rotate (``--clients`` clients, ``--rounds`` rounds), clean and
   with client 0 sending -10 x its trained arrays every round (well-formed, its own weight), for
   ``robust`` = none / clip / trimmed-mean / median.
3. **Cost**: ``aggregate_train`` on the same captured digits replies (``--clients``), and the
   accumulators alone on a CIFAR-10-CNN-shaped FLoRAL state (20 random replies), each mode timed
   interleaved with ``none`` in this process (median of ``--repeats``); ratio to ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "clip", "trimmed-mean", "median")


def _setup_path(code: str | None) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(Path(code).resolve() if code else ROOT))


# ------------------------------------------------------------------ 1. attempts


def _small_run(out: Path, name: str, **kw) -> dict[str, Any]:
    return {"task": "synthetic-linear", "num-server-rounds": 1, "eval-every": 1, "output-dir": str(out),
            "run-name": name, "min-available-nodes": 1, **kw}


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in (".lock",)}


def _is_clear(exc: BaseException) -> bool:
    """An error the app raises on purpose, with a message (not a raw traceback from deep inside)."""
    from floral_flwr.config import ConfigError

    clear = [ConfigError]
    try:
        from floral_flwr.rundir import CheckpointWriteError, RunFailed

        clear += [CheckpointWriteError, RunFailed]
    except ImportError:
        pass
    return isinstance(exc, tuple(clear))


def operator_scenarios(tmp: Path) -> list[tuple[str, str, str, str]]:
    from floral_flwr.inline import run_inline

    out: list[tuple[str, str, str, str]] = []

    def record(name: str, fn) -> None:
        try:
            outcome, detail = fn()
        except Exception as exc:  # noqa: BLE001 - an escape is the finding
            outcome = "rejected" if _is_clear(exc) else "crash"
            detail = f"{type(exc).__name__}: {str(exc)[:100]}"
        out.append(("operator", name, outcome, detail))

    def reuse():
        d = tmp / "reuse"
        run_inline(_small_run(d, "r"), 4)
        before = _files(d / "r")
        try:
            run_inline(_small_run(d, "r", seed=5), 4)
        except Exception as exc:  # noqa: BLE001
            if _is_clear(exc) and _files(d / "r") == before:
                return "rejected", str(exc)[:100]
            raise
        return "loss", "the earlier run was replaced"

    def finished():
        d = tmp / "finished"
        first, _ = run_inline(_small_run(d, "r"), 4)
        again, _ = run_inline(_small_run(d, "r", resume=True), 4)
        kept = json.loads((d / "r" / "summary.json").read_text()).get("final")
        return ("rejected", "no-op, summary kept") if kept == json.loads(json.dumps(first["final"])) and kept \
            else ("loss", f"final metrics now {kept}")

    def dotdot():
        d = tmp / "dotdot" / "out"
        try:
            run_inline(_small_run(d, ".."), 4)
        except Exception as exc:  # noqa: BLE001
            if _is_clear(exc):
                return "rejected", str(exc)[:100]
            raise
        return "loss", "wrote into the parent of output-dir"

    def changed(key: str, value: Any):
        def fn():
            d = tmp / f"changed-{key}"
            run_inline(_small_run(d, "r", **{"num-server-rounds": 1}), 4)
            try:
                run_inline(_small_run(d, "r", resume=True, **{key: value, "num-server-rounds": 2}), 4)
            except Exception as exc:  # noqa: BLE001
                if _is_clear(exc):
                    return "rejected", str(exc)[:100]
                raise
            return "loss", f"resumed with another {key}: the run mixes two computations"
        return fn

    def concurrent():
        d = tmp / "concurrent"
        gate, started = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def hold(node, reply):
            if reply.metadata.message_type == "train" and not started.is_set():
                started.set()
                gate.wait(300)
            return reply

        def first():
            try:
                run_inline(_small_run(d, "r", **{"num-server-rounds": 2}), 4, reply_hook=hold)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=first)
        t.start()
        started.wait(300)
        try:
            run_inline(_small_run(d, "r", seed=3), 4)
            outcome = ("loss", "both runs wrote into one directory")
        except Exception as exc:  # noqa: BLE001
            outcome = ("rejected", str(exc)[:100]) if _is_clear(exc) else ("crash", repr(exc)[:100])
        finally:
            gate.set()
            t.join()
        return outcome

    def corrupt():
        d = tmp / "corrupt"
        run_inline(_small_run(d, "r", **{"num-server-rounds": 2}), 4)
        newest = d / "r" / "checkpoint" / "state-000002.npz"
        newest.write_bytes(b"PK\x03\x04 torn")
        (d / "r" / "summary.json").unlink()
        summary, _ = run_inline(_small_run(d, "r", resume=True, **{"num-server-rounds": 3}), 4)
        return ("bounded", "resumed from the older checkpoint") if summary["final"].get("round") == 3 \
            else ("loss", "")

    def disk_full():
        mnt = tmp / "disk"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                          capture_output=True).returncode != 0:
            return "skipped", "no tmpfs mount here"
        junk = mnt / "junk"
        try:
            def fill(node, reply):
                if reply.metadata.message_type == "train" and not junk.exists() and \
                        (mnt / "r" / "checkpoint").exists():
                    free = subprocess.run(["df", "--output=avail", "-B1", str(mnt)], capture_output=True,
                                          text=True).stdout.split()[-1]
                    junk.write_bytes(b"\0" * max(int(free) - 512, 0))
                return reply
            cfg = _small_run(mnt, "r", **{"num-server-rounds": 3, "persist-client-state": False})
            try:
                run_inline(cfg, 4, reply_hook=fill)
                return "loss", "a full disk went unnoticed"
            except Exception as exc:  # noqa: BLE001
                if not _is_clear(exc):
                    return "crash", f"{type(exc).__name__}: {str(exc)[:100]}"
            junk.unlink()
            summary, _ = run_inline({**cfg, "resume": True}, 4)
            rows = (mnt / "r" / "rounds.csv").read_text().splitlines()[1:]
            return ("rejected", "stopped naming the file; resume finished") if len(rows) == 3 \
                else ("loss", f"{len(rows)} rows after resume")
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)

    record("run-name reused without resume", reuse)
    record("resume of a finished run", finished)
    record("run-name '..'", dotdot)
    record("resume with another seed", changed("seed", 7))
    record("resume with another method", changed("method", "fedavg"))
    record("resume with another server optimizer", changed("server-optimizer", "fedadam"))
    record("two runs on one run directory", concurrent)
    record("newest checkpoint corrupt", corrupt)
    record("disk fills mid-run", disk_full)
    return out


def attempts(tmp: Path) -> list[tuple[str, str, str, str]]:
    import adversary as A

    rnd = A.honest_round()
    rows = A.run_train_battery(rnd) + A.run_discovery_battery(rnd) + A.run_eval_battery(rnd)
    return rows + operator_scenarios(tmp)


def tally(rows: list[tuple[str, str, str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for cat, _, outcome, _ in rows:
        out.setdefault(cat, {k: 0 for k in ("attempts", "rejected", "bounded", "crash", "loss")})
        out[cat]["attempts"] += 1
        if outcome in out[cat]:
            out[cat][outcome] += 1
    return out


# ------------------------------------------------------------------ 2. accuracy


def accuracy_runs(tmp: Path, rounds: int, clients: int, done: Any = None) -> list[dict[str, Any]]:
    """Clean ``none`` first, then one attacker per mode, then the other modes clean; ``done(rows)``
    after each run (the partial results are written as they come)."""
    import adversary as A
    from floral_flwr.inline import run_inline

    def flip(node, reply):
        if reply.metadata.message_type != "train" or reply.has_error() \
                or int(reply.content["metrics"]["client-id"]) != 0:
            return reply
        return A.rebuilt(reply, {k: (-10.0 * v if v.dtype.kind == "f" else v) for k, v in A._arrays(reply).items()})

    rows = []
    order = [(False, "none"), *((True, m) for m in MODES), *((False, m) for m in MODES[1:])]
    for attacked, mode in order:
        cfg = {"task": "digits-rotate", "method": "floral", "num-server-rounds": rounds,
               "eval-every": rounds, "output-dir": str(tmp / "acc"), "run-name": f"{mode}-{int(attacked)}",
               "min-available-nodes": 1, "robust": mode, "persist-client-state": False}
        t0 = time.perf_counter()
        try:
            summary, _ = run_inline(cfg, clients, reply_hook=flip if attacked else None)
            acc = summary["final"].get("accuracy-mean")
            status = "completed"
            round_s = summary.get("mean-round-s")
        except Exception as exc:  # noqa: BLE001 - a stopped run is a result too
            acc, status, round_s = None, f"stopped: {type(exc).__name__}", None
        rows.append({"mode": mode, "attacked": attacked, "accuracy": acc, "status": status,
                     "mean-round-s": round_s, "wall-s": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        if done is not None:
            done(rows)
    return rows


# ------------------------------------------------------------------ 3. cost


def _median_times(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: the same machine state for every mode
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cost(clients: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    import adversary as A
    from floral_flwr.config import parse_run_config
    from floral_flwr.methods import build_handle
    from floral_flwr.strategy.robust import make_accumulator
    from floral_flwr.tasks import task_info

    run = {"task": "digits-rotate"}
    base = A.honest_round(run, num_clients=clients)
    rounds = {m: A.with_discovery(base, None, run=run, robust=m) for m in MODES}
    digits = _median_times({m: (lambda r=rounds[m]: A.aggregate(r, r.replies)) for m in MODES}, repeats)

    cfg = parse_run_config({"task": "cifar10-rotate"})
    handle = build_handle(cfg, task_info("cifar10-rotate").build_model)
    template = {k: v.detach().numpy().astype(np.float32) if v.is_floating_point() else v.numpy()
                for k, v in handle.shared_state_dict().items()}
    c = handle.num_adaptors
    rng = np.random.default_rng(0)
    replies = []
    for _ in range(20):
        n = float(rng.integers(50, 500))
        arrays = {k: (v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) if v.dtype.kind == "f" else v)
                  for k, v in template.items()}
        replies.append((arrays, n, (n * rng.dirichlet(np.ones(c))).tolist()))

    def accumulate(mode):
        acc = make_accumulator(template, c, mode)
        for arrays, n, w in replies:
            acc.add(arrays, n, w, small=True)
        return acc.result()

    cnn = _median_times({m: (lambda m=m: accumulate(m)) for m in MODES}, repeats)
    size = int(sum(v.size for v in template.values()))
    return {"digits-aggregate-s": digits, "cnn-accumulate-s": cnn, "cnn-values": size, "clients": clients}


# ------------------------------------------------------------------ report


def machine_line(result: dict[str, Any]) -> str:
    """Where the numbers were taken: CPUs, torch threads, versions, load average (start, end)."""
    h, v = result.get("host", {}), result.get("versions", {})
    loads = [result.get(k) for k in ("load-average-start", "load-average-end") if result.get(k)]
    load = " -> ".join(f"{x[0]:.1f}" for x in loads)
    return (f"Machine: {h.get('cpus-usable', h.get('cpus', '?'))} usable CPUs, torch threads "
            f"{h.get('torch-threads', '?')}, device cpu; flwr {v.get('flwr', '?')}, torch {v.get('torch', '?')}, "
            f"python {v.get('python', '?')}; 1-minute load average {load or '?'} (start -> end).")


def markdown(result: dict[str, Any]) -> str:
    lines = [machine_line(result), "", "| category | attempts | rejected | bounded | crash | loss |", "|---|---|---|---|---|---|"]
    for cat, t in result.get("tally", {}).items():
        lines.append(f"| {cat} | {t['attempts']} | {t['rejected']} | {t['bounded']} | {t['crash']} | {t['loss']} |")
    if result.get("accuracy"):
        lines += ["", "| robust | clean accuracy | with one attacker | s/round clean | s/round attacked |",
                  "|---|---|---|---|---|"]
        by = {(r["mode"], r["attacked"]): r for r in result["accuracy"]}
        for m in MODES:
            c, a = by.get((m, False), {}), by.get((m, True), {})
            fmt = lambda r: f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else r.get("status", "-")  # noqa: E731
            s = lambda r: f"{r['mean-round-s']:.2f}" if r.get("mean-round-s") else "-"  # noqa: E731
            lines.append(f"| {m} | {fmt(c)} | {fmt(a)} | {s(c)} | {s(a)} |")
    if result.get("cost"):
        d, n = result["cost"]["digits-aggregate-s"], result["cost"]["cnn-accumulate-s"]
        lines += ["", f"| robust | digits aggregate_train ({result['cost']['clients']} replies) | ratio | "
                  f"CNN accumulate (20 x {result['cost']['cnn-values']:,} values) | ratio |", "|---|---|---|---|---|"]
        for m in MODES:
            lines.append(f"| {m} | {1e3 * d[m]:.1f} ms | {d[m] / d['none']:.2f} | {1e3 * n[m]:.0f} ms | "
                         f"{n[m] / n['none']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip-attempts", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--code", default=None, help="another checkout whose floral_flwr the battery runs against")
    a = p.parse_args()
    _setup_path(a.code)
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("floral_flwr").setLevel(logging.ERROR)
    import floral_flwr

    from floral_flwr.provenance import host_info, versions

    result: dict[str, Any] = {"code": str(Path(floral_flwr.__file__).parent.parent),
                              "host": host_info("cpu"), "versions": versions(),
                              "load-average-start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_attempts:
            rows = attempts(Path(tmp))
            result["attempts"] = rows
            result["tally"] = tally(rows)
            print(markdown(result), flush=True)
        if not a.skip_cost and not a.code:
            result["cost"] = cost(a.clients, a.repeats)
            _write(a, result)

        def partial(rows: list[dict[str, Any]]) -> None:
            result["accuracy"] = rows
            _write(a, result)

        if not a.skip_accuracy and not a.code:
            result["accuracy"] = accuracy_runs(Path(tmp), a.rounds, a.clients, done=partial)
    print(_write(a, result))


def _write(a: argparse.Namespace, result: dict[str, Any]) -> str:
    """Write the JSON (and markdown) of what is measured so far; returns the markdown."""
    result["load-average-end"] = list(os.getloadavg())
    Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    if a.markdown:
        Path(a.markdown).write_text(text)
    return text


if __name__ == "__main__":
    main()
