"""Shared pieces of the task suite: ``ClientData``, the ``Task`` base class, input validation and
the numpy partition/cluster helpers used by every task (no torch.utils.data, no flwr)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

__all__ = [
    "ClientData",
    "Task",
    "RUN_CONFIG_KEYS",
    "check_int",
    "check_num_clients",
    "check_num_clusters",
    "even_split",
    "split_train_test",
    "reduce_indices",
    "rotate_images",
    "resolve_angles",
    "resolve_shifts",
    "rng_for",
]

#: run-config keys every ``task.defaults`` provides (contracts.md §3).
RUN_CONFIG_KEYS = (
    "num-server-rounds", "batch-size", "lr", "mixture-lr", "num-adaptors", "rank",
    "local-epochs", "fraction-train", "fraction-evaluate", "num-clients",
)


@dataclass(frozen=True)
class ClientData:
    """One client's local data, as tensors ready for ``task.build_model()``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement()
                   for t in (self.train_x, self.train_y, self.test_x, self.test_y))


# ----------------------------------------------------------------------------- validation


def check_int(key: str, value: Any, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}, got {value}")
    return value


def check_num_clients(num_clients: Any, num_samples: int, what: str = "samples") -> int:
    k = check_int("num_clients", num_clients, 1)
    if k > num_samples:
        raise ValueError(
            f"num_clients: {k} clients but only {num_samples} {what}; every client needs at "
            f"least one sample (allowed: 1..{num_samples})")
    return k


def check_num_clusters(num_clusters: Any, num_clients: int) -> int:
    c = check_int("num_clusters", num_clusters, 1)
    if c > num_clients:
        raise ValueError(
            f"num_clusters: C={c} clusters is larger than num_clients={num_clients}; every "
            f"cluster needs at least one client (allowed: 1..{num_clients})")
    return c


def check_fraction(key: str, value: Any, low_open: bool = True) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number in (0, 1), got {value!r}") from None
    if not (0.0 < f < 1.0):
        raise ValueError(f"{key}: expected a number in (0, 1), got {value!r}")
    return f


