"""Flower ``Array`` <-> numpy without redoing the ``.npy`` header work for every array, and a
decoder that a hostile peer cannot make allocate.

Flower carries each array as ``.npy`` bytes: ``Array(ndarray)`` runs ``np.save`` and
``Array.numpy()`` runs ``np.load``. Both build or parse a header, a Python dict literal that
``np.load`` reads with ``ast.literal_eval``: ~30 us per array, per message, on both sides. A
federation sends the same few (dtype, shape) pairs every round, so each header is built or
parsed once and cached, and the payload is copied once (encode) or not at all (decode).

The bytes are exactly those ``np.save`` writes for a C-ordered array (tested), so every Flower
peer decodes them with ``Array.numpy()``; 0-d arrays (BatchNorm's ``num_batches_tracked``) stay
0-d.

Decoding never calls ``np.load`` on received bytes: ``np.load`` allocates the size the header
*claims* before reading the payload, so a 16-byte message claiming 2**33 floats is a
MemoryError. :func:`from_array` instead checks the header (bounded length, a plain dtype, a
shape of non-negative ints), that the payload holds exactly the claimed number of bytes, and,
when the caller says what it expects, the shape and dtype, all before it returns a read-only
view of the received bytes. Anything else raises :class:`WireError` (a ``ValueError``) naming
what is wrong.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array

_MAGIC = b"\x93NUMPY"
_MAX_CACHED = 4096  # distinct headers kept; a peer sending ever new shapes cannot grow memory
_MAX_HEADER = 1 << 16  # bytes; np.save writes ~128 (numpy's own reader refuses > 10000)
_encode_cache: dict[tuple[str, tuple[int, ...]], bytes] = {}
_decode_cache: dict[bytes, tuple[tuple[int, ...], np.dtype, bool, int]] = {}


class WireError(ValueError):
    """An array on the wire is malformed or not what the receiver expects."""


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


def to_array(values: np.ndarray) -> Array:
    """``Array(values)`` with the header built once per (dtype, shape)."""
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d arrays into shape (1,)
    values = np.asarray(values, order="C")
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


def _parse_header(data: bytes) -> tuple[int, tuple[tuple[int, ...], np.dtype, bool, int]]:
    """(payload offset, (shape, dtype, fortran order, element count)) of ``.npy`` bytes."""
    if data[:6] != _MAGIC or len(data) < 10:
        raise WireError("payload is not .npy bytes (bad magic)")
    major = data[6]
    if major == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif major == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise WireError(f".npy format version {major} is not accepted (1 or 2)")
    if end > len(data) or end > _MAX_HEADER:
        raise WireError(f".npy header of {end} bytes exceeds the payload or {_MAX_HEADER} bytes")
    key = bytes(data[:end])
    hit = _decode_cache.get(key)
    if hit is not None:
        return end, hit
    buf = io.BytesIO(key)
    try:
        np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf)  # ast.literal_eval of a bounded header: safe
    except (ValueError, TypeError, SyntaxError) as exc:
        raise WireError(f"malformed .npy header: {exc}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise WireError(f"dtype {dtype} is not a plain numeric type")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"shape {shape!r} is not a tuple of non-negative integers")
    count = 1
    for d in shape:  # Python ints: a claimed 2**70 elements does not wrap around
        count *= d
    hit = (tuple(shape), dtype, bool(fortran), count)
    _remember(_decode_cache, key, hit)
    return end, hit


def from_array(
    array: Array,
    expect_shape: tuple[int, ...] | None = None,
    expect_dtype: np.dtype | None = None,
) -> np.ndarray:
    """A read-only numpy view of an ``Array``'s payload (no copy, no allocation): same values,
    dtype and shape as ``array.numpy()``.

    Raises :class:`WireError` if the payload is not plain ``.npy`` bytes holding exactly the
    number of bytes its header claims, or (when given) its shape or dtype differ from
    ``expect_shape`` / ``expect_dtype``; the checks come before anything is allocated."""
    data = array.data
    if array.stype != "numpy.ndarray":
        raise WireError(f"stype {array.stype!r} is not 'numpy.ndarray'")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"payload is {type(data).__name__}, not bytes")
    end, (shape, dtype, fortran, count) = _parse_header(data)
    if expect_shape is not None and shape != tuple(expect_shape):
        raise WireError(f"shape {shape} differs from the expected {tuple(expect_shape)}")
    if expect_dtype is not None and dtype != np.dtype(expect_dtype):
        raise WireError(f"dtype {dtype} differs from the expected {np.dtype(expect_dtype)}")
    payload = len(data) - end
    if payload != count * dtype.itemsize:
        raise WireError(
            f"payload has {payload} bytes but the header claims {shape} x {dtype} = "
            f"{count * dtype.itemsize} bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    if fortran:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def decode_record(
    record: Mapping[str, Array], template: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Every array of a record as a read-only view. With a ``template`` the keys must be
    exactly the template's and each array must have its shape and dtype (checked per array
    before it is viewed; the first difference raises :class:`WireError` naming the key)."""
    if template is None:
        return {k: from_array(a) for k, a in record.items()}
    missing = [k for k in template if k not in record]
    extra = [k for k in record if k not in template]
    if missing or extra:
        raise WireError(f"array keys differ from the global state: missing {missing[:5]}, extra {extra[:5]}")
    out: dict[str, np.ndarray] = {}
    for key, ref in template.items():
        try:
            out[key] = from_array(record[key], ref.shape, ref.dtype)
        except WireError as exc:
            raise WireError(f"array '{key}': {exc}") from None
    return out
