"""Each baseline's defining mechanism, against an independent computation, so that removing it
makes a test fail (each test names the mutation it was checked against):

- Ensemble: the output is sum_c p_c f_c(x) with the private p (not an unweighted mean);
- FedEM: the prediction and the E-step use the private pi;
- FedDPA: the local phase trains the local adaptor only (base and global adaptor frozen, the
  global branch in the forward); weight decay never shrinks the frozen local adaptor; the
  dynamic weight's cap (``feddpa-capped``);
- Ditto: the personal step carries the proximal term lambda (v - w_t);
- the CIFAR-100 preset's server Adam(0.001) reaches the strategy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from floral_flwr.config import parse_run_config
from floral_flwr.methods import build_handle

torch.set_num_threads(1)


def _handle(method: str, build_model=lambda: nn.Linear(3, 2), **kw):
    cfg = parse_run_config({"task": "synthetic-linear", "method": method, "num-adaptors": 2, **kw})
    return cfg, build_handle(cfg, build_model)


# ------------------------------------------------------------------ Ensemble


def test_ensemble_output_is_the_p_weighted_sum_of_the_models():
    # mutation checked: ``y = m(x)`` instead of ``p[c] * m(x)`` (p ignored) -> fails
    _, h = _handle("ensemble")
    logits = torch.tensor([1.5, -0.5])
    with torch.no_grad():
        h.module.mixture.logits.copy_(logits)
    h.module.eval()
    x = torch.randn(5, 3)
    p = torch.exp(logits) / torch.exp(logits).sum()  # softmax by hand (temperature 1, no floor)
    with torch.no_grad():
        expected = p[0] * h.module.models[0](x) + p[1] * h.module.models[1](x)
        got = h.module(x)
    torch.testing.assert_close(got, expected)
    assert h.mixture() == pytest.approx(p.tolist())
    # and the mean of the two is not the answer (the test can tell p from uniform)
    assert not torch.allclose(got, 0.5 * (h.module.models[0](x) + h.module.models[1](x)).detach())


# ------------------------------------------------------------------ FedEM


def _fedem_two_constant_classifiers():
    """Component 0 always predicts class 0 with prob 0.8, component 1 class 1 with prob 0.9."""
    _, h = _handle("fedem")
    with torch.no_grad():
        for m, probs in zip(h.module.models, ([0.8, 0.2], [0.1, 0.9])):
            m.weight.zero_()
            m.bias.copy_(torch.log(torch.tensor(probs)))
    return h


def test_fedem_prediction_is_the_pi_mixture_of_the_component_likelihoods():
    # mutation checked: forward with uniform weights instead of pi -> fails
    h = _fedem_two_constant_classifiers()
    h.module.pi.copy_(torch.tensor([0.25, 0.75]))
    x = torch.randn(4, 3)
    expected = np.log([0.25 * 0.8 + 0.75 * 0.1, 0.25 * 0.2 + 0.75 * 0.9])
    with torch.no_grad():
        got = h.module(x)
    np.testing.assert_allclose(got.numpy(), np.tile(expected, (4, 1)), rtol=1e-5)


def test_fedem_e_step_uses_the_previous_pi():
    # mutation checked: ``logq = -losses`` (pi dropped from the E-step) -> fails
    h = _fedem_two_constant_classifiers()
    pi = np.array([0.2, 0.8])
    h.module.pi.copy_(torch.tensor(pi, dtype=torch.float32))
    x = torch.zeros(2, 3)
    y = torch.tensor([0, 1])
    q = h.e_step(x, y, nn.CrossEntropyLoss()).numpy()
    lik = np.array([[0.8, 0.1], [0.2, 0.9]])  # p_m(y_i | x_i): rows = samples, cols = components
    expected_q = pi * lik / (pi * lik).sum(1, keepdims=True)
    np.testing.assert_allclose(q, expected_q, rtol=1e-5)
    np.testing.assert_allclose(h.module.pi.numpy(), expected_q.mean(0), rtol=1e-5)


# ------------------------------------------------------------------ FedDPA

def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _feddpa(method: str = "feddpa", **kw):
    cfg, h = _handle(method, build_model=_mlp, rank=2, **kw)
    torch.manual_seed(3)
    with torch.no_grad():  # both adaptors away from zero, so every branch has a gradient
        for k, p in h.fm.named_parameters():
            if ".adaptor." in k:
                p.copy_(0.3 * torch.randn_like(p))
    return cfg, h


def _slot_masks(fm: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Adaptor parameter name -> [mask of slot 0, mask of slot 1], found through the public
    state API only: fill every adaptor parameter with unique ids, read the wire tensors (adaptor
    index first) and see which ids land in which slot."""
    named = {k: p for k, p in fm.named_parameters() if ".adaptor." in k}
    saved = {k: p.detach().clone() for k, p in named.items()}
    starts, total = {}, 0
    with torch.no_grad():
        for k, p in named.items():
            starts[k] = total
            p.copy_(torch.arange(total, total + p.numel(), dtype=p.dtype).reshape(p.shape))
            total += p.numel()
        slot_of = torch.full((total,), -1, dtype=torch.long)
        for key, v in fm.shared_state_dict().items():
            if key.startswith("adaptor."):
                for c in range(v.shape[0]):
                    slot_of[v[c].reshape(-1).long()] = c
        for k, p in named.items():
            p.copy_(saved[k])
    assert int(slot_of.min()) == 0  # every element belongs to a slot
    return {k: [(slot_of[starts[k]:starts[k] + p.numel()] == c).reshape(p.shape) for c in (0, 1)]
            for k, p in named.items()}


