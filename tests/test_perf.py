"""Performance plumbing, checked for behaviour only (no wall-clock thresholds): the streaming
accumulator equals the naive weighted sum and holds memory independent of the number of replies;
the zero-copy reply decoding equals Flower's; the ClientApp set-up cache hits across rounds and
clients; the performance run-config keys reach the client."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from floral_flwr.config import ConfigError, parse_run_config
from floral_flwr.strategy.aggregate import FloralAccumulator, is_adaptor_key
from floral_flwr.wire import from_array, to_array

C = 3


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "base.w": rng.standard_normal((5, 4)).astype(np.float32),
        "base.b": rng.standard_normal(5).astype(np.float32),
        "base.count": np.array(rng.integers(0, 100), dtype=np.int64),  # 0-d integer buffer
        "adaptor.l.in": rng.standard_normal((C, 2, 4)).astype(np.float32),
        "adaptor.l.out": rng.standard_normal((C, 5, 2)).astype(np.float32),
    }


def _naive(template, replies):
    """The rule written out per client and per adaptor slice, in float64."""
    out = {}
    for k, ref in template.items():
        if is_adaptor_key(k):
            agg = np.empty(ref.shape)
            for c in range(C):
                wsum = sum(w[c] for _, _, w in replies)
                agg[c] = sum(w[c] * a[k][c].astype(np.float64) for a, _, w in replies) / wsum
        else:
            agg = sum(n * a[k].astype(np.float64) for a, n, _ in replies) / sum(n for _, n, _ in replies)
        out[k] = agg
    return out


@pytest.mark.parametrize("num_replies", [1, 2, 7, 8, 9, 100])  # below, at and across blocks of 8
def test_accumulator_equals_naive_weighted_sum(num_replies):
    rng = np.random.default_rng(num_replies)
    template = _state(rng)
    replies = []
    for _ in range(num_replies):
        n = float(rng.integers(1, 50))
        replies.append((_state(rng), n, (n * rng.dirichlet(np.ones(C))).tolist()))
    acc = FloralAccumulator(template, C)
    for arrays, n, w in replies:
        acc.add(arrays, n, w)
    got, ref = acc.result(), _naive(template, replies)
    for k in template:
        assert got[k].dtype == template[k].dtype and got[k].shape == template[k].shape
        np.testing.assert_allclose(got[k], ref[k].astype(template[k].dtype), rtol=1e-6, atol=1e-6, err_msg=k)


def test_accumulator_integer_buffers_and_float64_stay_exact():
    """Integer counters (BatchNorm's num_batches_tracked) are not exact in float32 partial sums:
    they and float64 tensors are accumulated in float64."""
    big = 2**24 + 1  # the first integer float32 cannot hold
    template = {"base.count": np.array(big, dtype=np.int64), "base.w64": np.zeros(3)}
    acc = FloralAccumulator(template, 0)
    for n in (1.0, 3.0, 4.0):
        acc.add({"base.count": np.array(big, dtype=np.int64), "base.w64": np.full(3, 1 + 1e-12)}, n)
    out = acc.result()
    assert int(out["base.count"]) == big
    np.testing.assert_array_equal(out["base.w64"], np.full(3, 1 + 1e-12))
    with pytest.raises(ValueError, match="block"):
        FloralAccumulator(template, 0, block=0)


def test_accumulator_memory_does_not_grow_with_replies():
    rng = np.random.default_rng(0)
    template = _state(rng)
    acc = FloralAccumulator(template, C)
    held = []
    for _ in range(20):
        acc.add(_state(rng), 3.0, [1.0, 1.0, 1.0])
        buffers = list(acc._sums.values()) + list(acc._parts.values()) + list(acc._bufs.values())
        held.append((len(buffers), sum(b.nbytes for b in buffers)))
    # once the first block (8 replies) is folded: the same buffers, the same bytes
    assert len(set(held[acc.block:])) == 1
    assert len(acc._sums) == len(acc._parts) == len(template)
    assert all(b.size <= max(v.size for v in template.values()) for b in acc._bufs.values())


WIRE_CASES = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(7, dtype=np.int64),
              np.zeros((0, 2), np.float32), np.asfortranarray(np.ones((3, 2))),
              np.array([True, False]), np.ones((4, 5, 2), np.float16),
              np.arange(24.0).reshape(2, 3, 4).transpose(1, 0, 2),  # non-contiguous view
              np.array(["a", "bc"])]


@pytest.mark.parametrize("values", WIRE_CASES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_wire_codec_matches_flowers_own(values):
    """to_array writes np.save's exact bytes for the C-ordered array (cache miss and hit), 0-d
    arrays included; from_array decodes Flower's bytes (any layout) to the same dtype, shape and
    values as Array.numpy()."""
    for _ in range(2):  # first call fills the header caches, the second uses them
        ours, theirs = to_array(values), Array(np.asarray(values, order="C"))
        assert (ours.data, ours.dtype, ours.shape, ours.stype) == (theirs.data, theirs.dtype, theirs.shape, theirs.stype)
        assert from_array(ours).shape == values.shape  # a 0-d counter stays 0-d
        for arr in (ours, Array(values)):
            got, ref = from_array(arr), arr.numpy()
            assert got.dtype == ref.dtype and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)


def test_performance_keys_are_validated():
    cfg = parse_run_config({"num-threads": "2", "mixed-precision": "bf16", "compile": "true"})
    assert cfg.num_threads == 2 and cfg.mixed_precision == "bf16" and cfg.compile is True
    for key, value in (("num-threads", -1), ("mixed-precision", "fp8"), ("compile", "maybe")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            parse_run_config({key: value})


def _message(arrays: ArrayRecord, rnd: int) -> Message:
    from floral_flwr.client import make_client_app
    from floral_flwr.inline import InlineGrid

    InlineGrid(make_client_app(), 0)  # Flower's task identity, to build messages outside Flower
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}),
                   dst_node_id=42, message_type=MessageType.TRAIN)


def test_client_setup_is_built_once_and_reused_across_rounds_and_clients():
    from floral_flwr.client import handlers
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import get_task

    run = {"task": "digits-label-shift", "num-adaptors": 4, "batch-size": 32, "persist-client-state": False,
           "aggregation": "mean"}
    cfg = parse_run_config(run)
    handle = build_handle(cfg, get_task(cfg.task, num_clients=6, seed=0).build_model)
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in handle.shared_state_dict().items()})
    contexts = [Context(run_id=1, node_id=10 + k, node_config={"partition-id": k, "num-partitions": 6},
                        state=RecordDict(), run_config={}) for k in range(3)]
    handlers._SETUPS.clear()
    before = dict(handlers.SETUP_STATS)
    setups = set()
    for rnd in (1, 2, 3):
        for ctx in contexts:
            reply = handlers.handle_train(_message(arrays, rnd), ctx, run)
            assert not reply.has_error()
            setups.add(id(next(iter(handlers._SETUPS.values()))))
    assert len(setups) == 1 and len(handlers._SETUPS) == 1
    assert handlers.SETUP_STATS["builds"] - before["builds"] == 1
    assert handlers.SETUP_STATS["hits"] - before["hits"] == 8
    # the private state of each client lives in its own context, not in the shared setup
    assert all("floral.private" in ctx.state.array_records for ctx in contexts)


def test_performance_options_reach_the_training_loop():
    from floral_flwr.client import handlers
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import get_task

    threads = torch.get_num_threads()
    try:
        cfg = parse_run_config({"task": "digits-label-shift", "num-threads": 1, "mixed-precision": "bf16",
                                "compile": True})
        handle = build_handle(cfg, get_task(cfg.task, num_clients=4, seed=0).build_model)
        handlers.apply_performance_options(cfg, handle, torch.device("cpu"))
        assert torch.get_num_threads() == 1
        assert handle.autocast_dtype is None  # bf16 autocast is for CUDA only
        assert handle.train_forward is not None  # compiled lazily on the first call
        cuda = parse_run_config({"task": "digits-label-shift", "mixed-precision": "bf16"})
        handlers.apply_performance_options(cuda, handle, torch.device("cuda"))
        assert handle.autocast_dtype == torch.bfloat16 and handle.train_forward is None
    finally:
        torch.set_num_threads(threads)


def test_all_finite_matches_elementwise_check():
    from floral_flwr.strategy.validation import all_finite

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(1000).astype(np.float32), np.zeros((0, 3), np.float32),
             np.full(10, 3e38, np.float32), np.float32([2e19, -1.0]),  # finite, x . x overflows
             np.asfortranarray(rng.standard_normal((4, 3))), np.array(2.5, np.float32),
             np.array([np.inf, -np.inf], np.float32), np.array(np.nan), np.float16([1, 65504, 65504])]
    for i in (0, 500, 999):
        for bad in (np.nan, np.inf, -np.inf):
            x = rng.standard_normal((10, 100)).astype(np.float32)
            x.flat[i] = bad
            cases.append(x)
    for x in cases:
        assert all_finite(x) == bool(np.isfinite(x).all()), x
