"""Every method end to end through the real apps (run_inline), two rounds on a tiny task; clients
that never train (holdout-clients); baselines with Flower's server optimizers."""

from __future__ import annotations

import math

import pytest
import torch

from floral_flwr.config import METHODS
from floral_flwr.inline import run_inline

torch.set_num_threads(1)

PRIVATE = ("mixture.", "personal.", "dpa.", "fedem.", "ifca.", "local.")


def _run(tmp_path, name, num_clients=4, **kw):
    cfg = {"task": "synthetic-linear", "num-server-rounds": 2, "eval-every": 2, "output-dir": str(tmp_path),
           "run-name": name, **kw}
    return run_inline(cfg, num_clients)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_end_to_end_under_secure_aggregation(tmp_path, method):
    """The default (secagg): every method's update and weights fit the masked payload."""
    summary, grid = _run(tmp_path, method, method=method)
    assert summary["failures"] == 0 and summary["rejected"] == 0
    assert math.isfinite(summary["final"]["mse-mean"]) and summary["final"]["num-clients"] == 4
    assert not [r for r in grid.replies_seen if "arrays" in r.content.array_records]  # nothing in plaintext


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_end_to_end_in_plaintext(tmp_path, method):
    summary, grid = _run(tmp_path, method, method=method, aggregation="mean")
    assert summary["failures"] == 0 and summary["rejected"] == 0
    assert math.isfinite(summary["final"]["mse-mean"]) and summary["final"]["num-clients"] == 4
    train = [r for r in grid.replies_seen if "arrays" in r.content.array_records]
    assert len(train) == 2 * 4
    for r in train:  # nothing private on the wire
        assert not any(k.startswith(PRIVATE) for k in r.content["arrays"])
    if method == "ifca":
        assert all("cluster-id" in r.content["metrics"] for r in train)


def test_holdout_clients_never_train_and_report_zero_shot_vs_adapted(tmp_path):
    summary, grid = _run(tmp_path, "holdout", num_clients=8, method="floral", aggregation="mean",
                         **{"holdout-clients": 0.25, "adapt-steps": 5})
    trained = {int(r.content["metrics"]["client-id"]) for r in grid.replies_seen
               if "arrays" in r.content.array_records}
    assert len(trained) == 6  # 2 of 8 held out, never sampled for training
    f = summary["final"]
    assert f["holdout-num-clients"] == 2 and f["num-clients"] == 6
    assert {"holdout-mse-zero-shot", "holdout-mse-adapted"} <= set(f) and f["holdout-adapt-steps"] == 5


@pytest.mark.parametrize("method,opt", [("ensemble", "fedadam"), ("fedem", "fedavgm"), ("ditto", "fedprox"),
                                        ("feddpa", "fedyogi"), ("ifca", "fedprox")])
def test_baselines_with_server_optimizers(tmp_path, method, opt):
    summary, _ = _run(tmp_path, f"{method}-{opt}", method=method, **{"server-optimizer": opt, "server-lr": 0.01})
    assert summary["failures"] == 0 and summary["rejected"] == 0
