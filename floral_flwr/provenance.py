"""What ran where: package versions, the host, the source revision (recorded in every run's
config.json and on the first line of its log).

The ServerApp runs from the copy Flower installs from the FAB, which is no git tree, so a front
end computes the git revision of the checkout it builds the FAB from and passes it in
``FLORAL_SOURCE_REVISION`` (``launch`` does); :func:`source_hash` identifies the code either way.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

def versions() -> dict[str, str]:
    from floral_flwr import __version__

    out = {"floral-flwr": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("flwr", "torch", "numpy", "flwr-datasets", "scikit-learn", "ray", "tensorboard"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# launch (or any front end) computes the revision of the checkout it builds the FAB from and
# passes it here: the ServerApp itself runs from Flower's installed copy, which is no git tree
SOURCE_REVISION_ENV = "FLORAL_SOURCE_REVISION"
PACKAGE_DIR = Path(__file__).resolve().parent


def git_revision(path: str | os.PathLike) -> str | None:
    """``git rev-parse HEAD`` of the checkout at ``path`` (+ ``-dirty`` with uncommitted changes
    to tracked files), or None when ``path`` is not the top of a git work tree."""
    path = Path(path).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not top or Path(top).resolve() != path:
            return None  # e.g. Flower's app copy inside some unrelated repository
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) if rev else None


def git_revision_of_source() -> str | None:
    """The source revision: what the front end passed, else the checkout this package is in."""
    return os.environ.get(SOURCE_REVISION_ENV) or git_revision(PACKAGE_DIR.parent)


def source_hash(package_dir: str | os.PathLike = PACKAGE_DIR) -> str:
    """sha256 over the app's Python files (relative path + bytes, sorted): the same in a checkout
    and in the copy Flower installs from the FAB, so a result can be matched to its code even
    without git (``python -m floral_flwr version`` prints it for a checkout)."""
    package_dir = Path(package_dir)
    root = package_dir.parent
    files = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    files += [root / n for n in ("server_app.py", "client_app.py") if (root / n).exists()]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def host_info(device: str = "auto") -> dict[str, Any]:
    """Where the server process runs: CPUs, torch threads, CUDA devices, and what the run
    config's ``device`` resolves to here (each ClientApp resolves it again on its own node)."""
    info: dict[str, Any] = {"hostname": platform.node(), "cpus": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus-usable"] = len(os.sched_getaffinity(0))
    info["omp-num-threads"] = os.environ.get("OMP_NUM_THREADS", "")
    try:
        import torch

        info["torch-threads"] = torch.get_num_threads()
        cuda = torch.cuda.is_available()
        info["cuda"] = cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        info["cuda-version"] = torch.version.cuda
        info["device"] = "cuda" if (device == "cuda" or (device == "auto" and cuda)) else "cpu"
    except ImportError:  # pragma: no cover - the app always has torch
        info["device"] = "cpu"
    return info


def provenance(device: str = "auto", fab_hash: str | None = None) -> dict[str, Any]:
    """What ran where: package versions, host, source revision (recorded in config.json)."""
    return {
        "versions": versions(),
        "host": host_info(device),
        "git-revision": git_revision_of_source(),
        "source-sha256": source_hash(),
        "fab-hash": fab_hash,
    }


def provenance_line(prov: dict[str, Any]) -> str:
    """One line of :func:`provenance` for the top of the log."""
    v, h = prov["versions"], prov["host"]
    rev = prov.get("git-revision")
    src = f"git {rev[:12]}{'-dirty' if rev.endswith('-dirty') else ''}" if rev else "no git"
    gpu = f"cuda ({', '.join(h['gpus'])})" if h.get("gpus") else "cpu (no CUDA)" if not h.get("cuda") else "cuda"
    return (
        f"floral-flwr {v.get('floral-flwr', '?')} ({src}, source {prov['source-sha256'][:12]}) | "
        f"flwr {v.get('flwr', '?')}, torch {v.get('torch', '?')}, python {v['python']} | "
        f"server host {h.get('cpus-usable', h['cpus'])} CPUs, torch threads {h.get('torch-threads', '?')}, "
        f"device here: {gpu}"
    )
