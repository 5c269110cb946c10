"""Adaptor initialisation (``adaptor_init``) and the preconditioned factor gradients
(``precondition``), each checked against an independent computation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from floral_flwr.floral import Floral
from floral_flwr.tasks.models import MLP

torch.set_num_threads(2)


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, stride=2),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def _wrap(make, seed: int = 0, **kw) -> tuple[nn.Module, Floral]:
    torch.manual_seed(seed)
    base = make()
    plain = copy.deepcopy(base)
    return plain, Floral(base, num_adaptors=4, rank=2, mixture_noise=0.0, **kw)


def _biases(fm: Floral) -> dict[str, torch.Tensor]:
    return {n: a.bank("bias").detach() for n, a in fm.adaptor_modules().items() if a.bank("bias") is not None}


# ------------------------------------------------------------------------------- adaptor_init


@pytest.mark.parametrize("make, x", [(lambda: MLP(12, 7, 3), torch.rand(5, 12)),
                                     (_conv_net, torch.rand(2, 3, 4, 4))])
def test_centered_init_keeps_the_output_at_the_uniform_mixture_and_separates_adaptors(make, x):
    plain, fm = _wrap(make, adaptor_init="centered")
    fm.eval()
    assert torch.allclose(fm(x), plain(x), atol=1e-5)  # uniform mixture: nothing changes
    biases = _biases(fm)
    assert len(biases) == len(fm.adaptor_modules())
    for name, b in biases.items():
        assert torch.allclose(b.sum(0), torch.zeros_like(b[0]), atol=1e-6), name
        # every pair of adaptors differs (the C adaptors are distinct functions from the start)
        gaps = [float((b[i] - b[j]).abs().max()) for i in range(4) for j in range(i + 1, 4)]
        assert min(gaps) > 1e-3, name
    # away from the uniform mixture the adaptors act: a one-hot mixture changes the output
    fm.set_oracle(2)
    assert float((fm(x) - plain(x)).detach().abs().max()) > 1e-3


def test_centered_init_bias_follows_the_official_bound_before_centering():
    # the draw is U(-1/sqrt(r), 1/sqrt(r)) (PyTorch's Linear(r, d_out) bias init), then centred:
    # its spread over c is that of the official draw, and wrapping the same model with the
    # official init gives the un-centred draw from the same random stream
    _, off = _wrap(lambda: MLP(12, 7, 3), adaptor_init="official")
    _, cen = _wrap(lambda: MLP(12, 7, 3), adaptor_init="centered")
    for (name, b_off), b_cen in zip(_biases(off).items(), _biases(cen).values()):
        r = off.adaptor_modules()[name].rank
        assert float(b_off.abs().max()) <= 1.0 / math.sqrt(r)
        assert float(b_off.abs().max()) > 0.5 / math.sqrt(r)  # a real draw, not zeros
        assert torch.allclose(b_cen, b_off - b_off.mean(0, keepdim=True), atol=1e-6)


def test_official_init_moves_the_model_by_the_mean_bias():
    torch.manual_seed(3)
    lin = nn.Linear(6, 4)
    plain = copy.deepcopy(lin)
    fm = Floral(lin, num_adaptors=3, rank=1, mixture_noise=0.0, adaptor_init="official").eval()
    x = torch.rand(5, 6)
    b = fm.adaptor_modules()[""].bank("bias").detach()
    assert float(b.abs().min()) > 0 and float((b - b.mean(0)).abs().max()) > 1e-3
    assert torch.allclose(fm(x), plain(x) + b.mean(0), atol=1e-6)


def test_zero_init_is_the_wrapped_model_and_gives_the_mixture_no_gradient():
    plain, fm = _wrap(lambda: MLP(12, 7, 3), adaptor_init="zero")
    x, y = torch.rand(9, 12), torch.randint(0, 3, (9,))
    fm.train()
    assert torch.allclose(fm(x), plain(x), atol=1e-6)
    nn.functional.cross_entropy(fm(x), y).backward()
    assert float(fm.mixture.logits.grad.abs().max()) == 0.0  # identical adaptors: no signal


def test_centered_init_gives_the_mixture_a_gradient_at_the_first_step():
    """The mechanism: with distinct adaptors, d loss / d theta_c = p_c <delta_c - mean delta, g>
    is non-zero from the first step (computed here independently from the per-adaptor outputs)."""
    torch.manual_seed(1)
    lin = nn.Linear(6, 4)
    fm = Floral(lin, num_adaptors=3, rank=1, mixture_noise=0.0, adaptor_init="centered")
    x, y = torch.rand(8, 6), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(fm(x), y).backward()
    got = fm.mixture.logits.grad.clone()
    # independent: logits = base(x) + sum_c p_c b_c (B = 0 at init), p = softmax(theta)
    with torch.no_grad():
        base = x @ lin.parametrizations.weight.original.T + lin.parametrizations.bias.original
    b = fm.adaptor_modules()[""].bank("bias").detach()
    theta = torch.zeros(3, requires_grad=True)
    out = base + torch.softmax(theta, 0) @ b
    nn.functional.cross_entropy(out, y).backward()
    assert float(got.abs().max()) > 1e-4
    assert torch.allclose(got, theta.grad, atol=1e-6)


def test_adaptor_init_is_validated():
    with pytest.raises(ValueError, match="adaptor_init='random'.*allowed"):
        Floral(MLP(4, 3, 2), adaptor_init="random")


# ------------------------------------------------------------------------------- precondition


def _grads(fm: Floral, x: torch.Tensor) -> dict[str, torch.Tensor]:
    fm.zero_grad(set_to_none=True)
    fm(x).pow(2).sum().backward()
    return {k: p.grad.clone() for k, p in fm.named_parameters() if p.grad is not None}


def _randomize_out(fm: Floral, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in fm.adaptor_modules().values():
            out = a.bank("out")
            out.copy_(torch.randn(out.shape, generator=g) * 0.3)


def test_linear_preconditioner_matches_the_scaled_gd_formula():
    _, raw = _wrap(lambda: MLP(12, 7, 3), seed=4, adaptor_init="centered")
    _, pre = _wrap(lambda: MLP(12, 7, 3), seed=4, adaptor_init="centered", precondition=True,
                   precond_eps=1e-3)
    _randomize_out(raw, 5)
    _randomize_out(pre, 5)
    x = torch.rand(6, 12)
    g_raw, g_pre = _grads(raw, x), _grads(pre, x)
    checked = 0
    for name, ad in pre.adaptor_modules().items():
        (_, a), (_, b) = ad.state_items()[:2]  # (C, r, d_in), (C, d_out, r)
        key = f"model.{name}.parametrizations.weight.0.adaptor."
        ga = g_raw[key + "in"].view(a.shape)
        gb = g_raw[key + "out"].view(b.shape[1], 4, -1).transpose(0, 1)
        for c in range(4):
            eye = torch.eye(a.shape[1])
            want_a = torch.linalg.inv(b[c].T @ b[c] + 1e-3 * eye) @ ga[c]
            want_b = gb[c] @ torch.linalg.inv(a[c] @ a[c].T + 1e-3 * eye)
            got_a = g_pre[key + "in"].view(a.shape)[c]
            got_b = g_pre[key + "out"].view(b.shape[1], 4, -1).transpose(0, 1)[c]
            assert torch.allclose(got_a, want_a, rtol=1e-4, atol=1e-5)
            assert torch.allclose(got_b, want_b, rtol=1e-4, atol=1e-5)
            checked += 1
        # biases and the mixture are untouched
        assert torch.allclose(g_pre[key + "bias"], g_raw[key + "bias"])
    assert checked == 8
    assert torch.allclose(g_pre["mixture.logits"], g_raw["mixture.logits"])


def test_conv_preconditioner_divides_by_the_gram_norm_of_the_other_factor():
    _, raw = _wrap(_conv_net, seed=6)
    _, pre = _wrap(_conv_net, seed=6, precondition=True)
    _randomize_out(raw, 7)
    _randomize_out(pre, 7)
    x = torch.rand(2, 3, 4, 4)
    g_raw, g_pre = _grads(raw, x), _grads(pre, x)
    # official einsums per adaptor, on the layer weights: out "ma...,mb...->ab...", in "an...,bn...->ab..."
    for name in ("0", "2"):
        ad = pre.adaptor_modules()[name]
        a, b = ad.bank("in").detach(), ad.bank("out").detach()
        key = f"model.{name}.parametrizations.weight.0.adaptor."
        for c in range(4):
            n_out = torch.linalg.norm(torch.einsum("ma...,mb...->ab...", b[c], b[c]))
            n_in = torch.linalg.norm(torch.einsum("an...,bn...->ab...", a[c], a[c]))
            assert torch.allclose(g_pre[key + "in"][c], g_raw[key + "in"][c] / (n_out + 1e-5), rtol=1e-4, atol=1e-7)
            assert torch.allclose(g_pre[key + "out"][c], g_raw[key + "out"][c] / (n_in + 1e-5), rtol=1e-4, atol=1e-7)
    # the linear layer of the same model gets the matrix preconditioner, not the identity
    key = "model.4.parametrizations.weight.0.adaptor.in"
    assert not torch.allclose(g_pre[key], g_raw[key])


def test_without_precondition_gradients_are_plain():
    _, a = _wrap(lambda: MLP(12, 7, 3), seed=8)
    _, b = _wrap(lambda: MLP(12, 7, 3), seed=8, precondition=False)
    _randomize_out(a, 1)
    _randomize_out(b, 1)
    x = torch.rand(4, 12)
    ga, gb = _grads(a, x), _grads(b, x)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


# ------------------------------------------------------------------------------- run-config plumbing


def _handle(**run_config):
    from floral_flwr.config import parse_run_config
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import task_info

    cfg = parse_run_config({"task": "digits-label-shift", **run_config})
    return build_handle(cfg, task_info(cfg.task).build_model)


def test_the_default_run_config_starts_floral_with_distinct_centred_adaptors():
    fm = _handle(method="floral").floral
    for name, b in _biases(fm).items():
        assert torch.allclose(b.sum(0), torch.zeros_like(b[0]), atol=1e-6), name
        assert float((b[0] - b[1]).abs().max()) > 1e-3, name
    zero = _handle(method="floral", **{"adaptor-init": "zero"}).floral
    assert all(float(b.abs().max()) == 0.0 for b in _biases(zero).values())
    pre = _handle(method="floral", precondition=True).floral
    assert pre.precondition and pre._precond_handles


def test_feddpa_keeps_zero_started_adaptors_under_the_default_init():
    h = _handle(method="feddpa")
    assert all(float(b.abs().max()) == 0.0 for b in _biases(h.fm).values())
