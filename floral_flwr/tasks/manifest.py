"""The manifest of a prepared dataset directory, and the checksum check the tasks run on load.

``python -m floral_flwr.data prepare <name> <dir>`` (:mod:`.prepare`) writes ``manifest.json``
next to ``train.parquet`` / ``test.parquet``. It names the dataset whose hub schema the files
have (``dataset``, a key of :data:`.sources.DATASETS`), what was prepared (``variant``, e.g.
``fashion-mnist`` or ``mnist-5k``) and, per split, the row count, the image shape and the
SHA-256 of the *decoded* arrays (the bytes of the C-ordered uint8 images and of the labels as
little-endian int64), so a check is independent of how the parquet/PNG bytes were encoded.
A text dataset (``wordnet``: one ``all`` split, the tasks partition it per seed) records
``texts_sha256`` instead of ``images_sha256``: the SHA-256 of its texts, each UTF-8 encoded and
NUL-terminated, in file order (:func:`text_digests`).

A task that finds a manifest in its data directory verifies both splits once per process and
file version (:func:`verify_split`); a mismatch raises :class:`DatasetChecksumError` naming the
file and how to rebuild it. A directory without a manifest (hub download, ``fake``) is read
as before, unchecked. A directory whose manifest names another dataset is never used for this
one (:func:`manifest_dataset`): Fashion-MNIST is not MNIST.

Only the standard library and numpy: :mod:`.sources` imports this module.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "DatasetChecksumError",
    "array_digests",
    "text_digests",
    "read_manifest",
    "manifest_dataset",
    "verify_split",
    "verify_prepared",
    "verify_text_split",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "floral-flwr-prepared/1"

_VERIFIED: set = set()
_LOCK = threading.Lock()


class DatasetChecksumError(ValueError):
    """A prepared split's decoded arrays do not match the checksums of its manifest."""


def array_digests(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Shape and SHA-256 of the decoded arrays, in the manifest's canonical byte layout."""
    x = np.ascontiguousarray(images, dtype=np.uint8)
    y = np.ascontiguousarray(labels, dtype="<i8")
    return {"rows": int(y.shape[0]), "image_shape": list(x.shape[1:]),
            "images_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
            "labels_sha256": hashlib.sha256(y.tobytes()).hexdigest()}


def text_digests(texts: list[str], labels: np.ndarray) -> dict[str, Any]:
    """Row count and SHA-256 of decoded texts (UTF-8, each NUL-terminated) and their labels."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    y = np.ascontiguousarray(labels, dtype="<i8")
    return {"rows": len(texts), "texts_sha256": h.hexdigest(),
            "labels_sha256": hashlib.sha256(y.tobytes()).hexdigest()}


def read_manifest(directory: Path) -> Optional[dict]:
    """The prepared-data manifest of ``directory``, or None when there is none.

    A ``manifest.json`` that is not ours (no ``format`` key of this project) is ignored; one
    that claims to be ours but is unreadable or incomplete raises ``ValueError``.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); rebuild the "
                         f"directory with `python -m floral_flwr.data prepare <name> "
                         f"{path.parent}`") from e
    if not isinstance(doc, dict) or not str(doc.get("format", "")).startswith("floral-flwr-prepared/"):
        return None
    if doc["format"] != MANIFEST_FORMAT:
        raise ValueError(f"{path}: manifest format {doc['format']!r} is not supported (this "
                         f"version reads {MANIFEST_FORMAT!r}); rebuild it with `python -m "
                         f"floral_flwr.data prepare {doc.get('variant', '<name>')} {path.parent}`")
    splits = doc.get("splits")
    ok = (isinstance(doc.get("dataset"), str) and isinstance(doc.get("variant"), str)
          and isinstance(splits, dict) and splits
          and all(isinstance(s, dict) and {"file", "labels_sha256"} <= set(s)
                  and ("images_sha256" in s or "texts_sha256" in s) for s in splits.values()))
    if not ok:
        raise ValueError(f"{path}: incomplete manifest (needs 'dataset', 'variant' and per split "
                         f"'file', 'images_sha256' or 'texts_sha256', 'labels_sha256'); rebuild it "
                         f"with `python -m "
                         f"floral_flwr.data prepare <name> {path.parent}`")
    return doc


def manifest_dataset(directory: Path) -> Optional[str]:
    """The dataset a prepared directory holds (None: no manifest)."""
    doc = read_manifest(directory)
    return None if doc is None else doc["dataset"]


def verify_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 manifest: dict, file_key: tuple) -> None:
    """Check decoded ``images``/``labels`` of ``split`` against ``manifest`` (once per
    ``file_key``, e.g. (path, size, mtime), per process). Raises :class:`DatasetChecksumError`."""
    with _LOCK:
        if file_key in _VERIFIED:
            return
    _compare(directory, split, manifest, lambda: array_digests(images, labels))
    with _LOCK:
        _VERIFIED.add(file_key)


def verify_text_split(directory: Path, split: str, texts: list[str], labels: np.ndarray,
                      manifest: dict) -> None:
    """Check decoded ``texts``/``labels`` of ``split`` against ``manifest`` (a text dataset is
    read once per process by its task, so there is no per-file memo). Raises
    :class:`DatasetChecksumError`."""
    _compare(directory, split, manifest, lambda: text_digests(texts, labels))


def _compare(directory: Path, split: str, manifest: dict, digests: Any) -> None:
    entry = manifest["splits"].get(split)
    path = Path(directory) / (entry["file"] if entry else f"{split}.parquet")
    rebuild = (f"the file was changed or damaged after `python -m floral_flwr.data prepare "
               f"{manifest['variant']} {Path(directory)}` wrote it; run that command again")
    if entry is None:
        raise DatasetChecksumError(f"{path}: the manifest {Path(directory) / MANIFEST_NAME} "
                                   f"lists no {split!r} split; {rebuild}")
    got = digests()
    for key in ("rows", "image_shape", "images_sha256", "texts_sha256", "labels_sha256"):
        if key in entry and key in got and entry[key] != got[key]:
            raise DatasetChecksumError(
                f"{path}: checksum mismatch: decoded {key} is {got[key]}, the manifest "
                f"{Path(directory) / MANIFEST_NAME} says {entry[key]}; {rebuild}")


def verify_prepared(root: Path, dataset: str, files: dict[str, Path],
                    arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Optional[dict]:
    """If ``root`` holds a prepared-data manifest: check it is for ``dataset`` and that every
    decoded split in ``arrays`` (read from ``files``) matches its checksums. Returns the
    manifest (None: an unprepared directory, read unchecked)."""
    doc = read_manifest(root)
    if doc is None:
        return None
    if doc["dataset"] != dataset:
        raise ValueError(f"{root}: holds prepared {doc['dataset']!r} data ({doc['variant']}), "
                         f"not {dataset!r}; point data-dir/data-path at a {dataset} directory")
    for split, (x, y) in arrays.items():
        path = Path(files[split]).resolve()
        st = path.stat()
        entry = doc["splits"].get(split) or {}
        key = (str(path), st.st_size, st.st_mtime_ns, entry.get("images_sha256"),
               entry.get("labels_sha256"))
        verify_split(root, split, x, y, doc, key)
    return doc


def clear_verified() -> None:
    _VERIFIED.clear()
