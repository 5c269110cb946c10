"""The GPU workstation check cannot rot: its CPU dry run passes end to end, and its pieces (time
limits, pytest counts, the wrapper's argument and wheel handling, the wheel-folder closure check)
behave as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load(ROOT / "benchmarks" / "gpu_check.py", "gpu_check_under_test")
wheels = _load(ROOT / "scripts" / "build_gpu_wheels.py", "build_gpu_wheels_under_test")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **extra}


@pytest.mark.slow
def test_cpu_dry_run_of_the_whole_check(tmp_path):
    """``gpu_check.sh --device cpu``: every part runs (tests, core, inline, deploy) and passes,
    the report files hold each part's figures, and the summary is the last line."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check --device cpu: 5/5 parts ok"), last
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["device"] == "cpu"
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PART_ORDER)
    assert all(p["status"] == "ok" for p in parts.values())
    counts = parts["tests"]["figures"]["counts"]
    assert counts["cpu"]["passed"] > 0 and counts["cpu"]["failed"] == 0
    assert counts["cuda_skipped"] == counts["cpu"]["passed"]  # one cuda twin per cpu case
    core = parts["core"]["figures"]["floral_over_bare"]
    assert set(core) == {"cnn", "mlp", "vgg8"} and all(set(v) == {"2"} for v in core.values())
    assert all(x > 0 for v in core.values() for x in v.values())
    inline = parts["inline"]["figures"]
    assert inline["samples_per_s"]["fedavg"] > 0 and inline["samples_per_s"]["floral"] > 0
    deploy = parts["deploy"]["figures"]
    for m in ("fedavg", "floral"):
        assert deploy[m]["status"] == "finished:completed" and len(deploy[m]["round_s"]) == 1
        assert deploy[m]["samples_per_s"] > 0
    assert report["targets"] == {}  # a dry run judges no speed target
    md = (out / "gpu_check.md").read_text()
    assert "| deploy | ok |" in md and "## core" in md
    log = (out / "gpu_check.log").read_text()
    assert "floral: finished:completed" in log and "===== [deploy] exit code 0" in log


def test_part_time_limit_stops_the_process_group(tmp_path):
    """A part that runs past its limit is stopped with its children and reported as timed out;
    later parts keep their reserve."""
    args = types.SimpleNamespace(out=str(tmp_path), work=str(tmp_path / "work"), budget_s=60.0)
    sizes = gpu_check.Sizes(budget_s=60, core=[], inline=[], deploy=[],
                            caps={p: 6.0 if p == "core" else 60.0 for p in gpu_check.PART_ORDER},
                            reserve={p: 1.0 for p in gpu_check.PART_ORDER})
    runner = gpu_check.Runner(args, sizes)
    assert runner.limit("core") == 6.0
    assert runner.limit("tests") == pytest.approx(60.0 - 3.0, abs=1.0)  # minus core/inline/deploy reserves
    pid_file = tmp_path / "child.pid"
    t0 = time.monotonic()
    rc, out = runner.run("core", ["bash", "-c", f"sleep 100 & echo $! > {pid_file}; wait"])
    assert rc == 124 and "timed out" in out and time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "[core]" in log and "exit code 124" in log


def test_pytest_counts_read_the_closing_line():
    out = "....\nSKIPPED [2] x.py:3: CUDA is not available\n3 passed, 1 failed, 2 skipped, 4 deselected in 1.2s\n"
    assert gpu_check._pytest_counts(out) == {"passed": 3, "failed": 1, "skipped": 2, "error": 0, "deselected": 4}
    assert gpu_check._pytest_counts("1 error in 0.1s")["error"] == 1
    assert gpu_check._pytest_counts("no tests ran")["passed"] == 0


def test_wrapper_refuses_bad_arguments_and_missing_wheels(tmp_path):
    bad = subprocess.run(["bash", str(SCRIPT), "--device", "tpu", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and "allowed: cuda, cpu" in bad.stderr
    # an interpreter without flwr (no site-packages) and an empty wheel folder: a clear refusal
    nosite = tmp_path / "python-nosite"
    nosite.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    nosite.chmod(0o755)
    empty = tmp_path / "wheels"
    empty.mkdir()
    # no inherited PYTHONPATH either (an in-process Flower simulation earlier in the session can
    # leave site-packages in it): this interpreter must not find flwr
    nosite_env = {k: v for k, v in _env(PYTHON=str(nosite)).items() if k != "PYTHONPATH"}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--out", str(tmp_path / "o"),
                           "--wheels", str(empty)], capture_output=True, text=True,
                          env=nosite_env, timeout=60)
    assert proc.returncode == 3 and "holds no wheels" in proc.stderr and "build_gpu_wheels.sh" in proc.stderr


# ---------------------------------------------------------------- the wheel folder's closure check

def _wheel(name: str, version: str, requires: list[str], folder: Path) -> "wheels.Wheel":
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    path.write_bytes(b"")
    return wheels.Wheel(name, Version(version), path, [Requirement(r) for r in requires])


def test_closure_check_finds_missing_mismatched_and_duplicate_wheels(tmp_path):
    image = {"numpy", "requests"}
    ws = {
        "flwr": _wheel("flwr", "1.42.0", ["numpy>=1.26", "grpcio>=1.70,<2", "cryptography>=50,<51",
                                           "ray==2.55.1; extra == 'simulation'", "uv>=0.13"], tmp_path),
        "grpcio": _wheel("grpcio", "1.85.3", [], tmp_path),
        "cryptography": _wheel("cryptography", "49.0.0", ["cffi>=2.0; platform_python_implementation != 'PyPy'"],
                               tmp_path),
    }
    problems = wheels.check(ws, image, "3.12", tmp_path)
    assert "flwr needs cryptography<51,>=50, carried cryptography 49.0.0" in problems
    assert any(p.startswith("cryptography needs cffi>=2.0") and "neither carried nor in the image" in p
               for p in problems)
    assert not any("numpy" in p or "grpcio" in p or "ray" in p or "uv" in p for p in problems)  # image / SKIP
    (tmp_path / "grpcio-1.80.0-py3-none-any.whl").write_bytes(b"")
    assert any(p.startswith("grpcio: more than one wheel") for p in wheels.check(ws, image, "3.12", tmp_path))


def test_markers_are_evaluated_for_the_target_python():
    old = Requirement("tomli>=2; python_version < '3.11'")
    assert wheels.applies(old, "3.10", set()) and not wheels.applies(old, "3.12", set())
    extra = Requirement("greenlet>=1; extra == 'asyncio'")
    assert wheels.applies(extra, "3.12", {"asyncio"}) and not wheels.applies(extra, "3.12", set())
