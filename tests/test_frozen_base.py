"""``train-base`` = false on a task without a pretrained model (digits MLP): the base is frozen
and never sent, the head (the last ``nn.Linear``) and the adaptors train and travel; the shared
LoRA (``fedavg-lora``, and ``fedavg`` with a frozen base) sends one adaptor slot and nothing
private; the frozen weights end the run exactly as they started on every client."""

from __future__ import annotations

import pytest
import torch

from floral_flwr.config import parse_run_config
from floral_flwr.methods import build_handle
from floral_flwr.methods.floral import head_patterns
from floral_flwr.tasks import get_task
from floral_flwr.tasks.models import MLP


def test_head_defaults_to_the_last_linear_layer():
    assert head_patterns(MLP(64, 20, 10)) == ("fc2.*",)


@pytest.mark.parametrize("method,adaptor_slots", [("floral", 4), ("fedavg", 1), ("fedavg-lora", 1),
                                                  ("local-adaptor", None), ("feddpa", 1)])
def test_frozen_base_state_split(method, adaptor_slots):
    cfg = parse_run_config({"task": "digits-label-shift", "method": method, "train-base": False})
    task = get_task("digits-label-shift", num_clients=4, seed=0)
    handle = build_handle(cfg, task.build_model)
    shared = handle.shared_state_dict()
    assert sorted(k for k in shared if k.startswith("base.")) == ["base.fc2.bias", "base.fc2.weight"]
    adaptors = [v for k, v in shared.items() if k.startswith("adaptor.")]
    if adaptor_slots is None:  # local adaptor: its adaptor is private
        assert not adaptors and any(k.startswith("adaptor.") for k in handle.private_state_dict())
    else:
        assert adaptors and all(v.shape[0] == adaptor_slots for v in adaptors)
        assert handle.num_adaptors == adaptor_slots
    if method in ("fedavg", "fedavg-lora"):
        assert handle.private_state_dict() == {} and handle.adaptor_weights(7) == [7.0]
    # what does not travel does not train
    frozen = [p for n, p in handle.module.named_parameters() if "fc1" in n and "adaptor" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_frozen_base_run_keeps_the_base_and_reports_bytes(tmp_path):
    from floral_flwr.client.handlers import _SETUPS
    from floral_flwr.inline import run_inline

    cfg = {"task": "digits-label-shift", "method": "floral", "train-base": False, "num-server-rounds": 3,
           "output-dir": str(tmp_path), "run-name": "frozen", "eval-every": 3,
           "aggregation": "mean"}  # the plaintext wire: this test reads single replies
    before = build_handle(parse_run_config(cfg), get_task("digits-label-shift", num_clients=4, seed=0).build_model)
    summary, grid = run_inline(cfg, 4)
    record = next(r.content["arrays"] for r in grid.replies_seen if "arrays" in r.content.array_records)
    assert sorted(k for k in record.keys() if k.startswith("base.")) == ["base.fc2.bias", "base.fc2.weight"]
    assert summary["bytes-up-per-round"] == 4 * sum(len(a.data) for a in record.values())
    (setup,) = _SETUPS.values()
    after = setup.handle.module
    for name, p in before.module.named_parameters():
        if "fc1" in name and "adaptor" not in name:
            assert torch.equal(dict(after.named_parameters())[name].detach().cpu(), p.detach()), name
    assert summary["final"]["accuracy-mean"] > 0.1


def test_frozen_base_under_secure_aggregation_keeps_the_base_and_learns(tmp_path):
    """The default aggregation (secagg) masks only what travels: adaptors and head."""
    from floral_flwr.client.handlers import _SETUPS
    from floral_flwr.inline import run_inline

    cfg = {"task": "digits-label-shift", "method": "floral", "train-base": False, "num-server-rounds": 3,
           "output-dir": str(tmp_path), "run-name": "frozen-secagg", "eval-every": 3}
    assert parse_run_config(cfg).aggregation == "secagg"
    before = build_handle(parse_run_config(cfg), get_task("digits-label-shift", num_clients=4, seed=0).build_model)
    summary, _ = run_inline(cfg, 4)
    (setup,) = _SETUPS.values()
    after = dict(setup.handle.module.named_parameters())
    for name, p in before.module.named_parameters():
        if "fc1" in name and "adaptor" not in name:
            assert torch.equal(after[name].detach().cpu(), p.detach()), name
    assert summary["failures"] == 0 and summary["final"]["accuracy-mean"] > 0.1
