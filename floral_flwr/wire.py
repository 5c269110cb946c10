"""Flower ``Array`` <-> numpy without redoing the ``.npy`` header work for every array.

Flower carries each array as ``.npy`` bytes: ``Array(ndarray)`` runs ``np.save`` and
``Array.numpy()`` runs ``np.load``. Both build or parse a header, a Python dict literal that
``np.load`` reads with ``ast.literal_eval``: ~30 us per array, per message, on both sides. A
federation sends the same few (dtype, shape) pairs every round, so each header is built or
parsed once and cached, and the payload is copied once (encode) or not at all (decode).

The bytes are exactly those ``np.save`` writes for a C-ordered array (tested), so every Flower
peer decodes them with ``Array.numpy()``, and :func:`from_array` decodes any ``Array``: anything
but a C-ordered numeric ``.npy`` payload goes through Flower's own decoder.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array

_MAGIC = b"\x93NUMPY"
_MAX_CACHED = 4096  # distinct headers kept; a peer sending ever new shapes cannot grow memory
_encode_cache: dict[tuple[str, tuple[int, ...]], bytes] = {}
_decode_cache: dict[bytes, tuple[tuple[int, ...], np.dtype, int]] = {}


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


def to_array(values: np.ndarray) -> Array:
    """``Array(values)`` with the header built once per (dtype, shape)."""
    values = np.ascontiguousarray(values)
    if values.dtype.hasobject:
        return Array(values)  # Flower refuses it with its own error (no pickles on the wire)
    key = (values.dtype.str, values.shape)
    header = _encode_cache.get(key)
    if header is None:
        buf = io.BytesIO()
        np.save(buf, values, allow_pickle=False)
        data = buf.getvalue()
        header = data[: len(data) - values.nbytes]
        _remember(_encode_cache, key, header)
    else:
        data = b"".join((header, values.reshape(-1).view(np.uint8)))  # one copy
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=data)


def from_array(array: Array) -> np.ndarray:
    """A read-only numpy view of an ``Array``'s payload (no copy); same values, dtype and shape
    as ``array.numpy()``."""
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, (bytes, bytearray)) or data[:6] != _MAGIC:
        return array.numpy()
    major = data[6]
    if major == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif major == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return array.numpy()
    key = bytes(data[:end])
    hit = _decode_cache.get(key)
    if hit is None:
        buf = io.BytesIO(key)
        try:
            version = np.lib.format.read_magic(buf)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                return array.numpy()
            shape, fortran, dtype = read(buf)
        except ValueError:
            return array.numpy()
        if fortran or dtype.hasobject:
            return array.numpy()
        hit = (tuple(shape), dtype, int(np.prod(shape, dtype=np.int64)))
        _remember(_decode_cache, key, hit)
    shape, dtype, count = hit
    if len(data) - end < count * dtype.itemsize:
        return array.numpy()  # truncated payload: let Flower's decoder raise its error
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)
