"""Run directories whose results cannot be lost or mixed: claim, lock, stored config, checkpoints.

``claim_run_dir`` is called once before round 1 (``floral_flwr.server.prepare_run``):

- a ``run-name`` whose directory already holds a run is refused unless ``resume`` is set (an
  automatic name that collides gets a ``-2``, ``-3``, ... suffix, and the new name is printed);
- the directory is locked (``flock`` on ``.lock``, released when the process ends, also on
  ``kill -9``): a second concurrent run on it stops with the first one's pid;
- the resolved run config is stored (``resolved-config.json``); ``resume`` refuses any change to
  a key that alters the computation, naming each key with its old and new value (the keys that
  may change are :data:`RESUMABLE_KEYS`: where things go, how long to wait, how many rounds);
- a marker ``.floral-run`` names the run: a simulated client accepts the server's suggested
  ``client-state-dir`` only inside a directory carrying it (see ``floral_flwr.client``).

:class:`Checkpoints` keeps the last two rounds (``state-R.npz``, ``optimizer-R.npz``,
``meta-R.json``; ``meta.json`` names the newest) and falls back to the older one, with a warning,
when the newest is unreadable; a state with NaN/Inf is never written (:class:`NonFiniteState`),
and a failed write (disk full) raises :class:`CheckpointWriteError` naming the file while the
previous checkpoint stays intact.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from floral_flwr.config import ConfigError
from floral_flwr.fileio import atomic_write_bytes, load_npz, save_npz

logger = logging.getLogger("floral_flwr")

RESOLVED_CONFIG = "resolved-config.json"
MARKER = ".floral-run"
LOCK = ".lock"
KEEP_CHECKPOINTS = 2
# run-config keys a resume may change: where results and data are, how long to wait, how many
# rounds to run, how often/whom to evaluate, how fast to compute. Every other key alters what
# is computed and must equal the stored value.
RESUMABLE_KEYS = frozenset({
    "num-server-rounds", "eval-every", "fraction-evaluate", "min-available-nodes",
    "node-wait-timeout", "reply-timeout", "device", "num-threads", "compile", "data-dir",
    "output-dir", "run-name", "resume", "export-models",
})
# files that say a directory holds a run
_RUN_FILES = ("config.json", RESOLVED_CONFIG, "rounds.csv", "summary.json", "checkpoint")


class RunDirError(ConfigError):
    """The run directory cannot be used as asked (exists, locked, resumed with other keys)."""


class RunFailed(RuntimeError):
    """The run cannot go on: a round accepted no reply (every client failed or was rejected),
    or the aggregate is not finite. The message names the round and the cause."""


class NonFiniteState(RunFailed):
    """A global state with NaN/Inf: it is never adopted or checkpointed."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in _RUN_FILES)


class RunDirectory:
    """A claimed (locked) run directory. Use :func:`claim_run_dir`; :meth:`release` at the end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise RunDirError(
            f"run directory '{path}' is in use by another run ({holder or 'unknown process'}): wait "
            f"for it to finish, or set another 'run-name'"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode(), 0)
    return fd


def _free_name(path: Path) -> Path:
    for i in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists():
            return candidate
    raise RunDirError(f"no free run directory name next to '{path}'")  # pragma: no cover


def claim_run_dir(path: Path, config: dict[str, Any], resume: bool, auto_named: bool,
                  label: str = "floral") -> RunDirectory:
    """Create (or reopen, with ``resume``) and lock the run directory; store or check the config.

    Returns the claimed directory (its ``path`` differs from ``path`` when an automatic name
    collided; ``label`` prefixes the line that says so). Raises :class:`RunDirError` with a
    message naming the key to change."""
    path = Path(path)
    if not resume and auto_named and holds_run(path):
        new = _free_name(path)
        print(f"[{label}] '{path.name}' exists: this run writes to '{new.name}'", flush=True)
        path = new
    path.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)  # first: a run in progress is reported as such
    try:
        if not resume and holds_run(path):
            raise RunDirError(
                f"run config 'run-name' = {path.name!r}: '{path}' already holds a run; set "
                f"resume=true to continue it, or choose another 'run-name' (nothing was changed)"
            )
        if resume:
            check_resume_config(path, config)
        else:
            atomic_write_bytes(path / RESOLVED_CONFIG, json.dumps(config, indent=2, default=str).encode())
        atomic_write_bytes(path / MARKER, json.dumps({"run": path.name}).encode(), fsync=False)
    except BaseException:
        os.close(fd)
        raise
    return RunDirectory(path, fd)


def stored_config(path: Path) -> dict[str, Any] | None:
    """The resolved config the run started with (``resolved-config.json``; older runs: the
    ``config`` entry of ``config.json``), or None."""
    for name, pick in ((RESOLVED_CONFIG, lambda d: d), ("config.json", lambda d: d.get("config"))):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        cfg = pick(data) if isinstance(data, dict) else None
        if isinstance(cfg, dict):
            return cfg
    return None


def check_resume_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse a resume that changes a computation key (every key but :data:`RESUMABLE_KEYS`)."""
    old = stored_config(path)
    if old is None:
        logger.warning("run directory %s has no stored config: cannot check that resume keeps the "
                       "computation keys", path)
        return
    changed = [
        k for k in sorted(set(old) | set(config))
        if k not in RESUMABLE_KEYS and k in old and k in config and not _same(old[k], config[k])
    ]
    if changed:
        diffs = ", ".join(f"'{k}' = {config[k]!r} (the run has {old[k]!r})" for k in changed)
        raise RunDirError(
            f"run config 'resume' = true cannot change what the run computes: {diffs}; resume "
            f"with the run's values, or start a new run under another 'run-name'"
        )


