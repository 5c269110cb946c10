"""Crash-safe file writes shared by checkpoints, private client state and model exports.

A reader never sees a half-written file: data go to a temporary file in the target's
directory, are flushed and fsynced, then ``os.replace``d over the target (atomic on POSIX).
Arrays are stored as ``.npz`` and must be read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (creates the parent directory).

    ``fsync=False`` keeps the atomicity against a crashed process but not against power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` of ``arrays`` in memory."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    atomic_write_bytes(path, npz_bytes(arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` without ever unpickling (object arrays raise)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
