"""Aggregation arithmetic that no finite input can break, and the robust modes against
independent computations (replicated-sample medians and trimmed means, hand-clipped updates)."""

from __future__ import annotations

import numpy as np
import pytest

from floral_flwr.strategy.aggregate import FloralAccumulator
from floral_flwr.strategy.bounds import ExampleCaps
from floral_flwr.strategy.robust import (ClippedAccumulator, CoordinateAccumulator, make_accumulator,
                                         weighted_coordinate)
from floral_flwr.strategy.validation import InvalidReply

F32_MAX = float(np.finfo(np.float32).max)


def _template(c: int = 2):
    return {"base.w": np.zeros((3, 2), np.float32), "adaptor.a": np.zeros((c, 4), np.float32),
            "base.n": np.array(0, np.int64)}


def _reply(value: float, c: int = 2, counter: int = 1):
    return {"base.w": np.full((3, 2), value, np.float32), "adaptor.a": np.full((c, 4), value, np.float32),
            "base.n": np.array(counter, np.int64)}


# ------------------------------------------------------------------ overflow and underflow


def test_finite_values_near_float32_max_cannot_overflow_the_sums():
    """Two replies at 3e38 (finite float32) overflowed the float32 block sum to Inf and the
    global model became Inf; the float64 totals keep the exact mean."""
    acc = FloralAccumulator(_template(), 2)
    for v in (3e38, 3e38, -1e38):
        acc.add(_reply(v), 1.0, [1.0, 1.0])
    out = acc.result()
    expected = np.float32((2 * np.float64(np.float32(3e38)) + np.float64(np.float32(-1e38))) / 3)
    for key in ("base.w", "adaptor.a"):
        assert np.isfinite(out[key]).all()
        np.testing.assert_allclose(out[key], expected, rtol=1e-6)


