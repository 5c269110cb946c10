"""Tests of the embedded tasks (digits, synthetic) and the common task API (contracts.md §3)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from floral_flwr.tasks import RUN_CONFIG_KEYS, TASK_NAMES, get_task
from floral_flwr.tasks.digits import load_digits_arrays

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = [n for n in TASK_NAMES if n.startswith(("digits", "synthetic"))]


def _one_sgd_step(task, cid=0):
    torch.manual_seed(0)
    model = task.build_model()
    data = task.client_data(cid)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    bs = min(8, data.num_train)
    bs = max(bs, 2)  # BatchNorm needs > 1 sample
    x, y = data.train_x[:bs], data.train_y[:bs]
    before = [p.detach().clone() for p in model.parameters()]
    loss = task.loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        out = model(data.test_x)
    assert out.shape[0] == data.num_test
    return float(loss.detach())


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_task_builds_and_trains(name):
    task = get_task(name, num_clients=None, seed=0)
    assert task.name == name
    assert set(RUN_CONFIG_KEYS) <= set(task.defaults)
    assert task.defaults["num-adaptors"] == task.num_clusters
    assert task.metric in ("accuracy", "mse")
    d = task.client_data(0)
    assert d.train_x.dtype == torch.float32
    if task.metric == "accuracy":
        assert d.train_y.dtype == torch.int64
    else:
        assert d.train_y.dtype == torch.float32
    _one_sgd_step(task)
    # cached: same object back, and the task itself is cached
    assert task.client_data(0) is d
    assert get_task(name, num_clients=None, seed=0) is task


def test_synthetic_sizes_match_paper():
    lin = get_task("synthetic-linear", num_clients=10, seed=0)
    assert sum(p.numel() for p in lin.build_model().parameters()) == 33
    assert lin.samples_per_client == 8
    d = lin.client_data(0)
    assert (d.num_train, d.num_test) == (7, 1)
    assert d.train_y.shape == (7, 3)
    mlp = get_task("synthetic-mlp", num_clients=20, seed=0)
    assert sum(p.numel() for p in mlp.build_model().parameters()) == 241
    d = mlp.client_data(0)
    assert (d.num_train, d.num_test) == (96, 24)
    assert d.train_y.shape == (96, 1)
    assert lin.defaults["num-clients"] == 10 and lin.num_clusters == 2
    assert mlp.defaults["num-clients"] == 20 and mlp.num_clusters == 4
    assert [mlp.cluster_of(k) for k in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def _norm_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def test_synthetic_generator_moments():
    # parameters: W ~ N(0, 1/d) on a large d
    big = get_task("synthetic-mlp", num_clients=4, seed=3, dim=200)
    W = big.params["W"]
    assert abs(float(W.mean())) < 0.01
    assert abs(float(W.std()) * math.sqrt(200) - 1) < 0.03
    # linear: y = x W_k[:, :3] + b[:3], x ~ N(0, I)
    t = get_task("synthetic-linear", num_clients=2, seed=1, samples_per_client=40000)
    for k in range(2):
        d = t.client_data(k)
        x = torch.cat([d.train_x, d.test_x])
        y = torch.cat([d.train_y, d.test_y])
        assert torch.allclose(x.mean(0), torch.zeros(10), atol=0.03)
        assert torch.allclose(torch.cov(x.T), torch.eye(10), atol=0.04)
        Wk = t.client_weights(k)
        assert torch.allclose(Wk, t.params["W"] + 2.0 * t.params["U"][k] @ t.params["V"][k])
        assert torch.allclose(y, x @ Wk[:, :3] + t.params["b"][:3], atol=1e-5)  # noise 0
        assert torch.allclose(y.mean(0), t.params["b"][:3], atol=0.05)
        cov = (Wk.T @ Wk)[:3, :3]
        assert torch.allclose(torch.cov(y.T), cov, atol=0.05 * float(cov.abs().max()) + 0.02)
    # the two clusters really differ
    assert not torch.allclose(t.client_weights(0), t.client_weights(1))
    # mlp: E[y] = sum_j W_out[j] E[ReLU(h_j)], h_j ~ N(b_j, ||W_k[:, j]||^2)
    m = get_task("synthetic-mlp", num_clients=4, seed=2, samples_per_client=60000)
    for k in (0, 3):
        d = m.client_data(k)
        y = torch.cat([d.train_y, d.test_y])[:, 0]
        Wk, b, Wo = m.client_weights(k), m.params["b"], m.params["W_out"][:, 0]
        s = Wk.norm(dim=0)
        z = b / s
        er = b * _norm_cdf(z) + s * torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        expected = float((er * Wo).sum())
        assert abs(float(y.mean()) - expected) < 4 * float(y.std()) / math.sqrt(len(y)) + 1e-3


def test_synthetic_simple_and_bn_variants():
    s = get_task("synthetic-linear-simple", num_clients=4, seed=0)
    assert torch.equal(s.params["W"], torch.eye(10))
    assert torch.equal(s.params["b"], torch.zeros(10))
    W1 = s.client_weights(1)
    expected = torch.eye(10)
    expected[1, 1] = 3.0
    assert torch.equal(W1, expected)
    d = s.client_data(1)
    assert torch.allclose(d.train_y, (d.train_x @ expected)[:, :3])
    bn = get_task("synthetic-mlp-bn", num_clients=4, seed=0)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in bn.build_model().modules())
    assert bn.defaults["batch-size"] == 5 and bn.defaults["adapt-norm"] is True
    # targets: per-client normalized ReLU features times W_out
    d = bn.client_data(2)
    x = torch.cat([d.train_x, d.test_x])
    y = torch.cat([d.train_y, d.test_y])
    a = torch.relu(x @ bn.client_weights(2) + bn.params["b"])
    z = (a - a.mean(0)) / a.std(0)
    assert torch.allclose(y, z @ bn.params["W_out"], atol=1e-4)


def test_synthetic_matches_official_draw_order():
    """Re-implementation of the official SyntheticDataset draws (K divisible by C)."""
    K, C, d, r, seed = 20, 4, 10, 1, 5
    t = get_task("synthetic-mlp", num_clients=K, seed=seed)
    n = t.samples_per_client
    g = torch.Generator().manual_seed(seed + 27)
    W = torch.randn(1, d, d, generator=g) / d ** 0.5
    us = torch.randn(C, d, r, generator=g) / d ** 0.5
    vs = torch.randn(C, r, d, generator=g) / r ** 0.5
    b = torch.randn(1, 1, d, generator=g) / d ** 0.5
    W_out = torch.randn(1, d, 1, generator=g) / d ** 0.5
    Ws = W.add(2.0 * us.matmul(vs).repeat(K // C, 1, 1))
    g = torch.Generator().manual_seed(seed + 11)
    xs = torch.randn(K, n, d, generator=g)
    ys = torch.relu(xs.matmul(Ws).add(b)).matmul(W_out)
    for k in (0, 7, 19):
        dk = t.client_data(k)
        got_x = torch.cat([dk.train_x, dk.test_x])
        got_y = torch.cat([dk.train_y, dk.test_y])
        order = torch.argsort(got_x[:, 0])
        ref_order = torch.argsort(xs[k][:, 0])
        assert torch.equal(got_x[order], xs[k][ref_order])
        assert torch.allclose(got_y[order], ys[k][ref_order], atol=1e-6)


def test_digits_partition_uses_every_sample_once():
    from sklearn.datasets import load_digits

    x, y = load_digits_arrays()
    assert x.shape == (1797, 8, 8) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    ref = load_digits()
    assert np.array_equal(x, ref.images.astype(np.float32) / 16.0)
    assert np.array_equal(y, ref.target)
    t = get_task("digits-label-shift", num_clients=7, seed=5)
    allidx = np.concatenate(t.train_idx + t.test_idx)
    assert len(allidx) == 1797 and len(np.unique(allidx)) == 1797
    sizes = [len(a) + len(b) for a, b in zip(t.train_idx, t.test_idx)]
    assert max(sizes) - min(sizes) <= 1
    for a, b in zip(t.train_idx, t.test_idx):
        assert len(b) == round(0.2 * (len(a) + len(b)))
    # clusters balanced: client k -> k mod C
    assert t.clusters == [k % 4 for k in range(7)]
    t20 = get_task("digits-rotate", num_clients=20, seed=0)
    counts = np.bincount(t20.clusters, minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]


def test_digits_rotation_really_rotates():
    x, y = load_digits_arrays()
    t = get_task("digits-rotate", num_clients=8, seed=0)
    assert t.angles == (0.0, 90.0, 180.0, 270.0)
    for cid in range(8):
        c = t.cluster_of(cid)
        d = t.client_data(cid)
        raw = x[t.train_idx[cid]]
        exp = np.rot90(raw, k=c, axes=(1, 2))
        assert np.array_equal(d.train_x[:, 0].numpy(), exp)
        assert np.array_equal(d.train_y.numpy(), y[t.train_idx[cid]])
        assert np.array_equal(d.test_x[:, 0].numpy(), np.rot90(x[t.test_idx[cid]], k=c, axes=(1, 2)))
    # one sample against np.rot90 directly (counter-clockwise 90 degrees)
    d1 = t.client_data(1)
    img = x[t.train_idx[1][0]]
    assert np.array_equal(d1.train_x[0, 0].numpy(), np.rot90(img))


def test_digits_custom_angles_and_label_shift_mapping():
    x, y = load_digits_arrays()
    t = get_task("digits-rotate", num_clients=4, seed=0, angles=[0, 180, 90, 270])
    d = t.client_data(1)
    assert np.array_equal(d.train_x[:, 0].numpy(), np.rot90(x[t.train_idx[1]], 2, axes=(1, 2)))
    ls = get_task("digits-label-shift", num_clients=8, seed=0)
    for cid in range(8):
        c = ls.cluster_of(cid)
        d = ls.client_data(cid)
        assert np.array_equal(d.train_y.numpy(), (y[ls.train_idx[cid]] + c) % 10)
        assert np.array_equal(d.test_y.numpy(), (y[ls.test_idx[cid]] + c) % 10)
        assert np.array_equal(d.train_x[:, 0].numpy(), x[ls.train_idx[cid]])  # no rotation


def test_digits_reduced_keeps_a_seeded_subset_of_the_same_train_rows_and_all_test_rows():
    x, y = load_digits_arrays()
    for base in ("digits-rotate", "digits-label-shift"):
        full = get_task(base, num_clients=20, seed=3)
        red = get_task(base + "-reduced", num_clients=20, seed=3)
        for cid in range(20):
            n_full = len(full.train_idx[cid])
            # 5 % of ~72 rows is 4, below the minimum of 10
            assert len(red.train_idx[cid]) == max(10, round(0.05 * n_full)) == 10
            assert set(red.train_idx[cid]) <= set(full.train_idx[cid])
            assert np.array_equal(red.test_idx[cid], full.test_idx[cid])
            d, c = red.client_data(cid), red.cluster_of(cid)
            assert d.num_train == 10 and d.num_test == len(full.test_idx[cid])
            if base == "digits-rotate":
                exp = np.rot90(x[red.train_idx[cid]], k=c, axes=(1, 2))
                assert np.array_equal(d.train_x[:, 0].numpy(), exp)
            else:
                assert np.array_equal(d.train_y.numpy(), (y[red.train_idx[cid]] + c) % 10)
        assert red.clusters == full.clusters
        assert red.defaults == {**full.defaults, "num-server-rounds": 10 * full.defaults["num-server-rounds"]}
    # a larger fraction wins over the minimum; seeds change the subset
    big = get_task("digits-rotate-reduced", num_clients=20, seed=3, reduced_fraction=0.5)
    assert all(len(i) == round(0.5 * len(f)) for i, f in
               zip(big.train_idx, get_task("digits-rotate", num_clients=20, seed=3).train_idx))
    other = get_task("digits-rotate-reduced", num_clients=20, seed=4)
    assert not np.array_equal(other.train_idx[0], get_task("digits-rotate-reduced", num_clients=20,
                                                            seed=3).train_idx[0])
    with pytest.raises(ValueError, match="reduced_fraction"):
        get_task("digits-rotate-reduced", num_clients=20, reduced_fraction=1.5)
    with pytest.raises(ValueError, match="reduced_fraction"):  # only the -reduced tasks take it
        get_task("digits-rotate", num_clients=20, reduced_fraction=0.5)


_DET_SCRIPT = """
import json, sys
from floral_flwr.tasks import get_task
out = {}
for name in ("digits-rotate", "synthetic-mlp"):
    t = get_task(name, num_clients=6, seed=11)
    d = t.client_data(4)
    out[name] = [float(d.train_x.sum()), float(d.train_y.float().sum()),
                 float(d.test_x.sum()), d.num_train, d.num_test]
