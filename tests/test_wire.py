"""The wire codec cannot be made to allocate, keeps 0-d arrays 0-d, and names what is wrong."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from floral_flwr.wire import WireError, decode_record, from_array, to_array


def _npy(header: str, payload: bytes = b"\0" * 16, version: int = 1) -> Array:
    """Hand-made .npy bytes with an arbitrary (possibly lying) header."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    body = text + b" " * pad + b"\n"
    size = len(body).to_bytes(2 if version == 1 else 4, "little")
    data = b"\x93NUMPY" + bytes([version, 0]) + size + body + payload
    return Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)


def test_a_huge_claimed_size_is_refused_before_any_allocation():
    evil = _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (8589934592,), }")  # 2**33 floats
    with pytest.raises(MemoryError):  # what Flower's own decoder (np.load) does with it
        evil.numpy()
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="claims"):
            from_array(evil)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing near the claimed 32 GiB (nor any large buffer) was allocated


@pytest.mark.parametrize("header, payload, match", [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", b"\0" * 12, "claims"),  # truncated
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", b"\0" * 20, "claims"),  # trailing bytes
    ("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", b"\0" * 16, "plain numeric"),
    ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4,), }", b"\0" * 16, "plain numeric"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 4), }", b"\0" * 16, "header|non-negative"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2**40, 2**40), }", b"\0" * 16, "header|claims"),
    ("__import__('os').system('true')", b"", "header"),
])
def test_malformed_headers_and_payloads_are_refused(header, payload, match):
    with pytest.raises(WireError, match=match):
        from_array(_npy(header, payload))


def test_other_encodings_are_refused():
    good = to_array(np.ones(4, np.float32))
    for bad in (
        Array(dtype=good.dtype, shape=good.shape, stype="pickle", data=good.data),
        Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"garbage" * 10),
        Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:6] + b"\x03" + good.data[7:]),
    ):
        with pytest.raises(WireError):
            from_array(bad)


def test_expected_shape_and_dtype_are_checked_per_key():
    template = {"base.w": np.zeros((3, 4), np.float32), "base.n": np.array(0, np.int64)}
    good = ArrayRecord({"base.w": to_array(np.ones((3, 4), np.float32)), "base.n": to_array(np.array(5))})
    out = decode_record(good, template)
    assert out["base.n"].shape == () and int(out["base.n"]) == 5
    bad_shape = ArrayRecord({"base.w": to_array(np.ones((4, 3), np.float32)), "base.n": to_array(np.array(5))})
    with pytest.raises(WireError, match=r"'base.w'.*shape \(4, 3\) differs from the expected \(3, 4\)"):
        decode_record(bad_shape, template)
    bad_dtype = ArrayRecord({"base.w": to_array(np.ones((3, 4))), "base.n": to_array(np.array(5))})
    with pytest.raises(WireError, match="'base.w'.*dtype float64"):
        decode_record(bad_dtype, template)
    with pytest.raises(WireError, match="missing \\['base.n'\\], extra \\['x'\\]"):
        decode_record(ArrayRecord({"base.w": good["base.w"], "x": good["base.n"]}), template)


def test_zero_d_arrays_round_trip_through_flowers_serialization():
    """BatchNorm's num_batches_tracked is 0-d: it must come back 0-d (it came back as shape
    (1,), and every client of a -bn task failed to load the global state)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from floral_flwr.client import make_client_app
    from floral_flwr.inline import InlineGrid, _roundtrip

    InlineGrid(make_client_app(), 0)  # task identity for building a message
    record = ArrayRecord({"n": to_array(np.array(7, np.int64)), "x": to_array(np.float32(2.5))})
    msg = Message(RecordDict({"arrays": record, "config": ConfigRecord({})}), dst_node_id=3,
                  message_type=MessageType.TRAIN)
    back = _roundtrip(msg).content["arrays"]
    assert from_array(back["n"]).shape == () and back["n"].numpy().shape == ()
    assert from_array(back["x"]).shape == () and float(from_array(back["x"])) == 2.5
