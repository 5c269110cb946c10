"""Flower Datasets partitioners that build the paper's clustered federations on **any** Hugging
Face dataset (image column + label column, names configurable).

Cluster assignment (all classes): partition (client) ``k`` belongs to cluster ``k mod C``, as in
the official code (its optimal router uses ``client_id % C``); ``cluster_of(k)`` /
``clusters`` record it. Row assignment is deterministic given ``seed`` (numpy PCG64 seeded by
``SeedSequence([seed, tag])``), so every process computes the same partitions.

* :class:`ClusterIidPartitioner`: shuffle rows with ``seed``, cut them into ``num_partitions``
  contiguous shards whose sizes differ by at most one (every row used exactly once); partition k
  is in cluster k mod C. ``load_partition`` optionally adds a constant ``cluster_column``.
* :class:`RotationPartitioner`: the above, and ``load_partition`` rotates every image of a
  cluster-c partition counter-clockwise by ``angles[c]`` degrees (default ``(360 // C) * c``).
* :class:`LabelShiftPartitioner`: the above, and labels map ``y -> (y + shifts[c]) mod
  num_classes`` (default ``shifts[c] = c``).
* :class:`LabelModClusterPartitioner`: cluster c holds the rows whose ``partition_by`` label
  satisfies ``label mod C == c`` (the official CIFAR-100 partition, on the *fine* label); the
  cluster's rows, shuffled with ``seed``, are cut into contiguous shards, one per client of the
  cluster (clients c, c + C, c + 2C, ...).

The transforms are also available as plain batch functions (:class:`RotateTransform`,
:class:`LabelShiftTransform`) for ``Dataset.map(batched=True)`` / ``with_transform``. The task
suite uses :meth:`ClusteredPartitioner.partition_indices` on decoded arrays (O(client size)); the
``load_partition`` path returns ``datasets.Dataset`` objects in the source schema.

Example with a local parquet copy (offline)::

    from flwr_datasets import FederatedDataset
    fds = FederatedDataset(dataset="parquet",
                           data_files={"train": "mnist/train.parquet", "test": "mnist/test.parquet"},
                           partitioners={"train": RotationPartitioner(300, 4, seed=0)})
    part = fds.load_partition(5, "train")   # cluster 1: every image rotated by 90 degrees
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

try:  # keep this module importable for the numpy-only path if flwr_datasets is missing
    from flwr_datasets.partitioner import Partitioner
except ImportError:  # pragma: no cover
    class Partitioner:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._dataset = None

        @property
        def dataset(self):
            if self._dataset is None:
                raise AttributeError("The dataset field should be set before using it")
            return self._dataset

        @dataset.setter
        def dataset(self, value) -> None:
            self._dataset = value

        def is_dataset_assigned(self) -> bool:
            return self._dataset is not None

from .base import (check_int, check_num_clusters, even_split, resolve_angles, resolve_shifts,
                   rng_for, rotate_images)

__all__ = [
    "ClusteredPartitioner",
    "ClusterIidPartitioner",
    "RotationPartitioner",
    "LabelShiftPartitioner",
    "LabelModClusterPartitioner",
    "RotateTransform",
    "LabelShiftTransform",
]


# ----------------------------------------------------------------------------- transforms


def _rotate_one(img: Any, angle: float) -> Any:
    a = float(angle) % 360.0
    if a == 0.0:
        return img
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(img, Image.Image):
        if a % 90.0 == 0.0:  # exact, counter-clockwise like np.rot90
            op = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                  270: Image.Transpose.ROTATE_270}[int(a)]
            return img.transpose(op)
        return img.rotate(a, resample=Image.Resampling.NEAREST)
    arr = np.asarray(img)
    axes = (0, 1)  # HW or HWC
    return rotate_images(arr, a, hw_axes=axes)


class RotateTransform:
    """Batch transform: rotate ``image_column`` by ``angle`` degrees counter-clockwise (PIL images
    or HW/HWC arrays). Use with ``Dataset.map(RotateTransform(90), batched=True)``."""

    def __init__(self, angle: float, image_column: str = "image") -> None:
        self.angle = float(angle)
        self.image_column = image_column

    def __call__(self, batch: dict) -> dict:
        batch[self.image_column] = [_rotate_one(im, self.angle) for im in batch[self.image_column]]
        return batch


class LabelShiftTransform:
    """Batch transform: ``label -> (label + shift) mod num_classes``."""

    def __init__(self, shift: int, num_classes: int, label_column: str = "label") -> None:
        self.shift = int(shift)
        self.num_classes = int(num_classes)
        self.label_column = label_column

    def __call__(self, batch: dict) -> dict:
        y = np.asarray(batch[self.label_column], dtype=np.int64)
        batch[self.label_column] = ((y + self.shift) % self.num_classes).tolist()
        return batch


# ----------------------------------------------------------------------------- partitioners


class ClusteredPartitioner(Partitioner):
    """Base class: ``num_partitions`` clients, client k in cluster ``k mod num_clusters``."""

    _tag = 0

    def __init__(self, num_partitions: int, num_clusters: int, seed: int = 42,
                 cluster_column: Optional[str] = None) -> None:
        super().__init__()
        self._num_partitions = check_int("num_partitions", num_partitions, 1)
        self.num_clusters = check_num_clusters(num_clusters, self._num_partitions)
        self.seed = check_int("seed", seed)
        self.cluster_column = cluster_column
        self._indices: Optional[list[np.ndarray]] = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def cluster_of(self, partition_id: int) -> int:
        self._check_pid(partition_id)
        return int(partition_id) % self.num_clusters

    @property
    def clusters(self) -> list[int]:
        return [k % self.num_clusters for k in range(self._num_partitions)]

    def _check_pid(self, partition_id: Any) -> int:
        pid = check_int("partition_id", partition_id)
        if not 0 <= pid < self._num_partitions:
            raise ValueError(f"partition_id: {pid} out of range (allowed: 0.."
                             f"{self._num_partitions - 1})")
        return pid

    # -- index computation (subclasses)
    def _compute(self) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Row indices (into ``self.dataset``) of partition ``partition_id``, sorted."""
        pid = self._check_pid(partition_id)
        if self._indices is None:
            self._indices = self._compute()
        return self._indices[pid]

    def all_indices(self) -> list[np.ndarray]:
        if self._indices is None:
            self._indices = self._compute()
        return self._indices

    # -- flwr_datasets API
    def _transform(self, part: Any, cluster: int) -> Any:
        return part

    def load_partition(self, partition_id: int):
        idx = self.partition_indices(partition_id)
        c = self.cluster_of(partition_id)
        part = self.dataset.select(idx)
        part = self._transform(part, c)
        if self.cluster_column is not None:
            part = part.add_column(self.cluster_column, [c] * len(part))
        return part