print(json.dumps(out))
"""


def test_same_seed_same_partition_in_separate_processes():
    r = subprocess.run([sys.executable, "-c", _DET_SCRIPT], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = [json.loads(r.stdout.strip().splitlines()[-1])]
    here = {}
    for name in ("digits-rotate", "synthetic-mlp"):
        d = get_task(name, num_clients=6, seed=11).client_data(4)
        here[name] = [float(d.train_x.sum()), float(d.train_y.float().sum()),
                      float(d.test_x.sum()), d.num_train, d.num_test]
    assert json.loads(json.dumps(here)) == res[0]
    # a different seed gives a different partition
    a = get_task("digits-rotate", num_clients=6, seed=11)
    b = get_task("digits-rotate", num_clients=6, seed=12)
    assert not np.array_equal(a.train_idx[0], b.train_idx[0])


@pytest.mark.parametrize("call, words", [
    (lambda: get_task("nope"), ["task", "digits-rotate", "synthetic-linear"]),
    (lambda: get_task("digits-rotate", num_clients=0), ["num_clients", ">= 1"]),
    (lambda: get_task("digits-rotate", num_clients=1798), ["num_clients", "1797"]),
    (lambda: get_task("synthetic-mlp", num_clients=-3), ["num_clients"]),
    (lambda: get_task("digits-rotate", num_clients=3), ["num_clusters", "C=4", "num_clients=3"]),
    (lambda: get_task("synthetic-mlp", num_clients=3), ["num_clusters", "C=4"]),
    (lambda: get_task("digits-rotate", num_clients=8, angles=[0, 90]), ["angles", "2", "4"]),
    (lambda: get_task("digits-rotate", num_clients=8, **{"num-clusters": 2}, angles=[0, 90, 180]),
     ["angles", "3", "num_clusters is 2"]),
    (lambda: get_task("digits-label-shift", num_clients=20, num_clusters=11), ["num_clusters", "10"]),
    (lambda: get_task("digits-rotate", num_clients=8, bogus=1), ["bogus", "allowed options"]),
    (lambda: get_task("digits-rotate", num_clients=8).client_data(8), ["cid", "0..7"]),
    (lambda: get_task("digits-rotate", num_clients=8).client_data(-1), ["cid", "0..7"]),
    (lambda: get_task("synthetic-linear", num_clients=4).cluster_of(4), ["cid", "0..3"]),
    (lambda: get_task("digits-rotate", num_clients=8, data_path="/tmp/x"), ["data_path"]),
])
def test_bad_input_raises_clear_error(call, words):
    with pytest.raises(ValueError) as ei:
        call()
    msg = str(ei.value)
    for w in words:
        assert w in msg, (w, msg)


def test_run_config_spelling_of_options():
    a = get_task("digits-rotate", num_clients=8, seed=0, **{"num-clusters": 2})
    b = get_task("digits-rotate", num_clients=8, seed=0, num_clusters=2)
    assert a is b and a.num_clusters == 2 and a.angles == (0.0, 180.0)


def test_non_right_angles_use_torchvision_rotation():
    import torchvision.transforms.functional as TF

    x, _ = load_digits_arrays()
    t = get_task("digits-rotate", num_clients=4, seed=0, angles=[0, 45, 90, -30])
    for cid, ang in ((1, 45.0), (3, -30.0)):
        d = t.client_data(cid)
        raw = torch.from_numpy(x[t.train_idx[cid]]).unsqueeze(1)
        exp = TF.rotate(raw, ang, fill=0.0)  # torchvision default (nearest), as the official code
        assert torch.allclose(d.train_x, exp, atol=1e-6)
        assert not torch.allclose(d.train_x, raw)


def test_model_parameter_counts_match_the_paper():
    from floral_flwr.tasks.models import MLP, VGG8, Cifar10CNN, SimpleNN, count_parameters, linear_model

    assert count_parameters(linear_model()) == 33
    assert count_parameters(SimpleNN()) == 241
    assert count_parameters(MLP(784, 200, 10)) == 159_010
    assert count_parameters(Cifar10CNN()) == 87_178
    assert count_parameters(VGG8()) == 1_264_388
    assert count_parameters(VGG8(norm="bn")) == 1_264_388 + 2 * (16 + 32 + 64 + 128 + 512)
    vgg = VGG8(norm="gn")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in vgg.modules())
    x = torch.randn(2, 3, 32, 32)
    assert vgg(x).shape == (2, 100) and Cifar10CNN()(x).shape == (2, 10)
    with pytest.raises(ValueError, match="norm"):
        VGG8(norm="ln")


@pytest.mark.parametrize("name", ["digits-label-shift", "digits-rotate-reduced", "synthetic-mlp"])
def test_preset_client_count_is_cached_as_that_count(name):
    """The server looks the preset up with num_clients=None, a client asks for the preset K: one
    build per process, and the same data as a fresh build with K given."""
    import floral_flwr.tasks as tasks

    preset = get_task(name, num_clients=None, seed=3)
    assert get_task(name, num_clients=preset.num_clients, seed=3) is preset
    tasks._TASKS.clear()
    fresh = get_task(name, num_clients=preset.num_clients, seed=3)
    assert fresh is not preset
    for cid in (0, preset.num_clients - 1):
        a, b = preset.client_data(cid), fresh.client_data(cid)
        assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
        assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert list(preset.clusters) == list(fresh.clusters)
