"""The secure-aggregation payload (floral_flwr.strategy.masked_sum) and the protocol sizes, without
Flower's protocol: sums of payloads must decode to the FLoRAL mean, Flower's own quantization
must stay within the documented error, and the bounds must be refused with the key named."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from sklearn.metrics import adjusted_rand_score

from floral_flwr.config import ConfigError, parse_run_config
from floral_flwr.strategy.aggregate import FloralAccumulator
from floral_flwr.strategy.evaluation import summarize_eval
from floral_flwr.strategy.masked_sum import (
    MAX_LEVELS,
    MODULUS,
    ClipRangeError,
    ari_from_table,
    check_clip,
    check_flower_version,
    decode_tally,
    decode_train,
    encode_tally,
    encode_train,
    precision,
    quantization_levels,
)
from floral_flwr.strategy.secagg import SecAggSettings, protocol_sizes

C = 3


def _template(rng):
    return {
        "base.w": rng.normal(size=(4, 5)).astype(np.float32),
        "base.bn.num_batches_tracked": np.array(40, dtype=np.int64),
        "adaptor.l.in": rng.normal(size=(C, 2, 5)).astype(np.float32),
        "adaptor.l.bias": rng.normal(size=(C, 4)).astype(np.float32),
    }


def _clients(rng, template, sizes, dead_adaptor=None):
    out = []
    for n in sizes:
        arrays = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f"
                  else v + int(rng.integers(1, 30)) for k, v in template.items()}
        p = rng.dirichlet(np.ones(C))
        if dead_adaptor is not None:
            p[dead_adaptor] = 0.0
            p /= p.sum()
        out.append((arrays, float(n), (n * p).tolist()))
    return out


def _sum_of_payloads(template, clients, scale):
    return sum(encode_train(template, a, n, w, C, scale) for a, n, w in clients)


def test_levels_keep_the_sum_below_the_modulus():
    for n in (1, 2, 3, 4, 5, 8, 20, 100, 1000, 5000):
        t = quantization_levels(n)
        assert t & (t - 1) == 0 and t <= MAX_LEVELS
        assert n * t < MODULUS
        assert t == MAX_LEVELS or n * 2 * t >= MODULUS  # the largest such power of two


def test_decoded_sum_is_the_floral_weighted_mean():
    rng = np.random.default_rng(0)
    template = _template(rng)
    clients = _clients(rng, template, [30, 50, 20, 41], dead_adaptor=1)
    scale = 50.0
    prec = precision(8.0, len(clients))
    decoded = decode_train(_sum_of_payloads(template, clients, scale), template, C, scale, prec)
    acc = FloralAccumulator(template, C)
    for a, n, w in clients:
        acc.add(a, n, w)
    expected = acc.result()
    for k in template:
        assert decoded.arrays[k].dtype == template[k].dtype
        np.testing.assert_allclose(decoded.arrays[k], expected[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # the adaptor nobody used keeps its previous value, as in the mean rule
    np.testing.assert_array_equal(decoded.arrays["adaptor.l.in"][1], template["adaptor.l.in"][1])
    assert decoded.frozen_adaptors == [1]
    assert decoded.total_examples == pytest.approx(141.0)
    np.testing.assert_allclose(decoded.adaptor_totals, acc.adaptor_totals, rtol=1e-9)


def test_integer_buffers_are_rounded_to_the_weighted_mean():
    rng = np.random.default_rng(1)
    template = _template(rng)
    clients = _clients(rng, template, [10, 10])
    total = _sum_of_payloads(template, clients, 10.0)
    decoded = decode_train(total, template, C, 10.0, precision(8.0, 2))
    counts = [a["base.bn.num_batches_tracked"] for a, _, _ in clients]
    assert decoded.arrays["base.bn.num_batches_tracked"] == np.rint(np.mean(counts))


def test_flower_quantization_error_is_within_the_documented_bound():
    """Quantize every payload as Flower's mod does, sum the integers, dequantize as Flower's
    workflow does: the decoded state is within Precision.worst_error of the exact one."""
    rng = np.random.default_rng(2)
    template = _template(rng)
    sizes = [30, 50, 20, 41, 33]
    clients = _clients(rng, template, sizes)
    scale, clip = 50.0, 8.0
    prec = precision(clip, len(clients))
    payloads = [encode_train(template, a, n, w, C, scale) for a, n, w in clients]
    q = sum(quantize([p], clip, prec.levels)[0].astype(np.int64) for p in payloads) % MODULUS
    noisy = dequantize([q], clip, prec.levels)[0] - (len(payloads) - 1) * clip
    exact = decode_train(sum(payloads), template, C, scale, prec)
    got = decode_train(noisy, template, C, scale, prec)
    s_n = sum(sizes) / scale
    # plus one float32 spacing: the decoded state is stored in the template's dtype
    ulp = np.spacing(np.abs(exact.arrays["base.w"]))
    err = np.abs(got.arrays["base.w"].astype(np.float64) - exact.arrays["base.w"])
    assert 0 < err.max() and (err <= prec.worst_error(len(sizes), s_n) + ulp).all()
    for c in range(C):
        b = prec.worst_error(len(sizes), exact.adaptor_totals[c] / scale)
        ulp = np.spacing(np.abs(exact.arrays["adaptor.l.in"][c]))
        err = np.abs(got.arrays["adaptor.l.in"][c].astype(np.float64) - exact.arrays["adaptor.l.in"][c])
        assert (err <= b + ulp).all()


def test_an_adaptor_with_weight_below_the_quantization_floor_is_not_moved():
    rng = np.random.default_rng(3)
    template = _template(rng)
    clients = _clients(rng, template, [30, 30, 30])
    prec = precision(8.0, 3)
    for i, (a, n, w) in enumerate(clients):  # adaptor 2 gets a weight far below the floor
        w = list(w)
        w[2] = prec.min_weight * 30 / 10
        clients[i] = (a, n, w)
    decoded = decode_train(_sum_of_payloads(template, clients, 30.0), template, C, 30.0, prec)
    assert 2 in decoded.frozen_adaptors
    np.testing.assert_array_equal(decoded.arrays["adaptor.l.bias"][2], template["adaptor.l.bias"][2])


def test_clip_check_names_the_key():
    check_clip(np.array([-8.0, 0.5, 8.0]), 8.0)
    with pytest.raises(ClipRangeError, match="'secagg-clip' = 8"):
        check_clip(np.array([0.0, 8.5]), 8.0)
    with pytest.raises(ClipRangeError, match="secagg-clip"):
        check_clip(np.array([np.nan]), 8.0)


def test_tally_and_ari_match_sklearn():
    rng = np.random.default_rng(4)
    for _ in range(20):
        k, c, n = int(rng.integers(2, 5)), int(rng.integers(2, 6)), int(rng.integers(3, 30))
        true = rng.integers(0, k, size=n)
        assigned = rng.integers(0, c, size=n)
        if len(set(true)) < 2:
            continue
        total = sum(encode_tally(int(t), int(a), k, c) for t, a in zip(true, assigned))
        table = decode_tally(total, k, c)
        assert table.sum() == n
        assert ari_from_table(table) == pytest.approx(adjusted_rand_score(true, assigned), abs=1e-12)
    assert encode_tally(-1, 0, 2, 2).sum() == 0 and encode_tally(0, -1, 2, 2).sum() == 0
    assert ari_from_table(np.array([[3, 0], [0, 0]])) is None  # one true cluster: undefined


def test_protocol_sizes_and_their_errors():
    s = SecAggSettings()
    for n in (2, 3, 5, 8, 20, 64):
        k, t = protocol_sizes(n, s)
        assert k <= n and (k == n or k % 2 == 1)
        assert t > k / 2 and 2 <= t <= k  # a server cannot collect both secrets of a client
    assert protocol_sizes(20, s) == (5, 3)  # automatic: min(N, 5), t = ceil(0.6 k)
    with pytest.raises(ConfigError, match="'aggregation' = 'secagg' needs at least 2 clients"):
        protocol_sizes(1, s)
    with pytest.raises(ConfigError, match=r"'secagg-num-shares' = 7 exceeds .* allowed 0 \(automatic\)"):
        protocol_sizes(5, SecAggSettings(num_shares=7))


@pytest.mark.parametrize("key, value, fragment", [
    ("secagg-num-shares", 4, "odd integer"),
    ("secagg-num-shares", 1, "odd integer"),
    ("secagg-threshold", 0.5, "(0.5, 1.0]"),
    ("secagg-clip", 0.5, ">= 1.0"),
    ("aggregation", "secure", "'secagg'"),
])
def test_bad_secagg_keys_are_named(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert f"'{key}'" in str(err.value) and fragment in str(err.value)


def test_untested_flower_version_is_refused():
    check_flower_version("1.41.0")
    check_flower_version("1.42.3")
    with pytest.raises(ConfigError, match=r"'aggregation' = 'secagg' .* 1\.41\.x / 1\.42\.x; installed flwr is 1\.43\.0"):
        check_flower_version("1.43.0")


def test_plaintext_eval_ari_matches_sklearn_without_importing_it():
    """'mean' mode's ARI (from each reply's assigned adaptor) is sklearn's, computed without
    importing scikit-learn on the server (its import was 2-3 s of the first evaluation round)."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        true = rng.integers(0, int(rng.integers(2, 5)), size=n)
        assigned = rng.integers(0, int(rng.integers(1, 6)), size=n)
        if len(set(true)) < 2:
            continue
        rows = [{"accuracy": 0.5, "num-examples": 10, "loss": 1.0, "true-cluster": int(t),
                 "assigned-adaptor": int(a)} for t, a in zip(true, assigned)]
        got = summarize_eval(rows, "accuracy")["cluster-ari"]
        assert got == pytest.approx(adjusted_rand_score(true, assigned), abs=1e-12)
    # a hostile reply's label sizes nothing: true-cluster may be any validated integer
    hostile = [{"accuracy": 0.5, "num-examples": 10, "loss": 1.0, "true-cluster": c, "assigned-adaptor": a}
               for c, a in ((0, 0), (0, 0), (2**31 - 1, 1), (2**31 - 1, 1))]
    import floral_flwr.strategy.evaluation as evaluation

    shapes = []
    real = evaluation.ari_from_table
    evaluation.ari_from_table = lambda table: shapes.append(table.shape) or real(table)
    try:
        assert summarize_eval(hostile, "accuracy")["cluster-ari"] == pytest.approx(1.0)
    finally:
        evaluation.ari_from_table = real
    assert shapes == [(2, 2)]
    code = ("import sys; from floral_flwr.strategy.evaluation import summarize_eval; "
            "rows = [{'accuracy': 1.0, 'num-examples': 1, 'loss': 0.0, 'true-cluster': i % 2, "
            "'assigned-adaptor': i % 3} for i in range(8)]; "
            "print(summarize_eval(rows, 'accuracy')['cluster-ari'], 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