def resolve_angles(angles: Any, num_clusters: int) -> tuple[float, ...]:
    """Rotation angle (degrees, counter-clockwise) of each cluster; default ``(360 // C) * c``."""
    if angles is None:
        return tuple(float((360 // num_clusters) * c) for c in range(num_clusters))
    if isinstance(angles, str):
        angles = [a for a in angles.replace(",", " ").split() if a]
    try:
        out = tuple(float(a) for a in angles)
    except (TypeError, ValueError):
        raise ValueError(f"angles: expected a list of {num_clusters} numbers (degrees), "
                         f"got {angles!r}") from None
    if len(out) != num_clusters:
        raise ValueError(
            f"angles: the rotation list has {len(out)} entries but num_clusters is {num_clusters}; "
            f"give exactly one angle per cluster (e.g. {list(resolve_angles(None, num_clusters))})")
    return out


def resolve_shifts(shifts: Any, num_clusters: int, num_classes: int) -> tuple[int, ...]:
    """Label shift of each cluster: y -> (y + shift[c]) mod num_classes; default shift[c] = c."""
    if shifts is None:
        if num_clusters > num_classes:
            raise ValueError(
                f"num_clusters: label shift with C={num_clusters} clusters needs C <= "
                f"num_classes={num_classes} (otherwise clusters share a shift)")
        return tuple(range(num_clusters))
    if isinstance(shifts, str):
        shifts = [a for a in shifts.replace(",", " ").split() if a]
    try:
        out = tuple(int(s) for s in shifts)
    except (TypeError, ValueError):
        raise ValueError(f"shifts: expected a list of {num_clusters} integers, got {shifts!r}") from None
    if len(out) != num_clusters:
        raise ValueError(f"shifts: the label-shift list has {len(out)} entries but num_clusters "
                         f"is {num_clusters}; give exactly one shift per cluster")
    return out


def normalize_options(options: Mapping[str, Any], allowed: Mapping[str, Any], task: str) -> dict:
    """Map run-config style keys (``num-clusters``) to python names and reject unknown keys."""
    out = dict(allowed)
    for key, value in options.items():
        k = key.replace("-", "_")
        if k not in allowed:
            names = ", ".join(sorted(allowed)) or "(none)"
            raise ValueError(f"{key}: unknown option for task {task!r}; allowed options: {names}")
        out[k] = value
    return out


# ----------------------------------------------------------------------------- partitions


def rng_for(seed: int, *tags: int) -> np.random.Generator:
    """Independent numpy stream per (seed, purpose tags)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *tags]))


def even_split(num_items: int, num_parts: int, rng: Optional[np.random.Generator]) -> list[np.ndarray]:
    """Shuffle ``range(num_items)`` (if ``rng``) and cut it into ``num_parts`` contiguous pieces
    whose sizes differ by at most one; every index is used exactly once."""
    order = rng.permutation(num_items) if rng is not None else np.arange(num_items)
    return [np.asarray(p, dtype=np.int64) for p in np.array_split(order, num_parts)]


def split_train_test(idx: np.ndarray, test_fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-client split: ``n_test = round(f * n)`` clipped to ``[min(1, n-1), n-1]``."""
    n = len(idx)
    n_test = int(round(test_fraction * n))
    n_test = max(min(1, n - 1), min(n_test, n - 1)) if n > 0 else 0
    perm = rng.permutation(n)
    return np.sort(idx[perm[n_test:]]), np.sort(idx[perm[:n_test]])


def reduce_indices(idx: np.ndarray, fraction: float, min_size: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """Keep ``max(min_size, round(fraction * n))`` (at most n) of ``idx`` (seeded)."""
    n = len(idx)
    keep = min(n, max(int(min_size), int(round(fraction * n))))
    return np.sort(rng.choice(idx, size=keep, replace=False)) if keep < n else idx


def reduce_train_indices(train_idx: list[np.ndarray], fraction: float, min_size: int, seed: int
                         ) -> list[np.ndarray]:
    """The ``-reduced`` rule for every client's training rows (:func:`reduce_indices`), on a
    random stream of its own (7) so the full task's partition and splits are untouched."""
    rng = rng_for(seed, 7)
    return [reduce_indices(i, fraction, min_size, rng) for i in train_idx]


def rotate_images(x: np.ndarray, angle: float, hw_axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    """Rotate a batch of images counter-clockwise by ``angle`` degrees around the centre.

    Multiples of 90 use ``np.rot90`` (exact, what the tests compare against); other angles use
    ``torchvision.transforms.functional.rotate`` with its default nearest interpolation and zero
    fill, as the official code calls it. ``x`` is (..., H, W) for ``hw_axes=(-2, -1)`` or (N, H, W, C) with
    ``hw_axes=(1, 2)``."""
    a = float(angle) % 360.0
    if a == 0.0:
        return x
    if a % 90.0 == 0.0:
        return np.ascontiguousarray(np.rot90(x, k=int(a // 90), axes=hw_axes))
    import torchvision.transforms.functional as TF  # lazy: only for non-right angles

    ax = tuple(a_ % x.ndim for a_ in hw_axes)
    moved = np.moveaxis(x, ax, (-2, -1))
    t = torch.from_numpy(np.ascontiguousarray(moved))
    flat = t.reshape(-1, 1, *t.shape[-2:])
    dtype = flat.dtype
    out = TF.rotate(flat, a, interpolation=TF.InterpolationMode.NEAREST, fill=0.0)
    out = out.to(dtype).reshape(t.shape).numpy()
    return np.ascontiguousarray(np.moveaxis(out, (-2, -1), ax))


# ----------------------------------------------------------------------------- task base


class Task:
    """Base class; see contracts.md §3. Subclasses set the attributes and implement
    ``_make_client_data(cid)`` and ``build_model()``."""

    name: str
    num_clients: int
    num_clusters: Optional[int]
    seed: int
    loss_fn: nn.Module
    metric: str
    defaults: dict
    #: paper settings that are not run-config keys of contracts.md (e.g. the server optimizer)
    extra_defaults: dict
    #: optional batch augmentation ``f(x_batch, generator) -> x_batch`` for training (CIFAR)
    augment: Optional[Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = None

    #: bound on cached ClientData bytes per task (LRU)
    cache_bytes: int = 1 << 30

    def __init__(self) -> None:
        self._client_cache: "OrderedDict[int, ClientData]" = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.RLock()
        self.extra_defaults = {}
        self.options: dict = {}

    # -- public API
    def check_cid(self, cid: Any) -> int:
        if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
            if isinstance(cid, str) and cid.strip().lstrip("-").isdigit():
                cid = int(cid)
            else:
                raise ValueError(f"cid: expected an integer client id in 0..{self.num_clients - 1}, "
                                 f"got {cid!r}")
        cid = int(cid)
        if not 0 <= cid < self.num_clients:
            raise ValueError(f"cid: client id {cid} out of range; task {self.name!r} has "
                             f"num_clients={self.num_clients} (allowed: 0..{self.num_clients - 1})")
        return cid

    def cluster_of(self, cid: Any) -> Optional[int]:
        cid = self.check_cid(cid)
        if self.num_clusters is None:
            return None
        return cid % self.num_clusters

    @property
    def clusters(self) -> list[Optional[int]]:
        """True cluster of every client (index = cid)."""
        return [self.cluster_of(k) for k in range(self.num_clients)]

    def client_data(self, cid: Any) -> ClientData:
        cid = self.check_cid(cid)
        with self._lock:  # simulation may call from several threads of one process
            hit = self._client_cache.get(cid)
            if hit is not None:
                self._client_cache.move_to_end(cid)
                return hit
            data = self._make_client_data(cid)
            self._client_cache[cid] = data
            self._cached_bytes += data.nbytes()
            while self._cached_bytes > self.cache_bytes and len(self._client_cache) > 1:
                _, old = self._client_cache.popitem(last=False)
                self._cached_bytes -= old.nbytes()
            return data

    def build_model(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_client_data(self, cid: int) -> ClientData:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, num_clients={self.num_clients}, "
                f"num_clusters={self.num_clusters}, seed={self.seed}, metric={self.metric!r})")


def fedavg_server_preset() -> dict:
    """The server step of every task but CIFAR-100 (FedAdam 0.001 there): plain FedAvg, the new
    model is the weighted mean (server lr 1). A constant, so the config parser reads it without
    building a task or touching its data."""
    return {"server-optimizer": "fedavg", "server-lr": 1.0}


def default_preset(*, rounds: int, batch: int, lr: float, mixture_lr: float, adaptors: int,
                   clients: int, rank: float = 0.01, epochs: int = 1, frac_train: float = 1.0,
                   frac_eval: float = 1.0) -> dict:
    return {
        "num-server-rounds": rounds,
        "batch-size": batch,
        "lr": lr,
        "mixture-lr": mixture_lr,
        "num-adaptors": adaptors,
        "rank": rank,
        "local-epochs": epochs,
        "fraction-train": frac_train,
        "fraction-evaluate": frac_eval,
        "num-clients": clients,
    }

