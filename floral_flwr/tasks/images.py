# size: the image-task family (presets, data variants, partitions, model choice) in one module, as digits and synthetic.
"""MNIST / Fashion-MNIST / CIFAR-10 / CIFAR-100 tasks of the paper (floral-method.md §2, §3.2,
§3.3).

=========================  ====================  ===========================================
task                       model                 clusters (client k -> cluster k mod C)
=========================  ====================  ===========================================
mnist-rotate               MLP 784-200-10        C=4, images rotated by (360 // C) * c degrees
mnist-label-shift          MLP 784-200-10        C=4, y -> (y + c) mod 10
fmnist-rotate              MLP 784-200-10        as mnist-rotate, on Fashion-MNIST
fmnist-label-shift         MLP 784-200-10        as mnist-label-shift, on Fashion-MNIST
cifar10-rotate             Cifar10CNN            as mnist-rotate
cifar10-label-shift        Cifar10CNN            as mnist-label-shift
cifar100                   VGG-8 (no norm)       C=10, cluster c holds the fine labels l with
cifar100-bn / cifar100-gn  VGG-8 + BN / GN       l mod 10 == c (the official code's partition:
                                                 *fine* label mod C, coarse labels unused)
``<task>-reduced``         same                  5 % of each client's training rows (seeded,
                                                 at least ``min_reduced_size`` = 10)
=========================  ====================  ===========================================

Partitions (simulation): the train and the test split are partitioned separately (as the
official code does with ``FederatedDataset``), using the :mod:`.partitioners` classes:
rotate/label-shift use IID shards (seeded shuffle, sizes differ by at most one, every row used
once); ``cifar100`` uses :class:`~.partitioners.LabelModClusterPartitioner` on ``fine_label``.
Per client: MNIST 60000/300 = 200 train and ~33 test rows; CIFAR-10 2500/500; CIFAR-100 500/100.

Fashion-MNIST (``fmnist-*``, dataset ``fashion-mnist``, written offline by ``python -m
floral_flwr.data prepare fashion-mnist <dir>``) runs under the paper's *MNIST* protocol: 300
clients (200 train / ~33 test rows each), 10 % sampled and evaluated per round, 500 rounds,
batch 32, lr 0.1, MLP 784-200-10, C=4. Its results are Fashion-MNIST results, never MNIST ones.

MNIST-5k (``python -m floral_flwr.data prepare mnist-5k <dir>``: 5,000 real digits, 4,000 /
1,000) is read by the ``mnist-*`` tasks; when the data directory's manifest says ``mnist-5k``
the preset has **20 clients** (:data:`VARIANT_CLIENTS`): 4000/20 = 200 train and 1000/20 = 50
test rows per client, i.e. the paper's 200 training rows per client, and at 10 % sampling over
500 rounds each client still trains in ~50 rounds as in the paper; only the clients per round
drop from 30 to 2. Every other preset value is the MNIST one. (``-reduced``: 10 train rows.)

Tensors: ``x`` float32 (N, C, H, W) in [0, 1]; CIFAR normalized with the usual per-channel
mean/std (rotation is applied to the raw image first, as the official code rotates before
normalizing); ``y`` int64. MNIST has no augmentation; CIFAR tasks expose
``task.augment(x, generator=None, cluster=None)`` (random horizontal flip + random crop 32 with
4 px zero padding, the official train transform; pass ``cluster=task.cluster_of(cid)`` on rotate
tasks so the flip acts on the upright image) for training loops that want it. CIFAR-100 is
normalized with the CIFAR-10 statistics, as the official code does.

Data sources: see :mod:`.sources` (``data_dir`` with ``train.parquet``/``test.parquet`` in the hub
schema; never downloads unless ``download=True``).

Deployment (``data_path``): a SuperNode that holds its own data points ``data_path`` at a
directory with ``train.parquet`` (and optionally ``test.parquet``; otherwise a seeded 80/20 split
of ``train.parquet``, ``test_fraction``) in the same hub schema. That directory *is* the client's
data: no partitioning, every ``cid`` maps to it, no cluster transform unless the node config sets
``cluster`` (0..C-1), in which case the benchmark's rotation / label shift of that cluster is
applied and ``cluster_of`` reports it (otherwise ``num_clusters`` and ``cluster_of`` are None).
``-reduced`` still keeps 5 % of the training rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .base import (ClientData, Task, fedavg_server_preset, check_fraction, check_int, check_num_clients,
                   check_num_clusters, default_preset, normalize_options, reduce_train_indices,
                   resolve_angles, resolve_shifts, rng_for, rotate_images, split_train_test)
from .manifest import read_manifest, verify_prepared
from .models import MLP, VGG8, Cifar10CNN
from .sources import (DATASETS, DatasetNotFoundError, DatasetSpec, clear_decoded_cache,
                      load_split_arrays, locate_dataset, resolve_local_dir)

__all__ = ["ImageTask", "clear_cache", "PAPER_PRESETS", "VARIANT_CLIENTS", "dataset_of",
           "image_defaults", "image_extra_defaults", "data_variant"]

# dataset: (K, C, rounds, batch, lr, fraction-train/evaluate)
PAPER_PRESETS = {
    "mnist": (300, 4, 500, 32, 0.1, 0.1),
    # the paper has no Fashion-MNIST experiment: its MNIST protocol, on Fashion-MNIST
    "fashion-mnist": (300, 4, 500, 32, 0.1, 0.1),
    "cifar10": (20, 4, 500, 64, 0.03, 1.0),
    "cifar100": (100, 10, 500, 64, 0.001, 0.5),
}

#: prepared subsets too small for the paper's K: their number of clients (module doc)
VARIANT_CLIENTS = {"mnist-5k": 20}

# dataset: mixture lr of the (full, -reduced) tasks. The paper's router lr is 0.1 (0.3 reduced).
# MNIST protocol (300 clients, 10 % sampled, 1 local epoch of ~7 steps): a client's mixture moves
# only in the ~50 rounds it is sampled, and at 0.1 the clusters are found late (round ~275 of
# 500 on fmnist-label-shift, tuning seed 0) or not at all; 1.0 finds them by round 100-150 on
# tuning seeds 0-2 (ARI 1.0), 3.0 commits too early and merges two clusters for ~300 rounds
# (benchmarks/results_fmnist/README.md). The -reduced and CIFAR presets keep the paper's values
# (not re-tuned).
MIXTURE_LR = {
    "mnist": (1.0, 0.3),
    "fashion-mnist": (1.0, 0.3),  # the MNIST protocol, tuned on fmnist-label-shift (seeds 0-2)
    "cifar10": (0.1, 0.3),
    "cifar100": (0.1, 0.3),
}


#: task-name prefix -> dataset (key of ``sources.DATASETS``)
_TASK_PREFIX = {"mnist": "mnist", "fmnist": "fashion-mnist", "cifar10": "cifar10",
                "cifar100": "cifar100"}


def dataset_of(name: str) -> str:
    """The dataset an image task reads: ``fmnist-rotate`` -> ``fashion-mnist``."""
    return _TASK_PREFIX[name.split("-")[0]]


def data_variant(name: str, data_dir: Optional[str] = None) -> Optional[str]:
    """The prepared variant (manifest ``variant``, e.g. ``mnist-5k``) the task ``name`` would
    read from ``data_dir`` (same search as the task; None: not found or not prepared). Reads a
    small JSON file, never the data."""
    root, _ = resolve_local_dir(dataset_of(name), data_dir)
    doc = read_manifest(root) if root is not None else None
    return None if doc is None else doc["variant"]


def image_defaults(name: str, num_clusters: Optional[int] = None,
                   variant: Optional[str] = None) -> dict:
    """The paper preset of an image task (no data needed); ``variant``: the prepared subset
    the data directory holds (:func:`data_variant`), which may change the number of clients."""
    reduced = name.endswith("-reduced")
    dataset = dataset_of(name)
    K, C, rounds, batch, lr, frac = PAPER_PRESETS[dataset]
    K = VARIANT_CLIENTS.get(variant, K)
    out = default_preset(rounds=1500 if reduced else rounds, batch=batch, lr=lr,
                         mixture_lr=MIXTURE_LR[dataset][1 if reduced else 0],
                         adaptors=C if num_clusters is None else int(num_clusters),
                         clients=K, frac_train=frac, frac_eval=frac)
    out["adapt-norm"] = name.startswith(("cifar100-bn", "cifar100-gn"))
    return out


def image_extra_defaults(name: str) -> dict:
    """Paper settings outside the run-config keys of contracts.md (server optimizer)."""
    extra = ({"server-optimizer": "fedadam", "server-lr": 0.001} if name.startswith("cifar100")
             else fedavg_server_preset())
    extra["test-batch-size"] = 512
    return extra


def clear_cache() -> None:
    clear_decoded_cache()


def _labels_dataset(labels: np.ndarray, column: str):
    from datasets import Dataset

    return Dataset.from_dict({column: labels})


def make_augment(spec: DatasetSpec, angles: Optional[tuple] = None):
    """Batch version of RandomHorizontalFlip + RandomCrop(32, padding=4) on normalized tensors
    (the padding value is the normalized black pixel, as padding before normalization gives).

    ``augment(x, generator=None, cluster=None)``. The official code flips/crops the upright image
    and rotates afterwards; our tensors are already rotated, so for a cluster rotated by 90 or
    270 degrees the upright horizontal flip is a vertical flip here (pass ``cluster``; crops
    commute with the rotation up to the random offset)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    fill = (-mean / std)

    def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                cluster: Optional[int] = None) -> torch.Tensor:
        n, c, h, w = x.shape
        flip_dim = -1
        if angles is not None and cluster is not None and float(angles[cluster]) % 180 == 90:
            flip_dim = -2
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(flip_dim), x)
        padded = fill.to(x.dtype).expand(n, c, h + 8, w + 8).clone()
        padded[:, :, 4:4 + h, 4:4 + w] = x
        oy = torch.randint(0, 9, (n,), generator=generator)
        ox = torch.randint(0, 9, (n,), generator=generator)
        rows = (oy.view(n, 1) + torch.arange(h).view(1, h))             # (n, h)
        cols = (ox.view(n, 1) + torch.arange(w).view(1, w))             # (n, w)
        idx_n = torch.arange(n).view(n, 1, 1, 1)
        idx_c = torch.arange(c).view(1, c, 1, 1)
        return padded[idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    return augment


def model_for(name: str) -> nn.Module:
    """The model of image task ``name`` (no data needed)."""
    base = name[: -len("-reduced")] if name.endswith("-reduced") else name
    dataset = dataset_of(base)
    spec = DATASETS[dataset]
    if dataset in ("mnist", "fashion-mnist"):
        return MLP(spec.height * spec.width, 200, spec.num_classes)
    if dataset == "cifar10":
        return Cifar10CNN(spec.num_classes)
    norm = {"cifar100": None, "cifar100-bn": "bn", "cifar100-gn": "gn"}[base]
    return VGG8(spec.num_classes, norm=norm)


class ImageTask(Task):
    metric = "accuracy"

    def __init__(self, name: str, num_clients: Any, seed: int, data_dir: Optional[str] = None,
                 data_path: Optional[str] = None, **options: Any) -> None:
        super().__init__()
        self.name = name
        self.reduced = name.endswith("-reduced")
        base = name[: -len("-reduced")] if self.reduced else name
        self.dataset = dataset_of(base)
        self.spec: DatasetSpec = DATASETS[self.dataset]
        if self.dataset == "cifar100":
            self.shift = "label-mod"
            self.norm = {"cifar100": None, "cifar100-bn": "bn", "cifar100-gn": "gn"}[base]
        else:
            self.shift = "rotate" if base.endswith("rotate") else "label-shift"
            self.norm = None
        K_paper, C_paper = PAPER_PRESETS[self.dataset][:2]
        allowed: dict = {"num_clusters": C_paper, "reduced_fraction": 0.05 if self.reduced else None,
                         "min_reduced_size": 10, "download": False, "cluster": None,
                         "test_fraction": 0.2}
        if self.shift == "rotate":
            allowed["angles"] = None
        elif self.shift == "label-shift":
            allowed["shifts"] = None
        opts = normalize_options(options, allowed, name)
        self.options = opts
        self.seed = check_int("seed", seed)
        if num_clients is None:  # the preset's K, which a prepared subset may lower
            variant = data_variant(name, data_dir) if data_path is None else None
            num_clients = VARIANT_CLIENTS.get(variant, K_paper)
        self.num_clients = check_int("num_clients", num_clients, 1)
        self.data_path = data_path
        C = check_int("num_clusters", opts["num_clusters"], 1)
        if data_path is None:
            C = check_num_clusters(C, self.num_clients)
        self.angles = resolve_angles(opts.get("angles"), C) if self.shift == "rotate" else None
        self.shifts = (resolve_shifts(opts.get("shifts"), C, self.spec.num_classes)
                       if self.shift == "label-shift" else None)
        if self.shift == "label-mod" and C > self.spec.num_classes:
            raise ValueError(f"num_clusters: C={C} exceeds the {self.spec.num_classes} classes of "
                             f"{self.dataset}; every cluster needs at least one label")
        self.reduced_fraction = (None if opts["reduced_fraction"] is None
                                 else check_fraction("reduced_fraction", opts["reduced_fraction"]))
        self.min_reduced_size = check_int("min_reduced_size", opts["min_reduced_size"], 1)
        self.loss_fn = nn.CrossEntropyLoss()
        self._num_clusters_option = C
        self.data_variant: Optional[str] = None  # set from the manifest once the data is found
        self.defaults = image_defaults(name, C)
        self.extra_defaults = image_extra_defaults(name)
        self.augment = (make_augment(self.spec, self.angles) if self.spec.mean is not None
                        else None)
        if self.spec.mean is not None:
            self._mean_np = np.asarray(self.spec.mean, np.float32).reshape(1, -1, 1, 1)
            self._std_np = np.asarray(self.spec.std, np.float32).reshape(1, -1, 1, 1)

        if data_path is not None:
            self._init_local(data_path, C, opts)
        else:
            self._init_federated(data_dir, C, opts)

    # ------------------------------------------------------------------ set-up
    def _init_federated(self, data_dir: Optional[str], C: int, opts: dict) -> None:
        from .partitioners import (LabelModClusterPartitioner, LabelShiftPartitioner,
                                   RotationPartitioner)

        self.num_clusters = C
        self._local_cluster = None
        root = locate_dataset(self.dataset, data_dir, opts["download"])
        self.source_dir = root
        self._files = {s: root / f"{s}.parquet" for s in ("train", "test")}
        arrays = {s: load_split_arrays(p, self.spec) for s, p in self._files.items()}
        self._use_manifest(verify_prepared(root, self.spec.name, self._files, arrays))
        self.partitioners = {}
        self._idx: dict[str, list[np.ndarray]] = {}
        for j, split in enumerate(("train", "test")):
            _, y = arrays[split]
            check_num_clients(self.num_clients, len(y), f"rows in {self._files[split]}")
            s = self.seed + j * 1_000_003
            if self.shift == "rotate":
                p = RotationPartitioner(self.num_clients, C, self.angles, self.spec.image_column, seed=s)
            elif self.shift == "label-shift":
                p = LabelShiftPartitioner(self.num_clients, C, self.spec.num_classes, self.shifts,
                                          self.spec.label_column, seed=s)
            else:
                p = LabelModClusterPartitioner(self.num_clients, C, self.spec.label_column, seed=s)
            p.dataset = _labels_dataset(y, self.spec.label_column)
            self.partitioners[split] = p
            self._idx[split] = list(p.all_indices())
        if self.reduced_fraction is not None:
            self._idx["train"] = reduce_train_indices(self._idx["train"], self.reduced_fraction,
                                                      self.min_reduced_size, self.seed)

    def _init_local(self, data_path: str, C: int, opts: dict) -> None:
        root = Path(data_path).expanduser()
        train = root / "train.parquet"
        if not train.is_file():
            raise DatasetNotFoundError(
                f"data_path: no {train} for dataset {self.dataset!r}; a SuperNode's data_path "
                f"must be a directory with train.parquet (and optionally test.parquet) in the "
                f"hub schema of {self.spec.hub_id} (columns {self.spec.image_column!r}, "
                f"{self.spec.label_column!r}); `python -m floral_flwr.data download "
                f"{self.dataset} <dir>` writes that layout")
        self.source_dir = root
        cluster = opts["cluster"]
        if cluster is not None:
            cluster = check_int("cluster", cluster, 0)
            if cluster >= C:
                raise ValueError(f"cluster: {cluster} out of range (allowed: 0..{C - 1})")
            self.num_clusters = C
        else:
            self.num_clusters = None
        self._local_cluster = cluster
        test = root / "test.parquet"
        self._files = {"train": train}
        xtr, ytr = load_split_arrays(train, self.spec)
        arrays = {"train": (xtr, ytr)}
        if test.is_file():
            self._files["test"] = test
            arrays["test"] = load_split_arrays(test, self.spec)
            tr_idx, te_idx = np.arange(len(ytr)), None
        else:
            tf = check_fraction("test_fraction", opts["test_fraction"])
            tr_idx, te_idx = split_train_test(np.arange(len(ytr)), tf, rng_for(self.seed, 9))
        if self.reduced_fraction is not None:
            tr_idx = reduce_train_indices([tr_idx], self.reduced_fraction, self.min_reduced_size,
                                          self.seed)[0]
        self._local_idx = (tr_idx, te_idx)
        self._use_manifest(verify_prepared(root, self.spec.name, self._files, arrays))

    def _use_manifest(self, manifest: Optional[dict]) -> None:
        """Checked manifest of the data (None: unprepared): its variant sets the preset."""
        if manifest is not None:
            self.data_variant = manifest["variant"]
            self.defaults = image_defaults(self.name, self._num_clusters_option, self.data_variant)

    # ------------------------------------------------------------------ API
    def check_cid(self, cid: Any) -> int:
        if self.data_path is None:
            return super().check_cid(cid)
        # deployment: the node's own data; any non-negative id maps to it
        c = check_int("cid", cid, 0)
        return c

    def cluster_of(self, cid: Any) -> Optional[int]:
        cid = self.check_cid(cid)
        if self.data_path is not None:
            return self._local_cluster
        return cid % self.num_clusters

    def build_model(self) -> nn.Module:
        return model_for(self.name)

    def client_data(self, cid: Any) -> ClientData:
        if self.data_path is not None:
            self.check_cid(cid)
            cid = 0
        return super().client_data(cid)

    def _to_tensors(self, x: np.ndarray, y: np.ndarray, c: Optional[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if c is not None and self.angles is not None:
            x = rotate_images(x, self.angles[c], hw_axes=(1, 2))
        if c is not None and self.shifts is not None:
            y = (y + self.shifts[c]) % self.spec.num_classes
        # numpy, not torch: small tensor ops with torch's intra-op threads are slow (10-100x)
        # on a loaded 2-core machine; this path is single-threaded and copies exactly once
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        xf = x.astype(np.float32, order="C")  # (N, C, H, W), C-contiguous, writable
        xf *= np.float32(1.0 / 255.0)
        if self.spec.mean is not None:
            xf -= self._mean_np
            xf /= self._std_np
        return torch.from_numpy(xf), torch.from_numpy(np.asarray(y, dtype=np.int64).copy())

    def _make_client_data(self, cid: int) -> ClientData:
        if self.data_path is not None:
            xtr, ytr = load_split_arrays(self._files["train"], self.spec)
            tr_idx, te_idx = self._local_idx
            if te_idx is None:
                xte, yte = load_split_arrays(self._files["test"], self.spec)
            else:
                xte, yte = xtr[te_idx], ytr[te_idx]
            c = self._local_cluster
            a = self._to_tensors(xtr[tr_idx], ytr[tr_idx], c)
            b = self._to_tensors(xte, yte, c)
            return ClientData(a[0], a[1], b[0], b[1])
        c = self.cluster_of(cid)
        out = []
        for split in ("train", "test"):
            x, y = load_split_arrays(self._files[split], self.spec)
            idx = self._idx[split][cid]
            out.extend(self._to_tensors(x[idx], y[idx], c))
        return ClientData(*out)

    # ------------------------------------------------------------------ extras
    def partition_indices(self, cid: int, split: str = "train") -> np.ndarray:
        """Row indices of client ``cid`` in ``<split>.parquet`` (after reduction for train)."""
        cid = self.check_cid(cid)
        if self.data_path is not None:
            raise ValueError("partition_indices: not available with data_path (no partition)")
        if split not in self._idx:
            raise ValueError(f"split: {split!r} unknown (allowed: train, test)")
        return self._idx[split][cid]
