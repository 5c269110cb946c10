"""Server optimizers on the p(k|c) aggregate: an adaptor slice no accepted reply used this round
is not moved by momentum or adaptive moments (FedAdam moved an unused adaptor 1.0 -> 1.9 ->
2.71 with no data), and its moments are kept for when it is used again."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from floral_flwr.client import make_client_app
from floral_flwr.config import parse_run_config
from floral_flwr.inline import InlineGrid
from floral_flwr.methods import build_handle
from floral_flwr.strategy.optimizers import build_strategy
from floral_flwr.tasks import task_info
from floral_flwr.wire import to_array


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi", "fedavgm"])
def test_unused_adaptors_do_not_move_and_keep_their_moments(optimizer):
    # the oracle mixture is one-hot at the client's cluster (k mod 4): with 2 of 4 clients per
    # round, two adaptors get no weight in every round, a different two from round to round
    run = {"task": "digits-label-shift", "method": "floral-oracle", "batch-size": 16, "num-adaptors": 4,
           "fraction-train": 0.5, "min-available-nodes": 1, "persist-client-state": False,
           "server-optimizer": optimizer, "server-lr": 0.05, "aggregation": "mean"}
    cfg = parse_run_config(run)
    handle = build_handle(cfg, task_info(cfg.task).build_model)
    initial = {k: v.detach().numpy().copy() for k, v in handle.shared_state_dict().items()}
    strategy = build_strategy(optimizer, num_adaptors=4, metric="accuracy", seed=3, eval_every=100,
                              num_rounds=6, fraction_train=0.5, fraction_evaluate=0.25, min_available_nodes=1,
                              node_wait_timeout=10, server_lr=0.05)
    grid = InlineGrid(make_client_app(run), 4, run_config=run)
    seen: list[tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]] = []

    def on_round_end(rnd, arrays, strat):
        moments = {k: np.array(v) for k, v in strat.optimizer_state().items()}
        seen.append(({k: np.array(a.numpy()) for k, a in arrays.items()}, np.array(strat.stats.adaptor_totals),
                     moments))

    strategy.start(grid, ArrayRecord({k: to_array(v) for k, v in initial.items()}), num_rounds=6,
                   train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}), on_round_end=on_round_end)
    keys = [k for k in initial if k.startswith("adaptor.") and initial[k].dtype.kind == "f"]
    held_after_use = 0
    used_before: set[int] = set()
    previous, prev_moments = initial, None
    for state, totals, moments in seen:
        unused = np.flatnonzero(totals <= 0)
        assert 0 < len(unused) < 4
        for c in unused:
            for k in keys:
                np.testing.assert_array_equal(state[k][c], previous[k][c], err_msg=f"{optimizer} adaptor {c} {k}")
            if prev_moments is not None:
                for name, v in moments.items():
                    if any(name.endswith("/" + k) for k in keys) and name in prev_moments:
                        np.testing.assert_array_equal(v[c], prev_moments[name][c], err_msg=name)
            held_after_use += int(c in used_before)
        for c in np.flatnonzero(totals > 0):
            assert any(not np.array_equal(state[k][c], previous[k][c]) for k in keys)
        used_before |= set(np.flatnonzero(totals > 0).tolist())
        previous, prev_moments = state, moments
    assert held_after_use > 0  # an adaptor with momentum from an earlier round was held still


def _counters_after(optimizer: str, rounds: int = 3) -> dict[str, np.ndarray]:
    run = {"task": "synthetic-linear-bn", "method": "floral", "persist-client-state": False,
           "server-optimizer": optimizer, "server-lr": 0.001, "aggregation": "mean", "min-available-nodes": 1}
    cfg = parse_run_config(run)
    handle = build_handle(cfg, task_info(cfg.task).build_model)
    initial = {k: v.detach().numpy().copy() for k, v in handle.shared_state_dict().items()}
    strategy = build_strategy(optimizer, num_adaptors=cfg.num_adaptors, metric="mse", seed=1, eval_every=100,
                              num_rounds=rounds, fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1,
                              node_wait_timeout=10, server_lr=0.001)
    grid = InlineGrid(make_client_app(run), 3, run_config=run)
    result = strategy.start(grid, ArrayRecord({k: to_array(v) for k, v in initial.items()}), num_rounds=rounds,
                            train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    final = {k: np.array(a.numpy()) for k, a in result.arrays.items()}
    return {k: v for k, v in final.items() if v.dtype.kind in "iub"}


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi", "fedavgm"])
def test_batchnorm_counters_are_averaged_not_optimizer_stepped(optimizer):
    # a BatchNorm's num_batches_tracked counts batches: every client adds the same number per
    # round whatever the base, so under any server optimizer it must match plain FedAvg's
    counters = _counters_after(optimizer)
    plain = _counters_after("fedavg")
    assert counters and set(counters) == set(plain)
    for k, v in plain.items():
        assert int(v) > 0, k  # the counter really counts here
        np.testing.assert_array_equal(counters[k], v, err_msg=f"{optimizer} {k}")
