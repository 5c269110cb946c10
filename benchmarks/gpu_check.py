"""The GPU workstation check: CUDA tests, core step, in-process runner, loopback deployment.

Started by ``benchmarks/gpu_check.sh`` (which first installs the wheels it brings when ``flwr``
is not importable); run it directly only where ``flwr`` is installed:

    python benchmarks/gpu_check.py --device cuda|cpu --out DIR [--work DIR] [--budget-s 480]

Parts, each a subprocess with its own time limit (taken from one overall budget, keeping a
minimum for the parts after it), its output appended to ``<out>/gpu_check.log``:

0. ``env``: Python, torch, CUDA device, flwr (and whether it came from the carried wheels).
1. ``tests``: ``pytest -m cuda`` over the suite (cuda: must pass with at least one test and
   none skipped); on cpu the same tests' CPU twins (``tests/test_cuda.py -m "not cuda"``) pass
   and the ``cuda`` cases skip cleanly.
2. ``core``: ``benchmarks/bench_layer.py --device <d>``: one training step, bare model vs FLoRAL,
   CIFAR-10 CNN and MLP 784-200-10 (target FLoRAL/bare <= 1.15) and VGG-8, C = 2/4/8, batch 256.
3. ``inline``: ``benchmarks/bench_round.py --engine inline``: the real ServerApp + ClientApp in
   one process (no Ray), 32 clients on the device, cifar10-label-shift on random images,
   FedAvg vs FLoRAL: samples/s (target FLoRAL >= 0.85x FedAvg) and peak GPU memory per client.
4. ``deploy``: ``benchmarks/bench_deploy_device.py``: a loopback deployment of 4 SuperNodes on
   the device (SuperLink + SuperNodes as processes, no Ray), FedAvg vs FLoRAL, same figures.

``--device cpu`` is the dry run: the same parts at tiny sizes, so that the script cannot rot
between GPU runs (``tests/test_gpu_check.py``). A missed speed *target* is reported, not a
failure; a part fails when its command fails or times out. Writes ``gpu_check.json``,
``gpu_check.md`` and ``gpu_check.log`` to ``--out`` (three files: a lent machine returns at most
eight), scratch to ``--work``; prints one line per part and the summary table last. Exit code 0
only when every part is ok.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

CORE_TARGET = 1.15      # FLoRAL / bare training step (CNN and MLP)
INLINE_TARGET = 0.85    # FLoRAL / FedAvg samples/s


@dataclass
class Sizes:
    """Problem sizes and time caps of one device mode."""

    budget_s: float
    core: list[str]
    inline: list[str]
    deploy: list[str]
    caps: dict[str, float]      # part -> at most this many seconds
    reserve: dict[str, float]   # part -> kept for it while earlier parts run


SIZES = {
    "cuda": Sizes(
        budget_s=480.0,
        core=["--batch", "256", "--steps", "40", "--mlp-steps", "100", "--vgg-steps", "20", "--warmup", "10",
              "--infer-inner", "5", "--threads", "4", "--C", "2", "4", "8"],
        inline=["--clients", "32", "--synthetic-train", "32768", "--rounds", "5", "--repeats", "3"],
        deploy=["--nodes", "4", "--rounds", "4", "--train-per-node", "2048", "--test-per-node", "256",
                "--timeout", "150"],
        caps={"env": 60, "tests": 180, "core": 120, "inline": 180, "deploy": 330},
        reserve={"env": 10, "tests": 40, "core": 30, "inline": 60, "deploy": 120},
    ),
    "cpu": Sizes(
        budget_s=870.0,
        core=["--batch", "8", "--steps", "2", "--mlp-steps", "2", "--vgg-steps", "1", "--warmup", "1",
              "--infer-inner", "1", "--threads", "1", "--C", "2"],
        inline=["--clients", "4", "--synthetic-train", "128", "--rounds", "2", "--repeats", "1"],
        # 2 of the 4 clients as SuperNodes: every deployed message starts a process that imports
        # torch, the dry run's main cost on 2 cores
        deploy=["--nodes", "2", "--partitions", "4", "--rounds", "1", "--train-per-node", "16",
                "--test-per-node", "8", "--batch-size", "16", "--timeout", "300"],
        # generous caps (a shared 2-core machine can be 5-10x slower than an idle one); the
        # reserves keep the later parts a chance when an earlier one is slow
        caps={"env": 200, "tests": 400, "core": 200, "inline": 300, "deploy": 700},
        reserve={"env": 20, "tests": 60, "core": 30, "inline": 50, "deploy": 150},
    ),
}
PART_ORDER = ("env", "tests", "core", "inline", "deploy")


@dataclass
class Part:
    name: str
    status: str = "FAIL"
    seconds: float = 0.0
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, bool] = field(default_factory=dict)  # target name -> met
    markdown: str = ""


class Runner:
    """Runs the parts' commands with time limits from one budget; logs to ``<out>/gpu_check.log``."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args = args
        self.sizes = sizes
        self.deadline = time.monotonic() + args.budget_s
        self.log_path = Path(args.out) / "gpu_check.log"
        # the parts' temporary files (bench_round's data, pytest's tmp_path) go to the scratch
        # folder, which the caller removes
        tmp = Path(args.work) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}

    def limit(self, part: str) -> float:
        later = PART_ORDER[PART_ORDER.index(part) + 1:]
        left = self.deadline - time.monotonic() - sum(self.sizes.reserve[p] for p in later)
        return min(self.sizes.caps[part], left)

    def run(self, part: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        """(exit code, output); 124 on timeout (the process group is stopped, TERM then KILL)."""
        limit = self.limit(part)
        with open(self.log_path, "a") as log:
            log.write(f"\n===== [{part}] {' '.join(cmd)}  (limit {limit:.0f} s)\n")
        if limit < 5:
            return 124, f"not started: only {limit:.0f} s of the budget left"
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            out = self._stop(proc) + f"\n[gpu_check] {part}: timed out after {limit:.0f} s\n"
            rc = 124
        with open(self.log_path, "a") as log:
            log.write(out)
            log.write(f"===== [{part}] exit code {rc}\n")
        return rc, out

    @staticmethod
    def _stop(proc: subprocess.Popen) -> str:
        """Stop the part's own process group: TERM (a deployment stops what it started), then KILL."""
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=wait)
                return out or ""
            except subprocess.TimeoutExpired:
                continue
        return ""