def _full_batch_gd(fm: nn.Module, x, y, loss_fn, steps: int, lr: float, trains) -> None:
    """Independent reference: ``steps`` full-batch gradient steps; ``trains(name)`` -> the mask
    of that parameter that may move (None: frozen)."""
    params = {k: p for k, p in fm.named_parameters() if p.requires_grad}
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(fm(x), y), list(params.values()), allow_unused=True)
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                mask = trains(k)
                if mask is None or g is None:
                    continue
                p -= lr * g * mask


def test_feddpa_local_phase_trains_the_local_adaptor_only():
    # mutations checked: local phase with every parameter (``_local_groups`` returning all
    # parameters, no slot mask) -> fails; the slot mask on ``param[c]`` instead of the adaptor
    # slot (the code before this test: a linear layer's ``out`` is (d_out, C*r)) -> fails; a
    # local phase without the global branch (p = [0, 1] instead of [1 - a, a]) -> fails
    cfg, h = _feddpa()
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loss = nn.CrossEntropyLoss()
    ref = copy.deepcopy(h.fm)
    masks = _slot_masks(ref)
    mix = ref.mixture.logits
    lr, steps = 0.5, 3
    with torch.no_grad():
        mix.copy_(torch.log(torch.tensor([0.5, 0.5])))  # p = [1 - a, a], a = 0.5
    _full_batch_gd(ref, x, y, loss, steps, lr, lambda k: masks[k][1] if k in masks else None)
    with torch.no_grad():
        mix.copy_(torch.tensor([0.0, -1e4]))  # p = [1, 0]: global phase, base + global slot
    _full_batch_gd(ref, x, y, loss, steps, lr, lambda k: masks[k][0] if k in masks else 1.0)
    h.train_round(x, y, loss, epochs=steps, batch_size=16, lr=lr, mixture_lr=0.0)
    for (k, p), (_, q) in zip(h.fm.named_parameters(), ref.named_parameters()):
        if "mixture" not in k:
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=k)


def test_feddpa_weight_decay_never_shrinks_the_frozen_local_adaptor():
    # mutation checked: the adaptor group with the optimizer's weight decay (the code before
    # this test) -> the local slot shrinks in the global phase -> fails
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    finals = {}
    for wd in (0.0, 0.3):
        _, h = _feddpa()
        h.train_round(x, y, nn.CrossEntropyLoss(), epochs=2, batch_size=8, lr=0.2, mixture_lr=0.0,
                      momentum=0.9, weight_decay=wd)
        finals[wd] = {k: v.clone() for k, v in h.fm.shared_state_dict().items() if k.startswith("adaptor.")}
    for k in finals[0.0]:
        torch.testing.assert_close(finals[0.3][k][1], finals[0.0][k][1], msg=k)  # local: no decay
    # the global adaptor is decayed (the key is not a no-op)
    assert any(not torch.allclose(finals[0.3][k][0], finals[0.0][k][0]) for k in finals[0.0])


