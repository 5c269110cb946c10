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
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

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


# ----------------------------------------------------------------------------- packed records
# Flower moves every Array of a message as its own objects (the Array and its chunk), each one
# HTTP request per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp, and back). A model with
# 10 arrays is ~24 requests per message per hop; packed it is ~6. The packed record is a single
# uint8 Array: an 8-byte little-endian length, a JSON layout [[key, dtype, shape], ...], then
# the arrays' raw bytes back to back. Unpacking rebuilds the same Arrays bit for bit.

PACKED_KEY = "floral.packed"
_PACKABLE_KINDS = "biufc"  # bool, int, uint, float, complex: never object arrays


def is_packed(record: ArrayRecord) -> bool:
    return len(record) == 1 and PACKED_KEY in record


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` (an ArrayRecord) as one packed Array; records of < 2 arrays stay as they are."""
    if len(record) < 2 or is_packed(record):
        return record
    layout, parts = [], []
    for key, array in record.items():
        values = np.asarray(from_array(array), order="C")  # not ascontiguousarray: 0-d stays 0-d
        if values.dtype.kind not in _PACKABLE_KINDS:
            return record  # Flower's own codec refuses or handles it
        layout.append([key, values.dtype.str, list(values.shape)])
        parts.append(values.reshape(-1).view(np.uint8))
    head = json.dumps(layout).encode()
    buf = np.concatenate([np.frombuffer(len(head).to_bytes(8, "little") + head, np.uint8), *parts])
    return ArrayRecord({PACKED_KEY: to_array(buf)})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord ``pack_record`` packed (anything else is returned as it is); raises
    ValueError on a malformed packed record."""
    if not is_packed(record):
        return record
    buf = from_array(record[PACKED_KEY])
    if buf.dtype != np.uint8 or buf.ndim != 1 or len(buf) < 8:
        raise ValueError("packed arrays: not a 1-D uint8 buffer")
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n > len(buf) - 8:
        raise ValueError("packed arrays: layout longer than the buffer")
    try:
        layout = json.loads(bytes(buf[8:8 + n]))
    except ValueError as exc:
        raise ValueError(f"packed arrays: layout is not JSON ({exc})") from None
    out, offset = {}, 8 + n
    for entry in layout if isinstance(layout, list) else [None]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list)
                and all(isinstance(d, int) and d >= 0 for d in entry[2])):
            raise ValueError(f"packed arrays: bad layout entry {entry!r}")
        key, dt, shape = entry
        try:
            dtype = np.dtype(dt)
        except TypeError:
            raise ValueError(f"packed arrays: bad dtype {dt!r} for '{key}'") from None
        if dtype.kind not in _PACKABLE_KINDS:
            raise ValueError(f"packed arrays: dtype {dt!r} of '{key}' is not numeric")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a claimed 2**70 cannot wrap
        if offset + nbytes > len(buf):
            raise ValueError(f"packed arrays: '{key}' runs past the end of the buffer")
        out[key] = to_array(buf[offset:offset + nbytes].view(dtype).reshape(shape))
        offset += nbytes
    if offset != len(buf):
        raise ValueError(f"packed arrays: {len(buf) - offset} bytes left after the last array")
    return ArrayRecord(out)


def pack_content(content: RecordDict) -> RecordDict:
    """A RecordDict whose ArrayRecords are packed (a new RecordDict; the others are shared)."""
    return RecordDict({k: pack_record(v) if k in content.array_records else v for k, v in content.items()})


def unpack_content(content: RecordDict) -> RecordDict:
    """Inverse of :func:`pack_content` (ValueError on a malformed packed record)."""
    return RecordDict({k: unpack_record(v) if k in content.array_records else v for k, v in content.items()})


def has_packed(content: RecordDict) -> bool:
    return any(is_packed(r) for r in content.array_records.values())


def packed_arrays_mod(msg: Message, context: Any, call_next: Any) -> Message:
    """ClientApp mod: a message with packed arrays reaches the handler unpacked, and its reply
    goes back packed; any other message passes through untouched."""
    if not msg.has_content() or not has_packed(msg.content):
        return call_next(msg, context)
    packed = msg.content
    msg.content = unpack_content(packed)
    try:
        reply = call_next(msg, context)
    finally:
        msg.content = packed
    if reply.has_error() or not reply.has_content():
        return reply
    return Message(pack_content(reply.content), reply_to=msg)
