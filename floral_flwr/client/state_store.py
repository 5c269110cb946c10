"""A client's private state: in ``context.state`` and, optionally, on the node's disk.

What a method keeps local (FLoRAL: the mixture logits; local adaptors, local statistics, ...)
is a flat ``dict[str, torch.Tensor]``. It lives in ``context.state`` for the run (Flower keeps
that in memory) and, when a state directory is configured, in a file that survives SuperNode
restarts and new runs:

- Safe format: a ``.npz`` written and read with ``allow_pickle=False`` plus a JSON header;
  nothing is ever unpickled.
- Atomic: written to a temporary file in the same directory, then ``os.replace``d; fsynced
  first when ``durable`` (a node's own state dir), so it also survives power loss.
- Checked: the header holds a SHA-256 over the arrays and each array's shape/dtype, and the
  state's *kind* (a string naming method + model shapes). A corrupt, truncated or foreign file
  is reported with a warning and the client starts fresh instead of crashing or using garbage.
- Versioned by round: the state saved after round t is ``round-<t>``; training round t loads the
  newest version saved before t. A run killed mid-round and resumed therefore restarts each
  client from exactly the state the uninterrupted run would have used. The three newest versions
  are kept (``KEEP_VERSIONS``: with a folded evaluation the server's last checkpoint can be two
  rounds behind).
- Namespaced by app and run (:func:`node_state_root`): a node's ``state-dir`` holds
  ``floral-flwr/<run>/client-<id>/``, ``<run>`` being the server's run directory name (the same
  when a run is resumed, different for every new run), so two runs, or another Flower app on
  the same node, never read each other's mixtures. The server cannot choose where a node writes:
  a path it suggests (``client-state-dir``, for simulation) is used only when it lies in a run
  directory the server created on this machine (:func:`accept_suggested_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from floral_flwr.fileio import atomic_write_bytes, npz_bytes

logger = logging.getLogger("floral_flwr")

_FILE_RE = re.compile(r"^round-(\d{6})\.npz$")
# versions kept: a resumed run restarts after the server's last checkpoint, which can trail this
# client's newest save by two rounds when the evaluation is folded (round r is recorded only once
# round r+1's exchange is in; a crash then redoes round r, which needs the state saved in r-1)
KEEP_VERSIONS = 3
APP_NAMESPACE = "floral-flwr"  # first level under a node's state-dir: this app's files only
DEFAULT_RUN_KEY = "default"  # messages of a server that names no run
RUN_MARKER = ".floral-run"  # written by the server in every run directory (floral_flwr.rundir)


@dataclass
class PrivateState:
    """A loaded private state and the round after which it was saved."""

    tensors: dict[str, torch.Tensor]
    round: int


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu").numpy().copy() for k, v in tensors.items()}


class StateDir:
    """Private state files of one client in ``root`` (created on first save)."""

    def __init__(self, root: str | os.PathLike, kind: str, durable: bool = True) -> None:
        self.root = Path(root)
        self.kind = kind
        self.durable = durable  # fsync before the atomic rename (survives power loss)

    def _versions(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _FILE_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def save(self, tensors: dict[str, torch.Tensor], server_round: int) -> Path:
        """Atomically write the state saved after ``server_round``; prune old versions."""
        self.root.mkdir(parents=True, exist_ok=True)
        arrays = to_numpy(tensors)
        header = {
            "kind": self.kind,
            "round": int(server_round),
            "sha256": _digest(arrays),
            "arrays": {k: [str(a.dtype), list(a.shape)] for k, a in arrays.items()},
        }
        header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        target = self.root / f"round-{server_round:06d}.npz"
        atomic_write_bytes(target, npz_bytes({"__header__": header_bytes, **arrays}), fsync=self.durable)
        for _, old in self._versions()[:-KEEP_VERSIONS]:
            old.unlink(missing_ok=True)
        return target

    def load(self, before_round: int | None = None, after_round: int | None = None) -> PrivateState | None:
        """Newest valid state saved before ``before_round`` (any round when None) and after
        ``after_round`` (files not newer than a copy the caller already has are not even read)."""
        for rnd, path in reversed(self._versions()):
            if before_round is not None and rnd >= before_round:
                continue
            if after_round is not None and rnd <= after_round:
                break
            state = self._read(path)
            if state is not None:
                return state
        return None

    def _read(self, path: Path) -> PrivateState | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["__header__"]).decode())
                arrays = {k: z[k] for k in z.files if k != "__header__"}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as exc:
            logger.warning("private state %s is unreadable (%s): ignoring it, starting fresh", path, exc)
            return None
        if header.get("kind") != self.kind:
            logger.warning(
                "private state %s belongs to %r, not %r (another method/model): ignoring it",
                path, header.get("kind"), self.kind,
            )
            return None
        shapes = {k: [str(a.dtype), list(a.shape)] for k, a in arrays.items()}
        if shapes != header.get("arrays") or _digest(arrays) != header.get("sha256"):
            logger.warning("private state %s fails its checksum/shape check: ignoring it, starting fresh", path)
            return None
        return PrivateState({k: torch.from_numpy(a) for k, a in arrays.items()}, int(header["round"]))


def node_state_root(state_dir: str | os.PathLike, run_key: str, client_id: int) -> Path:
    """``<state-dir>/floral-flwr/<run>/client-<id>``; ``run_key`` must be a plain name (the
    server sends it: a ``..`` or a separator is refused, the node's tree cannot be left)."""
    from floral_flwr.config import is_valid_run_name

    if not run_key or not is_valid_run_name(run_key):
        raise ValueError(f"the server sent run-key {run_key!r}: not a plain directory name; refusing it")
    return Path(state_dir) / APP_NAMESPACE / run_key / f"client-{int(client_id)}"


def accept_suggested_dir(path: str) -> Path | None:
    """The server's suggested ``client-state-dir`` when it is ``<run dir>/client-state`` of a run
    directory on this machine (it carries the server's marker naming it), else None.

    In simulation the server and the clients share the machine, and the run directory exists
    before the first message. A node elsewhere has no such directory, so a server cannot make it
    write anywhere else."""
    p = Path(path)
    if not p.is_absolute() or ".." in p.parts or p.name != "client-state":
        return None
    run_dir = p.parent
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("run") != run_dir.name:
        return None
    return p


def check_writable(root: str | os.PathLike) -> None:
    """Raise a clear error if a state directory cannot be created or written."""
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PermissionError(f"state-dir '{path}' is not writable: {exc}") from exc