def test_feddpa_capped_halves_the_dynamic_weight():
    # mutation checked: the cap not applied (``s = (e @ r.T)...`` without ``max_weight``) -> fails
    x = torch.randn(12, 3)
    outs = {}
    for method in ("feddpa", "feddpa-capped"):
        cfg, h = _feddpa(method)
        h.prepare_eval(x, torch.zeros(12, dtype=torch.long), nn.CrossEntropyLoss(), cfg)
        h.module.eval()
        with torch.no_grad():
            out = h.module(x)
            e = nn.functional.normalize(h.module.embed(x), dim=1)
            r = nn.functional.normalize(h.module.embed(h.module.refs), dim=1)
            s = (e @ r.T).mean(1).clamp(0, 1)
            w = (h.module.max_weight * s * 20).round() / 20
            expected = torch.empty_like(out)
            for i in range(12):  # by hand, one input at a time: p = [1 - w, w]
                h.module.set_p(1 - float(w[i]), float(w[i]))
                expected[i] = h.fm(x[i:i + 1])[0]
        torch.testing.assert_close(out, expected)
        outs[method] = (s, w)
    s, w = outs["feddpa-capped"]
    torch.testing.assert_close(w, (0.5 * s * 20).round() / 20)
    assert float(w.max()) <= 0.5
    assert float(outs["feddpa"][1].max()) > 0.5  # uncapped: the similarity itself


# ------------------------------------------------------------------ Ditto


def test_ditto_personal_step_has_the_proximal_term():
    # mutation checked: the personal objective without ``proximal_term(...)`` -> fails
    lam, lr = 2.0, 0.1
    _, h = _handle("ditto", build_model=lambda: nn.Linear(2, 1), **{"ditto-lambda": lam})
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    with torch.no_grad():
        h.module.global_model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        h.module.global_model.bias.fill_(0.5)
    v0 = {"personal.weight": torch.tensor([[-2.0, 3.0]]), "personal.bias": torch.tensor([1.0])}
    h.load_private_state_dict(v0)
    w0 = h.module.global_model.state_dict()
    # one full-batch personal step by hand: v1 = v0 - lr (grad F(v0) + lam (v0 - w0))
    W, b = v0["personal.weight"].clone().requires_grad_(), v0["personal.bias"].clone().requires_grad_()
    loss = ((x @ W.T + b - y) ** 2).mean()
    gW, gb = torch.autograd.grad(loss, [W, b])
    expected_W = v0["personal.weight"] - lr * (gW + lam * (v0["personal.weight"] - w0["weight"]))
    expected_b = v0["personal.bias"] - lr * (gb + lam * (v0["personal.bias"] - w0["bias"]))
    h.train_round(x, y, nn.MSELoss(), epochs=1, batch_size=8, lr=lr, mixture_lr=0.0)
    torch.testing.assert_close(h.module.personal.weight.detach(), expected_W)
    torch.testing.assert_close(h.module.personal.bias.detach(), expected_b)


# ------------------------------------------------------------------ CIFAR-100 server optimizer


def test_cifar100_preset_applies_the_papers_server_adam():
    # mutation checked: ``server-optimizer`` default back to "fedavg" (the preset's
    # extra_defaults unread) -> fails
    from flwr.serverapp.strategy import FedAdam

    from floral_flwr.strategy.optimizers import build_strategy

    cfg = parse_run_config({"task": "cifar100"})
    assert (cfg.server_optimizer, cfg.server_lr) == ("fedadam", 0.001)
    strategy = build_strategy(cfg.server_optimizer, num_adaptors=cfg.num_adaptors, metric="accuracy",
                              seed=0, eval_every=1, num_rounds=1, fraction_train=0.1,
                              fraction_evaluate=0.1, min_available_nodes=1, node_wait_timeout=1.0,
                              server_lr=cfg.server_lr, client_lr=cfg.lr)
    assert isinstance(strategy, FedAdam) and strategy.eta == pytest.approx(0.001)
    # an explicit value wins; another optimizer does not inherit Adam's lr; IFCA cannot take
    # a stateful optimizer, so its "auto" is plain replacement; other tasks keep FedAvg
    assert parse_run_config({"task": "cifar100", "server-lr": 0.01}).server_lr == 0.01
    c = parse_run_config({"task": "cifar100", "server-optimizer": "fedavgm"})
    assert (c.server_optimizer, c.server_lr) == ("fedavgm", 1.0)
    c = parse_run_config({"task": "cifar100", "method": "ifca"})
    assert (c.server_optimizer, c.server_lr) == ("fedavg", 1.0)
    for task in ("cifar10-rotate", "digits-rotate", "fmnist-label-shift"):
        c = parse_run_config({"task": task})
        assert (c.server_optimizer, c.server_lr) == ("fedavg", 1.0), task