def _same(a: Any, b: Any) -> bool:
    return a == b  # JSON keeps the scalars run configs hold (1 == 1.0, as in Python)


def finished_summary(path: Path, num_rounds: int) -> dict[str, Any] | None:
    """The summary of a run that completed ``num_rounds`` (resume of it is a no-op), or None."""
    ckpt = Checkpoints(path / "checkpoint")
    done = ckpt.newest_round()
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if done is None or done < num_rounds or not isinstance(summary, dict):
        return None
    return summary


# ---------------------------------------------------------------------------------- checkpoints


def _bad_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items()
            if np.asarray(v).dtype.kind in "fc" and not bool(np.isfinite(v).all())]


class Checkpoints:
    """The checkpoint folder of a run (see the module docstring)."""

    def __init__(self, folder: Path, label: str = "floral") -> None:
        self.folder = Path(folder)
        self.label = label  # prefixes the fallback warning (the method, like every run line)

    def _rounds(self) -> list[int]:
        """Rounds with a state file, newest first (meta files of older layouts included)."""
        if not self.folder.is_dir():
            return []
        found = set()
        for p in self.folder.glob("state-*.npz"):
            stem = p.stem.split("-", 1)[1]
            if stem.isdigit():
                found.add(int(stem))
        return sorted(found, reverse=True)

    def newest_round(self) -> int | None:
        try:
            return int(json.loads((self.folder / "meta.json").read_text())["round"])
        except (OSError, ValueError, KeyError, TypeError):
            rounds = self._rounds()
            return rounds[0] if rounds else None

    def exists(self) -> bool:
        return (self.folder / "meta.json").exists() or bool(self._rounds())

    def save(self, server_round: int, arrays: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
             meta: dict[str, Any]) -> None:
        bad = _bad_keys(arrays) + [f"optimizer {k}" for k in _bad_keys(optimizer)]
        if bad:
            raise NonFiniteState(
                f"round {server_round}: the global state has NaN/Inf in {bad[:5]}; it is not "
                f"checkpointed (the checkpoint of round {self.newest_round()} is kept)")
        tag = f"{server_round:06d}"
        meta = {"round": server_round, **meta}
        # state and optimizer first, meta last: a meta file names a round only once both exist
        try:
            save_npz(self.folder / f"state-{tag}.npz", arrays)
            save_npz(self.folder / f"optimizer-{tag}.npz", optimizer)
            text = json.dumps(meta, indent=2).encode()
            atomic_write_bytes(self.folder / f"meta-{tag}.json", text)
            atomic_write_bytes(self.folder / "meta.json", text)
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not write the checkpoint of round {server_round} to '{self.folder}' "
                f"({exc.strerror or exc}); the checkpoint of round {self.newest_round()} is intact: "
                f"free space and resume with resume=true"
            ) from exc
        keep = {f"{r:06d}" for r in self._rounds()[:KEEP_CHECKPOINTS]} | {tag}
        for p in list(self.folder.glob("state-*.npz")) + list(self.folder.glob("optimizer-*.npz")) \
                + list(self.folder.glob("meta-*.json")):
            if p.stem.split("-", 1)[1] not in keep:
                p.unlink(missing_ok=True)

    def _read(self, rnd: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        tag = f"{rnd:06d}"
        arrays = load_npz(self.folder / f"state-{tag}.npz")
        optimizer = load_npz(self.folder / f"optimizer-{tag}.npz")
        meta_path = self.folder / f"meta-{tag}.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
        else:  # layout before per-round meta files: meta.json describes the newest round only
            meta = json.loads((self.folder / "meta.json").read_text())
            if int(meta.get("round", -1)) != rnd:
                meta = {"round": rnd}
        if int(meta.get("round", -1)) != rnd:
            raise ValueError(f"meta file names round {meta.get('round')}, not {rnd}")
        bad = _bad_keys(arrays)
        if bad:
            raise ValueError(f"NaN/Inf in {bad[:5]}")
        return arrays, optimizer, meta

    def load(self) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        """The newest readable checkpoint: (round, arrays, optimizer state, meta)."""
        newest = self.newest_round()
        rounds = self._rounds()
        if newest is not None:
            # rounds after the one meta.json names are incomplete (killed mid-write): skipped
            rounds = [r for r in rounds if r <= newest]
        problems = []
        for rnd in rounds:
            try:
                arrays, optimizer, meta = self._read(rnd)
            except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
                problems.append(f"round {rnd}: {type(exc).__name__}: {exc}")
                logger.warning("checkpoint of round %d in %s is unreadable (%s: %s)%s", rnd, self.folder,
                               type(exc).__name__, exc, "; trying the older one" if rnd != rounds[-1] else "")
                continue
            if problems:
                print(f"[{self.label}] WARNING: the newest checkpoint is unreadable ({problems[0]}); resuming "
                      f"from the checkpoint of round {rnd}", flush=True)
            return rnd, arrays, optimizer, meta
        raise RunDirError(
            f"run config 'resume' = true but no checkpoint in '{self.folder}' is readable"
            + (f": {'; '.join(problems)}" if problems else "")
            + ": start a new run (another 'run-name')"
        )

    def latest_state(self) -> dict[str, np.ndarray]:
        return self.load()[1]
