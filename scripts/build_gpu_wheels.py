"""Build the wheel folder that ``benchmarks/gpu_check.sh`` installs on a GPU machine.

    python scripts/build_gpu_wheels.py [--out .gpu-wheels] [--python-version 3.12] [--max-mib 40]

The GPU machine's image has Python, torch, transformers and many scientific packages
(``scripts/gpu_image_packages.txt``) but no ``flwr`` and no ``ray``, no network, and only a
limited size can be carried along. This script finds what must be carried:

1. Roots: this project's own wheel (built here, ``pip wheel --no-deps .``), ``flwr``,
   ``flwr-datasets`` (the image tasks' partitioners) and ``datasets`` (parquet I/O).
2. From each downloaded wheel's ``METADATA`` (``Requires-Dist``, environment markers evaluated
   for the target Python on Linux x86-64; the extras flwr itself asks for, e.g.
   ``sqlalchemy[asyncio]``, ``uvicorn[standard]``) every requirement not already in the image is
   added, recursively. ``FORCE`` are carried even though the image has them (flwr pins a range
   the image's copy may miss, or its generated code needs that runtime); ``SKIP`` are never
   carried (reasons there).
3. Each is fetched with ``pip download --no-deps --only-binary=:all: --python-version X
   --implementation cp --platform manylinux...`` at the version installed here when that
   satisfies the requirement (the combination the test suite runs with), else the newest that does.

It then checks the folder: every non-optional requirement of every wheel is met by a wheel in the
folder (with a satisfied version) or by a package of the image (names only: the image's versions
are not known here), exactly one wheel per project, and the total size under ``--max-mib``.
Writes ``<out>/MANIFEST.md`` (package, version, size, required by) and prints it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ["flwr", "flwr-datasets", "datasets"]
# carried although the image has a copy: flwr's generated protobuf/gRPC code needs matching
# runtimes, and flwr pins ranges of these small pure-Python CLI libraries that a newer image copy
# may fall outside of
FORCE = {"protobuf", "grpcio", "typer", "rich", "click", "packaging"}
SKIP = {
    "ray": "the simulation engine: its wheel alone exceeds the carry limit; the check uses the "
           "in-process runner and a deployment instead",
    "uv": "flwr runs it only to install an app's dependencies, which "
          "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 turns off (20+ MiB)",
    "torch": "in the image (CUDA build)", "torchvision": "in the image",
}
# glibc versions a manylinux wheel may target; pip matches each tag exactly
PLATFORMS = (["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + ["linux_x86_64"])


@dataclass
class Wheel:
    name: str
    version: Version
    path: Path
    requires: list[Requirement] = field(default_factory=list)
    required_by: set[str] = field(default_factory=set)


def image_packages(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta_name).decode())
    reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
    return canonicalize_name(name), version, reqs


def target_env(python_version: str, extra: str = "") -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python_version, python_full_version=python_version + ".0",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", extra=extra)
    return env


def applies(req: Requirement, python_version: str, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(target_env(python_version, e)) for e in ({""} | extras))


def local_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def pip_download(spec: str, dest: Path, python_version: str) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--disable-pip-version-check",
           "-q", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    proc = subprocess.run(cmd + [spec], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip download {spec!r} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    new = set(dest.glob("*.whl")) - before
    if not new:  # already there
        name = canonicalize_name(Requirement(spec).name)
        new = {p for p in dest.glob("*.whl") if canonicalize_name(parse_wheel_filename(p.name)[0]) == name}
    return sorted(new)[-1]


def build_own_wheel(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                               "-w", tmp, str(ROOT)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"building this project's wheel failed:\n{proc.stderr.strip()}")
        built = next(Path(tmp).glob("*.whl"))
        target = dest / built.name
        shutil.copy2(built, target)
    return target


def collect(out: Path, python_version: str, image: set[str]) -> tuple[dict[str, Wheel], list[str]]:
    wheels: dict[str, Wheel] = {}
    notes: list[str] = []
    own = build_own_wheel(out)
    queue: list[tuple[str, set[str], str]] = []  # (spec, extras, required by)

    def add(path: Path, required_by: str) -> Wheel:
        name, version, reqs = wheel_metadata(path)
        wheels[name] = w = Wheel(name, version, path, reqs, {required_by})
        return w

    own_wheel = add(own, "this project")
    for r in own_wheel.requires:
        if canonicalize_name(r.name) in {canonicalize_name(x) for x in ROOTS}:
            queue.append((str(r), set(r.extras), own_wheel.name))
    queued = {canonicalize_name(Requirement(q[0]).name) for q in queue}
    queue += [(r, set(), "gpu_check (root)") for r in ROOTS if canonicalize_name(r) not in queued]
    seen_extras: dict[str, set[str]] = {}
    while queue:
        spec, extras, parent = queue.pop(0)
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name in SKIP:
            notes.append(f"{name}: not carried ({SKIP[name]}); required by {parent}")
            continue
        if name in image and name not in FORCE:
            continue
        if name in wheels:
            wheels[name].required_by.add(parent)
            if not req.specifier.contains(wheels[name].version, prereleases=True):
                raise SystemExit(f"{name} {wheels[name].version} does not satisfy {spec} of {parent}")
            new_extras = set(req.extras) - seen_extras.get(name, set())
            if not new_extras:
                continue
            extras = new_extras
        else:
            have = local_version(req.name)
            pin = f"{req.name}=={have}" if have is not None and req.specifier.contains(have, prereleases=True) \
                else f"{req.name}{req.specifier}"
            add(pip_download(pin, out, python_version), parent)
        seen_extras.setdefault(name, set()).update(req.extras)
        for dep in wheels[name].requires:
            if applies(dep, python_version, set(req.extras) | extras):
                dep_extras = set(dep.extras)
                queue.append((str(Requirement(f"{dep.name}{'[' + ','.join(sorted(dep_extras)) + ']' if dep_extras else ''}{dep.specifier}")),
                              dep_extras, name))
    return wheels, notes


def check(wheels: dict[str, Wheel], image: set[str], python_version: str, out: Path) -> list[str]:
    problems = []
    projects: dict[str, list[str]] = {}
    for p in out.glob("*.whl"):
        projects.setdefault(canonicalize_name(parse_wheel_filename(p.name)[0]), []).append(p.name)
    for name, files in projects.items():
        if len(files) > 1:
            problems.append(f"{name}: more than one wheel ({', '.join(files)}): pip --target would stop")
    for w in wheels.values():
        for r in w.requires:
            if not applies(r, python_version, set()):
                continue
            dep = canonicalize_name(r.name)
            if dep in wheels:
                if not r.specifier.contains(wheels[dep].version, prereleases=True):
                    problems.append(f"{w.name} needs {r}, carried {dep} {wheels[dep].version}")
            elif dep not in image and dep not in SKIP:
                problems.append(f"{w.name} needs {r}: neither carried nor in the image")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".gpu-wheels"))
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--image-packages", default=str(ROOT / "scripts" / "gpu_image_packages.txt"))
    ap.add_argument("--max-mib", type=float, default=40.0,
                    help="fail above this total (the carry limit is 64 MiB with the repository)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    image = image_packages(Path(args.image_packages))
    wheels, notes = collect(out, args.python_version, image)
    problems = check(wheels, image, args.python_version, out)
    total = sum(w.path.stat().st_size for w in wheels.values())
    lines = [f"Wheels for Python {args.python_version} on Linux x86-64 (manylinux), built by "
             f"`scripts/build_gpu_wheels.sh`: {len(wheels)} wheels, {total / 2**20:.1f} MiB.", "",
             "| package | version | MiB | required by |", "|---|---|---|---|"]
    for w in sorted(wheels.values(), key=lambda w: -w.path.stat().st_size):
        lines.append(f"| {w.name} | {w.version} | {w.path.stat().st_size / 2**20:.2f} | "
                     f"{', '.join(sorted(w.required_by))} |")
    lines += ["", "Not carried: " + ("; ".join(sorted(set(notes))) or "-")]
    text = "\n".join(lines)
    (out / "MANIFEST.md").write_text(text + "\n")
    print(text)
    if total > args.max_mib * 2**20:
        problems.append(f"total {total / 2**20:.1f} MiB exceeds --max-mib {args.max_mib}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