def test_large_weights_cannot_overflow_either():
    acc = FloralAccumulator(_template(), 2)
    acc.add(_reply(1e30), 1e9, [1e9, 1e9])
    acc.add(_reply(2e30), 1e9, [5e8, 1e9])
    out = acc.result()
    np.testing.assert_allclose(out["base.w"], 1.5e30, rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.a"][0], (1e9 * 1e30 + 5e8 * 2e30) / 1.5e9, rtol=1e-6)


@pytest.mark.parametrize("tiny", [1e-42, 1e-300])
def test_tiny_adaptor_weights_give_the_weighted_mean_not_zeros(tiny):
    """Low temperature: every p_k(c) below float32's normal range. The weights' common scale
    must not matter: the adaptor is the weighted mean of the replies, not zeros (a zero adaptor
    has zero gradient and never trains again)."""
    template = _template()
    template["adaptor.a"] = np.full((2, 4), 7.0, np.float32)
    acc = FloralAccumulator(template, 2)
    acc.add(_reply(0.25), 10.0, [10.0, 3 * tiny])
    acc.add(_reply(0.75), 10.0, [10.0, tiny])
    out = acc.result()
    np.testing.assert_allclose(out["adaptor.a"][1], (3 * 0.25 + 0.75) / 4, rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.a"][0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(acc.adaptor_totals, [20.0, 4 * tiny], rtol=1e-12)


def test_a_huge_weight_after_tiny_ones_dominates_as_it_should():
    acc = FloralAccumulator(_template(), 2)
    acc.add(_reply(1.0), 1.0, [1.0, 1e-40])
    acc.add(_reply(3.0), 1e9, [1.0, 1e9])  # 1e49 x the first weight of adaptor 1
    out = acc.result()
    np.testing.assert_allclose(out["adaptor.a"][1], 3.0, rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.a"][0], 2.0, rtol=1e-6)


def test_relative_weights_leave_ordinary_results_bit_identical():
    """Power-of-two rescaling is exact: the same replies give the same bits as float64 weights
    applied without it would (checked against the accumulator's own float32/float64 path with
    all weights pre-divided by the same power of two)."""
    rng = np.random.default_rng(0)
    template = {"base.w": np.zeros((50,), np.float32), "adaptor.a": np.zeros((3, 40), np.float32)}
    replies = [({"base.w": rng.standard_normal(50).astype(np.float32),
                 "adaptor.a": rng.standard_normal((3, 40)).astype(np.float32)},
                float(rng.integers(5, 500)), rng.random(3) * 100) for _ in range(13)]
    a, b = FloralAccumulator(template, 3), FloralAccumulator(template, 3)
    for arrays, n, w in replies:
        a.add(arrays, n, w)
        b.add(arrays, n, w * 2.0**-20)  # another common power of two
    ra, rb = a.result(), b.result()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])


def test_negative_or_non_finite_weights_are_refused():
    acc = FloralAccumulator(_template(), 2)
    for n, w in ((-1.0, [1.0, 1.0]), (float("nan"), [1.0, 1.0]), (1.0, [float("inf"), 0.0]), (1.0, [-1.0, 1.0])):
        with pytest.raises(ValueError, match="finite and >= 0"):
            acc.add(_reply(1.0), n, w)


# ------------------------------------------------------------------ robust modes


def _replicated(values, weights):
    return np.repeat(np.asarray(values, np.float64), np.asarray(weights, int))


def test_weighted_median_equals_the_median_of_replicated_samples():
    rng = np.random.default_rng(1)
    for _ in range(50):
        k = int(rng.integers(1, 9))
        vals = rng.standard_normal(k)
        w = rng.integers(1, 5, size=k)
        got = weighted_coordinate(vals[:, None], w[:, None].astype(float), 0.5)[0]
        assert got == pytest.approx(np.median(_replicated(vals, w)), rel=1e-12, abs=1e-12)


def test_weighted_trimmed_mean_equals_the_trimmed_mean_of_replicated_samples():
    rng = np.random.default_rng(2)
    for _ in range(50):
        k = int(rng.integers(1, 9))
        vals = rng.standard_normal(k)
        w = rng.integers(1, 5, size=k)
        rep = np.sort(_replicated(vals, w))
        cut = int(rng.integers(0, (len(rep) - 1) // 2 + 1))  # whole samples from each end
        beta = cut / len(rep)
        got = weighted_coordinate(vals[:, None], w[:, None].astype(float), beta)[0]
        assert got == pytest.approx(rep[cut:len(rep) - cut].mean(), rel=1e-12, abs=1e-12)


def test_median_and_trimmed_mean_ignore_one_far_outlier_per_adaptor_weight():
    template = _template()
    for mode in ("median", "trimmed-mean"):
        acc = make_accumulator(template, 2, mode, trim_fraction=0.2)
        for v in (1.0, 1.1, 0.9, 1.05, 0.95):
            acc.add(_reply(v), 10.0, [10.0, 2.0])
        acc.add(_reply(1e30), 10.0, [10.0, 2.0])  # the attacker, same weight as the others
        out = acc.result()
        assert 0.9 <= float(out["base.w"].max()) <= 1.1, mode
        assert 0.9 <= float(out["adaptor.a"].max()) <= 1.1, mode
        assert int(out["base.n"]) == 1


def test_coordinate_modes_keep_an_unused_adaptor_and_use_p_k_given_c_weights():
    template = _template()
    template["adaptor.a"] = np.full((2, 4), 5.0, np.float32)
    acc = CoordinateAccumulator(template, 2, 0.5)
    acc.add(_reply(1.0), 10.0, [1.0, 0.0])
    acc.add(_reply(2.0), 10.0, [3.0, 0.0])  # holds 3/4 of adaptor 0's weight
    out = acc.result()
    np.testing.assert_array_equal(out["adaptor.a"][1], 5.0)  # nobody used adaptor 1
    np.testing.assert_array_equal(out["adaptor.a"][0], 2.0)  # the weighted median
    np.testing.assert_array_equal(out["base.w"], 1.5)  # equal n: the mean of the two middles


def test_clip_bounds_each_update_norm_per_part():
    template = _template()
    acc = ClippedAccumulator(template, 2, clip_norm=1.0)
    honest = {k: v.copy() for k, v in _reply(0.1).items()}
    evil = {k: v.copy() for k, v in _reply(100.0).items()}
    acc.add(honest, 1.0, [1.0, 1.0])
    acc.add(evil, 1.0, [1.0, 1.0])
    out = acc.result()
    # by hand: the evil base update (6 entries of 100) scaled to norm 1, then the mean
    evil_base = np.full(6, 100.0) / np.linalg.norm(np.full(6, 100.0))
    honest_base = np.full(6, 0.1)  # norm 0.245 < 1: unchanged
    np.testing.assert_allclose(out["base.w"].reshape(-1), (evil_base + honest_base) / 2, rtol=1e-6)
    # adaptor slices are clipped one by one (4 entries each)
    np.testing.assert_allclose(out["adaptor.a"][0], (0.1 + 100.0 / np.linalg.norm(np.full(4, 100.0))) / 2, rtol=1e-6)
    assert acc.clipped == 1


def test_clip_with_the_automatic_norm_is_bounded_by_the_honest_majority():
    template = _template()
    acc = ClippedAccumulator(template, 2, clip_norm=0.0)
    for v in (0.1, 0.2, 0.3):
        acc.add(_reply(v), 1.0, [1.0, 1.0])
    acc.add(_reply(1e20), 1.0, [1.0, 1.0])
    out = acc.result()
    assert float(np.abs(out["base.w"]).max()) < 0.3  # the attacker's update has the median norm


def test_clip_under_sum_only_bounds_n_times_the_update():
    template = {"base.w": np.ones(4, np.float32), "adaptor.a": np.ones((1, 4), np.float32)}
    acc = ClippedAccumulator(template, 1, clip_norm=0.5)
    n = 10.0
    # a presummed reply n * x with x = g + update; the update has norm 20, clipped to 0.5
    x = np.ones(4) + np.array([20.0, 0, 0, 0])
    acc.add({"base.w": (n * x).astype(np.float32), "adaptor.a": (n * x[None]).astype(np.float32)}, n, [n],
            presummed=True)
    out = acc.result()
    np.testing.assert_allclose(out["base.w"], [1.5, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.a"][0], [1.5, 1, 1, 1], rtol=1e-6)


def test_per_client_modes_refuse_presummed_replies():
    acc = CoordinateAccumulator(_template(), 2, 0.2)
    with pytest.raises(ValueError, match="sum-only"):
        acc.add(_reply(1.0), 1.0, [1.0, 1.0], presummed=True)


# ------------------------------------------------------------------ caps from the server's knowledge


def test_caps_come_from_the_servers_partition_sizes_not_the_declaration():
    caps = ExampleCaps(task_sizes=lambda n: [10 * (i + 1) for i in range(n)])
    assert caps.admit(2, 1e9, num_partitions=4) == 30.0  # declared 1e9, knows 30
    assert caps.cap(0) == 10.0
    with pytest.raises(InvalidReply, match="num-partitions"):
        caps.admit(1, 20, num_partitions=5)
    with pytest.raises(InvalidReply, match="outside"):
        caps.admit(7, 20)


def test_without_sizes_the_first_declaration_is_pinned_and_max_examples_bounds_it():
    caps = ExampleCaps(max_examples=500)
    assert caps.admit(3, 100) == 100.0
    assert caps.admit(3, 1e9) == 100.0  # a restarted/impersonating node cannot raise it
    assert caps.admit(4, 1e6) == 500.0  # the operator's bound
    assert ExampleCaps().admit(0, 1e12) == 1e9  # the absolute bound
