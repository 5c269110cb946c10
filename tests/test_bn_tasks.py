"""Every ``-bn`` task trains end to end for every method that supports it.

BatchNorm brings a 0-d buffer (``num_batches_tracked``) onto the wire; when the codec turned it
into shape (1,), every client of ``floral``/``floral-oracle``/``local-adaptor``/``feddpa`` failed
to load the global state in every round and the run still ended "completed". Here each run must
have no failed or rejected reply, must change the global state, and must report a final metric.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from floral_flwr.config import METHODS, parse_run_config
from floral_flwr.inline import run_inline
from floral_flwr.methods import build_handle, check_method_task
from floral_flwr.results import load_npz
from floral_flwr.tasks import TASK_NAMES, task_info

EMBEDDED_BN = [t for t in TASK_NAMES if t.endswith("-bn") and t.startswith("synthetic")]


def _supported(task: str) -> list[str]:
    out = []
    for method in METHODS:
        try:
            cfg = parse_run_config({"task": task, "method": method})
            check_method_task(cfg, task_info(task).num_clusters)
        except ValueError:
            continue
        out.append(method)
    return out


def _check_trained(tmp_path, cfg: dict, summary: dict, metric: str) -> None:
    assert summary["failures"] == 0 and summary["rejected"] == 0, summary
    assert f"{metric}-mean" in summary["final"] and np.isfinite(summary["final"][f"{metric}-mean"])
    run = tmp_path / cfg["run-name"]
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    state = load_npz(run / "checkpoint" / f"state-{meta['round']:06d}.npz")
    handle = build_handle(parse_run_config(cfg), task_info(cfg["task"]).build_model)
    initial = {k: v.detach().numpy() for k, v in handle.shared_state_dict().items()}
    assert state.keys() == initial.keys()
    assert all(state[k].shape == initial[k].shape for k in state)  # 0-d counters stay 0-d
    moved = [k for k in state if state[k].dtype.kind == "f" and not np.array_equal(state[k], initial[k])]
    assert moved, "the global state did not change: nothing trained"
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and any((state[k] > 0).any() for k in counters)  # BatchNorm ran


def test_every_method_runs_on_the_embedded_bn_tasks_is_checked():
    assert EMBEDDED_BN == ["synthetic-linear-bn", "synthetic-mlp-bn"]
    assert set(_supported("synthetic-mlp-bn")) == set(METHODS)


@pytest.mark.parametrize("task", EMBEDDED_BN)
@pytest.mark.parametrize("method", METHODS)
def test_bn_task_trains_with_every_method(tmp_path, task, method):
    if method not in _supported(task):
        pytest.skip(f"{method} does not support {task}")
    name = f"{task}-{method}"
    cfg = {"task": task, "method": method, "num-server-rounds": 2, "eval-every": 2, "output-dir": str(tmp_path),
           "run-name": name, "min-available-nodes": 1, "fraction-train": 1.0}
    summary, _ = run_inline(cfg, 4)
    _check_trained(tmp_path, cfg, summary, "mse")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_cifar100_bn_trains_with_every_method(tmp_path, monkeypatch, method):
    """The image -bn task (VGG-8 with BatchNorm) on a tiny fake CIFAR-100 in the hub's schema."""
    from floral_flwr.tasks.sources import write_fake_dataset

    if method not in _supported("cifar100-bn"):
        pytest.skip(f"{method} does not support cifar100-bn")
    monkeypatch.setenv("FLORAL_FLWR_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_fake_dataset("cifar100", tmp_path / "data" / "cifar100", 200, 40, seed=0)
    name = f"cifar100-bn-{method}"
    cfg = {"task": "cifar100-bn", "method": method, "num-server-rounds": 1, "output-dir": str(tmp_path),
           "run-name": name, "min-available-nodes": 1, "fraction-train": 0.2, "fraction-evaluate": 0.2,
           "data-dir": str(tmp_path / "data"), "batch-size": 16, "device": "cpu",
           # the task's paper preset is server Adam(0.001): one round of it barely moves the state
           # and rounds the integer BatchNorm counters back to 0; this test is about BatchNorm
           "server-optimizer": "fedavg", "server-lr": 1.0}
    summary, _ = run_inline(cfg, 10)
    _check_trained(tmp_path, cfg, summary, "accuracy")