def _verdict(args: argparse.Namespace, met: bool) -> str:
    if args.device != "cuda":
        return "not judged (dry run)"
    return "met" if met else "MISSED"


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _pytest_counts(out: str) -> dict[str, int]:
    """Counts from pytest's closing line ('3 passed, 2 skipped in 1.2s')."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for line in reversed(out.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line)
        if found:
            for n, k in found:
                counts["error" if k.startswith("error") else k] += int(n)
            break
    return counts


# ---------------------------------------------------------------------------- parts

# Run in the probe: requirements of the carried wheels (or of flwr, when it was installed already)
# that what is importable does not meet; reported, not fatal (the image's versions are unknown
# when the wheels are built).
REQUIREMENT_CHECK = """
def mismatches():
    import os
    from importlib import metadata
    from packaging.requirements import Requirement
    site = os.environ.get('GPU_CHECK_SITE', '')
    dists = [d for d in metadata.distributions()
             if (site and str(d.locate_file('')).startswith(site)) or
                (not site and d.metadata['Name'].lower() in ('flwr', 'flwr-datasets', 'datasets'))]
    out = []
    for d in dists:
        for spec in d.requires or []:
            req = Requirement(spec)
            if req.name.lower() in ('ray', 'uv'):  # never carried (build_gpu_wheels.py: SKIP)
                continue
            if req.marker is not None and not req.marker.evaluate({'extra': ''}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                out.append(f"{d.metadata['Name']} needs {req}, found {have or 'nothing'}")
    return sorted(set(out))
"""


def part_env(r: Runner, args: argparse.Namespace) -> Part:
    p = Part("env")
    code = REQUIREMENT_CHECK + (
        "import json, platform, sys, torch\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'cuda_available': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda}\n"
        "if torch.cuda.is_available():\n"
        "    pr = torch.cuda.get_device_properties(0)\n"
        "    info.update(device_name=pr.name, device_mem_gib=round(pr.total_memory / 2**30, 1),\n"
        "                capability='%d.%d' % (pr.major, pr.minor), bf16=torch.cuda.is_bf16_supported())\n"
        "try:\n"
        "    import flwr; info['flwr'] = flwr.__version__; info['flwr_path'] = flwr.__path__[0]\n"
        "except Exception as e:\n"
        "    info['flwr_error'] = repr(e)\n"
        "import floral_flwr; info['floral_flwr_path'] = floral_flwr.__file__\n"
        "info['requirement_mismatches'] = mismatches()\n"
        "print('ENV ' + json.dumps(info))\n"
    )
    rc, out = r.run("env", [PY, "-c", code])
    info: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith("ENV "):
            info = json.loads(line[4:])
    info["cpus"] = os.cpu_count()
    info["machine"] = platform.machine()
    info["wheels"] = args.install_note or "none installed (flwr was importable)"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        info["nvidia_smi"] = smi
    except (OSError, subprocess.TimeoutExpired):
        pass
    p.figures = info
    problems = []
    if rc != 0 or not info:
        problems.append(f"probe failed (exit {rc})")
    if "flwr" not in info:
        problems.append(f"flwr not importable: {info.get('flwr_error', '?')}")
    if args.device == "cuda" and not info.get("cuda_available"):
        problems.append("CUDA is not available to torch")
    if not str(info.get("floral_flwr_path", "")).startswith(str(ROOT)):
        problems.append(f"floral_flwr imported from {info.get('floral_flwr_path')}, not this checkout")
    p.status = "FAIL" if problems else "ok"
    mism = info.get("requirement_mismatches", [])
    dev = (f"{info.get('device_name')} {info.get('device_mem_gib')} GiB, CUDA {info.get('torch_cuda')}"
           if info.get("cuda_available") else "no CUDA device")
    p.summary = (f"Python {info.get('python')}, torch {info.get('torch')}, flwr {info.get('flwr', '-')}, {dev}"
                 + (f"; {'; '.join(problems)}" if problems else "")
                 + (f"; {len(mism)} requirement(s) not met (see gpu_check.json env)" if mism else ""))
    if rc != 0:
        p.summary += "\n" + _tail(out)
    return p


def part_tests(r: Runner, args: argparse.Namespace) -> Part:
    p = Part("tests")
    # own options only (addopts' -q twice would drop pytest's closing counts line)
    base = [PY, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rs"]
    if args.device == "cuda":
        rc, out = r.run("tests", base + ["-m", "cuda", "tests"])
        c = _pytest_counts(out)
        ok = rc == 0 and c["passed"] > 0 and c["skipped"] == 0
        p.summary = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped (pytest -m cuda)"
    else:
        # one run: the CPU twins pass, the cuda cases skip (each skip names CUDA, counted by -rs)
        rc, out = r.run("tests", base + ["tests/test_cuda.py"])
        c = _pytest_counts(out)
        cuda_skips = sum(int(n) for n in re.findall(r"SKIPPED \[(\d+)\] .*CUDA is not available", out))
        ok = rc == 0 and c["passed"] > 0 and c["failed"] == 0 and c["skipped"] == cuda_skips > 0
        p.summary = (f"CPU twins: {c['passed']} passed, {c['failed']} failed; cuda cases: {cuda_skips} "
                     f"skipped cleanly (no CUDA), {c['skipped'] - cuda_skips} skipped otherwise")
        c = {"cpu": c, "cuda_skipped": cuda_skips}
    p.figures = {"counts": c}
    p.status = "ok" if ok else "FAIL"
    if not ok:
        p.summary += "\n" + _tail(out, 40)
    return p


def part_core(r: Runner, args: argparse.Namespace) -> Part:
    p = Part("core")
    js, md = Path(args.work) / "core.json", Path(args.work) / "core.md"
    rc, out = r.run("core", [PY, "benchmarks/bench_layer.py", "--device", args.device, "--models", "cnn", "mlp",
                             "vgg8", "--json", str(js), "--markdown", str(md), *SIZES[args.device].core])
    if rc != 0 or not js.exists():
        p.summary = f"bench_layer.py exit code {rc}\n" + _tail(out)
        return p
    data = json.loads(js.read_text())
    by_model: dict[str, dict[int, float]] = {}
    for row in data["rows"]:
        by_model.setdefault(row["model"], {})[row["C"]] = row["floral_over_bare"]
    p.figures = {"floral_over_bare": by_model, "rows": data["rows"], "header": data["header"]}
    met = all(v <= CORE_TARGET for m in ("cnn", "mlp") for v in by_model.get(m, {}).values())
    if args.device == "cuda":  # dry-run sizes say nothing about speed
        p.targets = {f"core FLoRAL/bare <= {CORE_TARGET} (CNN, MLP)": met}
    cs = sorted(next(iter(by_model.values())))
    batch = data["rows"][0]["batch"]
    names = {"cnn": "CNN", "mlp": "MLP", "vgg8": "VGG-8"}
    p.summary = (f"FLoRAL/bare step, batch {batch}, C={'/'.join(map(str, cs))}: "
                 + ", ".join(f"{names[m]} " + "/".join(f"{v[c]:.2f}" for c in cs) for m, v in by_model.items())
                 + f"; target <= {CORE_TARGET} (CNN, MLP) {_verdict(args, met)}")
    p.markdown = md.read_text() if md.exists() else ""
    p.status = "ok"
    return p


def part_inline(r: Runner, args: argparse.Namespace) -> Part:
    p = Part("inline")
    js, md = Path(args.work) / "inline.json", Path(args.work) / "inline.md"
    rc, out = r.run("inline", [PY, "benchmarks/bench_round.py", "--engine", "inline", "--device", args.device,
                               "--task", "cifar10-label-shift", "--json", str(js), "--markdown", str(md),
                               *SIZES[args.device].inline],
                    env={"OMP_NUM_THREADS": "4" if args.device == "cuda" else "1"})
    if rc != 0 or not js.exists():
        p.summary = f"bench_round.py exit code {rc}\n" + _tail(out)
        return p
    res = json.loads(js.read_text())["results"]

    def med(method: str, key: str) -> float | None:
        vals = sorted(x[key] for x in res[method] if key in x)
        return vals[len(vals) // 2] if vals else None

    sps = {m: med(m, "samples_per_s") for m in ("fedavg", "floral")}
    mem = {m: med(m, "gpu_mem_mb") for m in ("fedavg", "floral")}
    ratio = sps["floral"] / sps["fedavg"] if sps["fedavg"] else float("nan")
    clients = SIZES[args.device].inline[1]
    p.figures = {"samples_per_s": sps, "floral_over_fedavg": ratio, "gpu_mem_per_client_mib": mem,
                 "round_s": {m: med(m, "round") for m in sps}, "repetitions": res}
    met = ratio >= INLINE_TARGET
    if args.device == "cuda":
        p.targets = {f"inline FLoRAL/FedAvg samples/s >= {INLINE_TARGET}": met}
    mem_txt = (f"; peak GPU MiB per client FedAvg {mem['fedavg']:.0f}, FLoRAL {mem['floral']:.0f}"
               if mem["floral"] is not None else "")
    p.summary = (f"{clients} clients: FedAvg {sps['fedavg']:.0f} samples/s, FLoRAL {sps['floral']:.0f} "
                 f"({ratio:.2f}x; target >= {INLINE_TARGET} {_verdict(args, met)}){mem_txt}")
    p.markdown = md.read_text() if md.exists() else ""
    p.status = "ok"
    return p


def part_deploy(r: Runner, args: argparse.Namespace) -> Part:
    p = Part("deploy")
    js, md = Path(args.work) / "deploy.json", Path(args.work) / "deploy.md"
    rc, out = r.run("deploy", [PY, "benchmarks/bench_deploy_device.py", "--device", args.device,
                               "--work", str(Path(args.work) / "deploy"), "--json", str(js), "--markdown", str(md),
                               *SIZES[args.device].deploy],
                    env={"OMP_NUM_THREADS": "2" if args.device == "cuda" else "1",
                         "FLWR_HOME": str(Path(args.work) / "flwr-home")})
    if not js.exists():
        p.summary = f"bench_deploy_device.py exit code {rc}\n" + _tail(out)
        return p
    res = json.loads(js.read_text())["results"]
    p.figures = res
    parts = []
    for m, name in (("fedavg", "FedAvg"), ("floral", "FLoRAL")):
        x = res.get(m, {})
        mem = x.get("gpu_mem_per_process_max_mib")
        parts.append(f"{name} {x.get('status', 'not run')}, {x.get('samples_per_s') or 0:.3g} samples/s "
                     f"(warm round {x.get('warm_round_s') or 0:.2f} s)" + (f", GPU MiB/process {mem:.0f}" if mem else ""))
    ratio = res.get("floral_over_fedavg_samples_per_s")
    nodes = SIZES[args.device].deploy[1]
    p.summary = f"{nodes} SuperNodes sharing the device: " + "; ".join(parts) + (f"; FLoRAL/FedAvg {ratio:.2f}x" if ratio else "")
    p.markdown = md.read_text() if md.exists() else ""
    p.status = "ok" if rc == 0 else "FAIL"
    if rc != 0:
        p.summary += "\n" + _tail(out)
    return p


PARTS: dict[str, Callable[[Runner, argparse.Namespace], Part]] = {
    "env": part_env, "tests": part_tests, "core": part_core, "inline": part_inline, "deploy": part_deploy,
}


# ---------------------------------------------------------------------------- report

def write_report(args: argparse.Namespace, parts: list[Part], wall: float) -> str:
    out = Path(args.out)
    env = next((p.figures for p in parts if p.name == "env"), {})
    targets = {k: v for p in parts for k, v in p.targets.items()}
    ok = all(p.status == "ok" for p in parts)
    report = {"device": args.device, "ok": ok, "wall_s": round(wall, 1), "budget_s": args.budget_s,
              "env": env, "targets": targets,
              "parts": {p.name: {"status": p.status, "seconds": round(p.seconds, 1), "summary": p.summary,
                                 "figures": p.figures} for p in parts}}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# gpu_check.sh --device {args.device}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {env.get('nvidia_smi') or env.get('device_name') or 'no GPU'}; "
             f"Python {env.get('python')}, torch {env.get('torch')}, flwr {env.get('flwr')}; {env.get('cpus')} CPUs; "
             f"wheels: {env.get('wheels')}; wall {wall:.0f} s", "",
             "| part | status | seconds | figures |", "|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.summary.splitlines()[0] if p.summary else ''} |")
    lines += ["", "Targets: " + (", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items())
                                 or "not judged (dry run)"), ""]
    for p in parts:
        if p.markdown:
            lines += [f"## {p.name}", "", p.markdown.strip(), ""]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    table = [f"{'part':7s} {'status':6s} {'s':>5s}  figures"]
    for p in parts:
        table.append(f"{p.name:7s} {p.status:6s} {p.seconds:5.0f}  {p.summary.splitlines()[0] if p.summary else ''}")
    missed = [k for k, v in targets.items() if not v]
    n_ok = sum(p.status == "ok" for p in parts)
    verdict = ("targets not judged (dry run)" if args.device != "cuda" else
               f"targets missed: {'; '.join(missed)}" if missed else "all targets met")
    table.append(f"gpu_check --device {args.device}: {n_ok}/{len(parts)} parts ok, {verdict}"
                 + f"; wall {wall:.0f} s; results in {out}/gpu_check.{{json,md,log}}")
    return "\n".join(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="scratch (data, run outputs); the caller removes it")
    ap.add_argument("--budget-s", type=float, default=0.0, help="overall time budget (default: the device's)")
    ap.add_argument("--parts", nargs="+", default=list(PART_ORDER), choices=PART_ORDER)
    ap.add_argument("--install-note", default="", help="what gpu_check.sh installed (for the report)")
    args = ap.parse_args()
    sizes = SIZES[args.device]
    args.budget_s = args.budget_s or sizes.budget_s
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    runner = Runner(args, sizes)
    t0 = time.monotonic()
    parts: list[Part] = []
    for name in args.parts:
        print(f"[gpu_check] {name} ... (limit {runner.limit(name):.0f} s)", flush=True)
        t = time.monotonic()
        try:
            part = PARTS[name](runner, args)
        except Exception as exc:  # a broken report of one part must not hide the others
            part = Part(name, summary=f"{type(exc).__name__}: {exc}")
        part.seconds = time.monotonic() - t
        parts.append(part)
        print(f"[gpu_check] {name}: {part.status} in {part.seconds:.0f} s: {part.summary}", flush=True)
        if name == "env" and part.status != "ok":
            break  # nothing else can work (no flwr, no CUDA, wrong checkout)
    table = write_report(args, parts, time.monotonic() - t0)
    print("\n" + table, flush=True)
    return 0 if all(p.status == "ok" for p in parts) and len(parts) == len(args.parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