class ClusterIidPartitioner(ClusteredPartitioner):
    """IID shards (seeded shuffle, sizes differ by <= 1) with clusters k mod C."""

    _tag = 101

    def _compute(self) -> list[np.ndarray]:
        n = len(self.dataset)
        if n < self._num_partitions:
            raise ValueError(f"num_partitions: {self._num_partitions} partitions but the dataset "
                             f"has only {n} rows; every partition needs at least one row")
        return [np.sort(p) for p in even_split(n, self._num_partitions, rng_for(self.seed, self._tag))]


class RotationPartitioner(ClusterIidPartitioner):
    """IID shards; partitions of cluster c have ``image_column`` rotated by ``angles[c]``."""

    def __init__(self, num_partitions: int, num_clusters: int, angles: Optional[Sequence[float]] = None,
                 image_column: str = "image", seed: int = 42,
                 cluster_column: Optional[str] = None) -> None:
        super().__init__(num_partitions, num_clusters, seed, cluster_column)
        self.angles = resolve_angles(angles, self.num_clusters)
        self.image_column = image_column

    def _transform(self, part: Any, cluster: int) -> Any:
        if self.angles[cluster] % 360 == 0:
            return part
        return part.map(RotateTransform(self.angles[cluster], self.image_column), batched=True,
                        keep_in_memory=True)


class LabelShiftPartitioner(ClusterIidPartitioner):
    """IID shards; partitions of cluster c have ``label -> (label + shifts[c]) mod num_classes``."""

    def __init__(self, num_partitions: int, num_clusters: int, num_classes: int = 10,
                 shifts: Optional[Sequence[int]] = None, label_column: str = "label",
                 seed: int = 42, cluster_column: Optional[str] = None) -> None:
        super().__init__(num_partitions, num_clusters, seed, cluster_column)
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.shifts = resolve_shifts(shifts, self.num_clusters, self.num_classes)
        self.label_column = label_column

    def _transform(self, part: Any, cluster: int) -> Any:
        if self.shifts[cluster] % self.num_classes == 0:
            return part
        # shifted labels stay in [0, num_classes): a ClassLabel feature remains valid
        return part.map(LabelShiftTransform(self.shifts[cluster], self.num_classes,
                                            self.label_column), batched=True, keep_in_memory=True)


class LabelModClusterPartitioner(ClusteredPartitioner):
    """Cluster c = rows with ``partition_by`` label mod C == c; each cluster's rows (shuffled
    with ``seed``) are cut into contiguous shards for its clients c, c + C, ..."""

    _tag = 103

    def __init__(self, num_partitions: int, num_clusters: int, partition_by: str = "fine_label",
                 seed: int = 42, cluster_column: Optional[str] = None) -> None:
        super().__init__(num_partitions, num_clusters, seed, cluster_column)
        self.partition_by = partition_by

    def _labels(self) -> np.ndarray:
        ds = self.dataset
        if self.partition_by not in ds.column_names:
            raise ValueError(f"partition_by: column {self.partition_by!r} not in the dataset "
                             f"(columns: {ds.column_names})")
        return np.asarray(ds.with_format("numpy")[self.partition_by], dtype=np.int64)

    def _compute(self) -> list[np.ndarray]:
        labels = self._labels()
        C, K = self.num_clusters, self._num_partitions
        rng = rng_for(self.seed, self._tag)
        out: list[np.ndarray] = [np.empty(0, np.int64)] * K
        for c in range(C):
            rows = np.flatnonzero(labels % C == c)
            clients = list(range(c, K, C))
            if len(rows) < len(clients):
                raise ValueError(
                    f"num_partitions: cluster {c} ({self.partition_by} mod {C} == {c}) has "
                    f"{len(rows)} rows for {len(clients)} clients; use fewer clients")
            rows = rows[rng.permutation(len(rows))]
            for k, shard in zip(clients, np.array_split(rows, len(clients))):
                out[k] = np.sort(shard)
        return out
