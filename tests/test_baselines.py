"""Baselines (floral_flwr/methods/*): aggregation rules against hand-worked numbers, IFCA's choice,
Ditto's personal evaluation, fixed oracle mixtures, FedEM's EM step, bad input before training."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from floral_flwr.methods.training import evaluate_local
from floral_flwr.config import ConfigError, parse_run_config
from floral_flwr.methods import METHOD_SPECS, build_handle, check_method_task
from floral_flwr.strategy.aggregate import FloralAccumulator

torch.set_num_threads(1)


def _linear() -> nn.Module:
    return nn.Linear(2, 1)


def _handle(method: str, **kw):
    cfg = parse_run_config({"task": "synthetic-linear", "method": method, "num-adaptors": 2, **kw})
    return cfg, build_handle(cfg, _linear)


def _np(sd):
    return {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}


def test_every_baseline_is_registered_with_a_paper():
    for m in ("fedavg-ft", "ensemble", "ensemble-oracle", "ifca", "fedem", "ditto", "feddpa"):
        assert m in METHOD_SPECS and METHOD_SPECS[m].description


# ------------------------------------------------------------------ aggregation, by hand


def test_ensemble_aggregates_model_c_with_p_k_given_c():
    _, h = _handle("ensemble")
    keys = list(h.shared_state_dict())
    assert all(k.startswith("adaptor.model.") for k in keys)
    assert h.shared_state_dict()["adaptor.model.weight"].shape == (2, 1, 2)  # (C, out, in)
    template = {k: np.zeros(v.shape, np.float32) for k, v in _np(h.shared_state_dict()).items()}
    # client A: n=10, p=(0.8, 0.2), all params 1; client B: n=30, p=(0.5, 0.5), all params 3
    a = {k: np.ones_like(v) for k, v in template.items()}
    b = {k: 3 * np.ones_like(v) for k, v in template.items()}
    acc = FloralAccumulator(template, 2)
    acc.add(a, 10, [8.0, 2.0])
    acc.add(b, 30, [15.0, 15.0])
    out = acc.result()
    # model 0: (8*1 + 15*3) / 23 = 53/23; model 1: (2*1 + 15*3) / 17 = 47/17
    np.testing.assert_allclose(out["adaptor.model.weight"][0], 53 / 23, rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.model.weight"][1], 47 / 17, rtol=1e-6)
    # the handle sends w_k(c) = n_k p_k(c)
    with torch.no_grad():
        h.module.mixture.logits.copy_(torch.log(torch.tensor([0.8, 0.2])))
    np.testing.assert_allclose(h.adaptor_weights(10), [8.0, 2.0], rtol=1e-5)


def test_ifca_per_cluster_mean_and_unchosen_model_kept():
    _, h = _handle("ifca")
    template = {k: np.full(v.shape, 7.0, np.float32) for k, v in _np(h.shared_state_dict()).items()}
    acc = FloralAccumulator(template, 2)
    h.module.active = 0
    acc.add({k: np.full_like(v, 1.0) for k, v in template.items()}, 10, h.adaptor_weights(10))
    acc.add({k: np.full_like(v, 4.0) for k, v in template.items()}, 20, h.adaptor_weights(20))
    out = acc.result()
    assert h.adaptor_weights(10) == [10.0, 0.0]
    np.testing.assert_allclose(out["adaptor.model.bias"][0], (10 * 1 + 20 * 4) / 30)  # = 3
    np.testing.assert_allclose(out["adaptor.model.bias"][1], 7.0)  # nobody chose model 1


def test_fedem_each_component_is_the_n_weighted_mean():
    _, h = _handle("fedem")
    h.module.pi.copy_(torch.tensor([0.9, 0.1]))  # pi does not weight the aggregate (FedEM rule)
    assert h.adaptor_weights(10) == [10.0, 10.0]
    template = {k: np.zeros(v.shape, np.float32) for k, v in _np(h.shared_state_dict()).items()}
    acc = FloralAccumulator(template, 2)
    acc.add({k: np.full_like(v, 2.0) for k, v in template.items()}, 10, h.adaptor_weights(10))
    acc.add({k: np.full_like(v, 5.0) for k, v in template.items()}, 30, h.adaptor_weights(30))
    np.testing.assert_allclose(acc.result()["adaptor.model.weight"], (10 * 2 + 30 * 5) / 40)  # 4.25


def test_ditto_fedavgft_feddpa_send_only_the_global_part_n_weighted():
    _, d = _handle("ditto")
    assert set(d.shared_state_dict()) == {"base.weight", "base.bias"} and d.num_adaptors == 0
    assert all(k.startswith("personal.") for k in d.private_state_dict())
    _, f = _handle("fedavg-ft")
    assert set(f.shared_state_dict()) == {"base.weight", "base.bias"} and not f.private_state_dict()
    _, p = _handle("feddpa")
    shared = p.shared_state_dict()
    assert p.num_adaptors == 1 and p.adaptor_weights(12) == [12.0]
    assert all(v.shape[0] == 1 for k, v in shared.items() if k.startswith("adaptor."))
    assert all(k.startswith("dpa.") for k in p.private_state_dict())
    # base n-weighted, the single global adaptor slot n-weighted too: (1*1 + 3*3) / 4 = 2.5
    template = {k: np.zeros(v.shape, np.float32) for k, v in _np(shared).items()}
    acc = FloralAccumulator(template, 1)
    acc.add({k: np.full_like(v, 1.0) for k, v in template.items()}, 1, [1.0])
    acc.add({k: np.full_like(v, 3.0) for k, v in template.items()}, 3, [3.0])
    for v in acc.result().values():
        np.testing.assert_allclose(v, 2.5)


def test_feddpa_local_adaptor_survives_a_shared_load_and_never_leaves():
    _, p = _handle("feddpa")
    priv = {k: torch.randn_like(v) for k, v in p.private_state_dict().items()}
    p.load_private_state_dict(priv)
    p.load_shared_state_dict({k: torch.zeros_like(v) for k, v in p.shared_state_dict().items()})
    for k, v in p.private_state_dict().items():
        torch.testing.assert_close(v, priv[k])
    for k, v in p.shared_state_dict().items():
        if k.startswith("adaptor."):
            assert float(v.abs().sum()) == 0.0


@pytest.mark.parametrize("frozen", [0, 1])
def test_feddpa_freezes_exactly_one_adaptor_slot_in_every_bank_layout(frozen):
    """The local phase trains slot 1 only, the global phase slot 0 only. Linear banks are stored
    as [A_1; A_2] (C*r, d_in) and [B_1 | B_2] (d_out, C*r): the mask must follow the adaptor
    index, not the parameter's first dimension (it zeroed row 1 of B, and crashed on a layer
    with one output: synthetic-mlp-bn)."""
    from floral_flwr.floral.adaptors import Adaptor
    from floral_flwr.tasks import get_task

    task = get_task("synthetic-mlp-bn", num_clients=4)
    cfg = parse_run_config({"task": "synthetic-mlp-bn", "method": "feddpa", "rank": 2})
    h = build_handle(cfg, task.build_model)
    hooks = h._mask_slot(frozen)
    x, y = task.client_data(0).train_x[:8], task.client_data(0).train_y[:8]
    h.module.fm.mixture.logits.data.zero_()  # both slots in use, so both would get gradients
    with torch.no_grad():
        for m in h.fm.modules():
            if isinstance(m, Adaptor):
                for prm in m.parameters(recurse=False):
                    prm.normal_()
    h.module.train()
    task.loss_fn(h.module(x), y).backward()
    for hk in hooks:
        hk.remove()
    banks = [m for m in h.fm.modules() if isinstance(m, Adaptor)]
    assert any(m.kind == "linear" and m.rank == 2 for m in banks)
    for m in banks:
        grads = {n: prm.grad for n, prm in m.named_parameters(recurse=False)}
        for name, view in m.state_items():  # views with the adaptor index first
            g = grads[name]
            # the same view of the gradient: re-derive it through the state_items layout
            with torch.no_grad():
                prm = dict(m.named_parameters(recurse=False))[name]
                saved = prm.detach().clone()
                prm.copy_(g)
                g_view = dict(m.state_items())[name].detach().clone()
                prm.copy_(saved)
            assert float(g_view[frozen].abs().sum()) == 0.0, (m.kind, name)
            assert float(g_view[1 - frozen].abs().sum()) > 0.0, (m.kind, name)


# ------------------------------------------------------------------ IFCA, Ditto, FedEM, oracle


def test_ifca_picks_the_model_with_the_lowest_train_loss_and_trains_only_it():
    cfg, h = _handle("ifca")
    x = torch.randn(32, 2)
    y = x @ torch.tensor([[2.0], [-1.0]]) + 0.5
    with torch.no_grad():  # model 1 is exact, model 0 is off
        h.module.models[1].weight.copy_(torch.tensor([[2.0, -1.0]]))
        h.module.models[1].bias.fill_(0.5)
        h.module.models[0].weight.zero_()
        h.module.models[0].bias.zero_()
    before0 = h.module.models[0].weight.detach().clone()
    h.train_round(x, y, nn.MSELoss(), epochs=1, batch_size=8, lr=0.1, mixture_lr=0.0)
    assert h.train_metrics() == {"cluster-id": 1}
    assert h.adaptor_weights(32) == [0.0, 32.0]
    torch.testing.assert_close(h.module.models[0].weight, before0)  # the other model is untouched
    # evaluation re-picks on the train split (never on test labels)
    h.module.active = 0
    h.prepare_eval(x, y, nn.MSELoss(), cfg)
    assert h.module.active == 1


def test_ditto_evaluates_the_personal_model():
    cfg, h = _handle("ditto")
    x = torch.randn(40, 2)
    y = x @ torch.tensor([[1.0], [3.0]])
    with torch.no_grad():
        h.module.global_model.weight.zero_()
        h.module.global_model.bias.zero_()
    personal = {"personal.weight": torch.tensor([[1.0, 3.0]]), "personal.bias": torch.zeros(1)}
    h.reset_private()
    h.load_private_state_dict(personal)
    h.prepare_eval(x, y, nn.MSELoss(), cfg)
    _, mse, _ = evaluate_local(h, x, y, nn.MSELoss(), "mse")
    assert mse == pytest.approx(0.0, abs=1e-10)  # the global model (zeros) has a large error
    glob = float(nn.MSELoss()(h.module.global_model(x), y))
    assert glob > 1.0
    # a client without a stored personal model starts it from the received global model
    h.reset_private()
    h.prepare_eval(x, y, nn.MSELoss(), cfg)
    assert evaluate_local(h, x, y, nn.MSELoss(), "mse")[1] == pytest.approx(glob, rel=1e-5)


def test_ditto_personal_step_is_anchored_to_the_round_start_global_model():
    cfg, h = _handle("ditto", **{"ditto-lambda": 1e6})
    x = torch.randn(16, 2)
    y = torch.randn(16, 1)
    w0 = {k: v.clone() for k, v in h.module.global_model.state_dict().items()}
    h.reset_private()
    h.train_round(x, y, nn.MSELoss(), epochs=1, batch_size=4, lr=1e-7, mixture_lr=0.0)
    # huge lambda and a small lr: v stays at w_t (the round-start global), whatever w does
    for k, v in h.module.personal.state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-3, rtol=0)


def test_fedem_e_step_by_hand():
    _, h = _handle("fedem")
    h.module.classification = False
    x = torch.zeros(2, 2)
    y = torch.tensor([[1.0], [0.0]])
    with torch.no_grad():  # model 0 predicts 1, model 1 predicts 0
        for m in h.module.models:
            m.weight.zero_()
        h.module.models[0].bias.fill_(1.0)
        h.module.models[1].bias.fill_(0.0)
    h.module.pi.copy_(torch.tensor([0.5, 0.5]))
    q = h.e_step(x, y, nn.MSELoss())
    # sample 0: losses (0, 1) -> q = (1, e^-1) / (1 + e^-1); sample 1: losses (1, 0)
    a = 1 / (1 + np.exp(-1))
    np.testing.assert_allclose(q.numpy(), [[a, 1 - a], [1 - a, a]], rtol=1e-5)
    np.testing.assert_allclose(h.module.pi.numpy(), [0.5, 0.5], rtol=1e-5)


def test_oracle_mixtures_stay_fixed(tmp_path):
    from floral_flwr.inline import run_inline

    for method in ("ensemble-oracle", "floral-oracle"):
        cfg = {"task": "digits-label-shift", "method": method, "num-server-rounds": 2, "eval-every": 1,
               "output-dir": str(tmp_path), "run-name": method, "report-mixtures": True}
        summary, _ = run_inline(cfg, 4)
        assert summary["failures"] == 0 and summary["rejected"] == 0
        rows = list(csv.DictReader((tmp_path / method / "clients.csv").open()))
        assert len(rows) == 2 * 4
        for r in rows:
            c = int(r["true-cluster"])
            assert [float(r[f"p{j}"]) for j in range(4)] == [1.0 if j == c else 0.0 for j in range(4)]


# ------------------------------------------------------------------ bad input, before training


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="'method'"):
        parse_run_config({"method": "fedsomething"})


def test_incompatible_server_optimizer_names_both_keys():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"method": "ifca", "server-optimizer": "fedadam"})
    assert "'method'" in str(info.value) and "'server-optimizer'" in str(info.value)
    parse_run_config({"method": "ifca", "server-optimizer": "fedprox"})  # meaningful: accepted


def test_oracle_needs_clusters_and_bad_pairs_stop_before_training(tmp_path):
    cfg = parse_run_config({"method": "ensemble-oracle"})
    with pytest.raises(ValueError, match="needs ground-truth clusters"):
        check_method_task(cfg, None)
    from floral_flwr.inline import run_inline

    calls: list = []
    with pytest.raises(ConfigError, match="num-adaptors"):
        run_inline({"method": "ensemble-oracle", "num-adaptors": 2, "output-dir": str(tmp_path)}, 4,
                   reply_hook=lambda n, r: calls.append(r) or r)
    with pytest.raises(ConfigError, match="server-optimizer"):
        run_inline({"method": "ifca", "server-optimizer": "fedyogi", "output-dir": str(tmp_path)}, 4,
                   reply_hook=lambda n, r: calls.append(r) or r)
    assert not calls  # nothing was sent to any client
