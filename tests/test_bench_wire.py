"""The wire analysis (benchmarks/bench_wire.py) accounts for every byte of recorded HTTP/1.1
exchanges and finds the array bytes inside Flower's object requests, checked against streams
built here from Flower's own objects and protobuf messages."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flwr.app import Array
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse, PushObjectRequest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_wire  # noqa: E402


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:1\r\ncontent-type: application/protobuf\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _response(body: bytes, chunked: bool = False) -> bytes:
    if chunked:  # two chunks, then the terminating one
        half = len(body) // 2
        return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % half + body[:half]
                + b"\r\n" + b"%x\r\n" % (len(body) - half) + body[half:] + b"\r\n0\r\n\r\n")
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body


def test_every_byte_is_accounted_for_and_array_data_is_found():
    values = np.arange(300, dtype=np.float32)
    objects = get_all_nested_objects(Array(values))
    chunk = next(o for o in objects.values() if type(o).__name__ == "ArrayChunk").deflate()
    array = next(o for o in objects.values() if type(o).__name__ == "Array").deflate()
    npy_len = len(Array(values).data)  # the .npy bytes Flower puts in the chunk's body

    push = PushObjectRequest(run_id=7, object_id="a" * 64, object_content=chunk).SerializeToString()
    pull = PullObjectRequest(run_id=7, object_id="b" * 64).SerializeToString()
    pulled = PullObjectResponse(object_found=True, object_available=True, object_content=array).SerializeToString()
    up = _request("/v1/fleet/push-object", push) + _request("/v1/fleet/pull-object", pull)
    down = _response(b"") + _response(pulled, chunked=True)
    # delivered in odd pieces, both connections' directions interleaved as the proxy sees them
    record = [(0.0, 0, True, up[:37]), (0.1, 0, True, up[37:400]), (0.2, 0, False, down[:5]),
              (0.3, 0, True, up[400:]), (0.4, 0, False, down[5:])]

    exs = bench_wire.exchanges(record)

    assert [e.path for e in exs] == ["/v1/fleet/push-object", "/v1/fleet/pull-object"]
    assert sum(sum(e.up.values()) for e in exs) == len(up)
    assert sum(sum(e.down.values()) for e in exs) == len(down)
    pushed, pulled_ex = exs
    assert pushed.up["array data"] == npy_len  # the chunk's body is the array's .npy bytes
    assert pushed.up["object heads"] == len(chunk) - npy_len
    assert pushed.up["envelope"] == len(push) - len(chunk)
    assert pulled_ex.down["array data"] == 0  # an Array object carries metadata, not data
    assert pulled_ex.down["other object bodies"] + pulled_ex.down["object heads"] == len(array)
    assert pulled_ex.down["envelope"] == len(pulled) - len(array)
    assert pulled_ex.up["http"] == len(up) - len(_request("/v1/fleet/push-object", push)) - len(pull)
