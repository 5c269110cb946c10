"""Run config ``grad-clip``: each local step's gradient is scaled down to the bound.

Checked against an independent computation (autograd on a copy, clipped by hand), for every
training loop that steps an optimizer of its own (the shared loop, FedEM, Ditto), and end to
end through the real ClientApp and wire format (the config key reaches the loop).
Mutations checked: ``step_with_clip`` stepping without clipping -> the clipped-step tests (fedavg,
floral, fedem, ditto) and the end-to-end test fail; the handler not passing ``grad_clip`` -> the
end-to-end test fails.
"""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from floral_flwr.config import ConfigError, parse_run_config
from floral_flwr.methods import build_handle

torch.set_num_threads(1)

X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * 5.0  # large inputs: large gradients
Y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])


def _handle(method: str, **kw):
    cfg = parse_run_config({"task": "synthetic-linear", "method": method, "num-adaptors": 2, **kw})
    return build_handle(cfg, lambda: nn.Linear(3, 2))


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _change(before: dict[str, torch.Tensor], module: nn.Module, prefix: str = "") -> float:
    after = dict(module.named_parameters())
    return float(torch.sqrt(sum(((after[k] - v) ** 2).sum() for k, v in before.items() if k.startswith(prefix))))


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_one_fedavg_step_is_the_hand_clipped_gradient_step(clip):
    h = _handle("fedavg")
    ref = copy.deepcopy(h.module)
    loss = nn.CrossEntropyLoss()(ref(X), Y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    assert norm > 0.05 * 10  # the small bound really clips
    scale = min(1.0, clip / norm)
    lr = 0.1
    expected = [p.detach() - lr * scale * g for p, g in zip(ref.parameters(), grads)]
    h.train_round(X, Y, nn.CrossEntropyLoss(), epochs=1, batch_size=8, lr=lr, mixture_lr=0.0, grad_clip=clip)
    for p, e in zip(h.module.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


@pytest.mark.parametrize("method", ["floral", "fedem"])
def test_every_step_of_the_method_moves_at_most_lr_times_the_bound(method):
    lr, clip, steps = 0.5, 1e-3, 4  # 2 epochs x 2 batches
    moved = {}
    for c in (0.0, clip):
        torch.manual_seed(0)
        h = _handle(method)
        before = _params(h.module)
        h.train_round(X, Y, nn.CrossEntropyLoss(), epochs=2, batch_size=4, lr=lr, mixture_lr=lr, grad_clip=c)
        moved[c] = _change(before, h.module)
    assert moved[clip] <= steps * lr * clip * (1 + 1e-4)
    assert moved[0.0] > 10 * steps * lr * clip  # unclipped, the same steps move much further


def test_ditto_clips_the_personal_and_the_global_step_each():
    lr, clip, steps = 0.5, 1e-3, 2
    torch.manual_seed(0)
    h = _handle("ditto")
    h.ensure_personal()
    g0, v0 = _params(h.module.global_model), _params(h.module.personal)
    h.train_round(X, Y, nn.CrossEntropyLoss(), epochs=1, batch_size=4, lr=lr, grad_clip=clip)
    assert 0 < _change(g0, h.module.global_model) <= steps * lr * clip * (1 + 1e-4)
    assert 0 < _change(v0, h.module.personal) <= steps * lr * clip * (1 + 1e-4)


@pytest.mark.parametrize("bad", [-1.0, "nan", "inf", "x", True])
def test_a_bad_bound_names_the_key(bad):
    with pytest.raises(ConfigError, match="grad-clip"):
        parse_run_config({"task": "synthetic-linear", "method": "fedavg", "grad-clip": bad})


def test_default_is_off():
    assert parse_run_config({"task": "synthetic-linear", "method": "fedavg"}).grad_clip == 0.0


def test_the_key_reaches_the_client_loop_through_the_wire():
    from floral_flwr import wire
    from floral_flwr.client import make_client_app
    from floral_flwr.inline import InlineGrid
    from floral_flwr.server import run_server

    moved = {}
    for clip in (0.0, 1e-4):
        cfg = {"task": "digits-label-shift", "method": "fedavg", "seed": 0, "aggregation": "mean",
               "num-server-rounds": 1, "eval-every": 1, "grad-clip": clip,
               "output-dir": tempfile.mkdtemp(prefix="clip-"), "run-name": "r"}
        deltas = []

        class Grid(InlineGrid):
            def send_and_receive(self, messages, *, timeout=None):
                messages = list(messages)
                replies = list(super().send_and_receive(messages, timeout=timeout))
                for m, r in zip(messages, replies):
                    if m.metadata.message_type == "train" and r.has_content():
                        sent = wire.unpack_content(m.content)["arrays"]
                        got = wire.unpack_content(r.content)["arrays"]
                        deltas.append(np.sqrt(sum(
                            float(((np.asarray(wire.from_array(got[k]), np.float64)
                                    - np.asarray(wire.from_array(sent[k]), np.float64)) ** 2).sum())
                            for k in sent.keys())))
                return replies

        cfg_parsed = parse_run_config(cfg)
        run_server(Grid(make_client_app(cfg), 20), dict(cfg))
        assert deltas, "no train reply was seen"
        steps = cfg_parsed.local_epochs * -(-72 // cfg_parsed.batch_size)  # digits: <= 72 rows a client
        moved[clip] = (max(deltas), steps * cfg_parsed.lr)
    big, _ = moved[0.0]
    small, bound_per_unit = moved[1e-4]
    assert small <= bound_per_unit * 1e-4 * (1 + 1e-3) + 1e-6  # float32 on the wire
    assert big > 100 * small
