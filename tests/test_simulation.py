"""End to end through Flower's simulation engine (Ray): ``flwr.simulation.run_simulation``."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from flwr.simulation import run_simulation

from floral_flwr.client import make_client_app
from floral_flwr.results import load_npz
from floral_flwr.server import make_server_app
from floral_flwr.strategy.floral_strategy import FloralStrategy

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


def simulate(cfg: dict, num_clients: int) -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(make_server_app(cfg), make_client_app(cfg), num_supernodes=num_clients, backend_config=BACKEND)


@pytest.mark.slow
def test_results_are_written_consistently_and_replies_carry_no_mixture(tmp_path, monkeypatch):
    seen: list = []
    original = FloralStrategy.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        seen.extend(replies)
        return original(self, server_round, replies)

    monkeypatch.setattr(FloralStrategy, "aggregate_train", spy)
    cfg = {"task": "digits-label-shift", "num-server-rounds": 3, "eval-every": 1, "mixture-lr": 3.0,
           "output-dir": str(tmp_path), "run-name": "e2e", "min-available-nodes": 4,
           "aggregation": "mean", "report-mixtures": True,  # plaintext replies inspected (secagg: below)
           "num-threads": 1}  # one intra-op thread in both engines: a matmul's sum order is the same
    simulate(cfg, 4)
    run = tmp_path / "e2e"

    # --- privacy: inspect every train reply the server received
    assert len(seen) == 3 * 4 and not any(m.has_error() for m in seen)
    logits = []
    for k in range(4):
        state = sorted((run / "client-state" / f"client-{k}").glob("round-*.npz"))[-1]
        with np.load(state) as z:
            logits.append(np.asarray(z["mixture.logits"]))
    assert all(np.abs(lg).max() > 1e-3 for lg in logits)  # mixtures really were learned
    for msg in seen:
        for rec in msg.content.array_records.values():
            for key, arr in rec.items():
                assert "mixture" not in key and not key.startswith("local.")
                a = arr.numpy()
                for lg in logits:  # no array equals (or contains) any client's logits
                    assert not (a.size == lg.size and np.allclose(a.ravel(), lg.ravel()))
        assert set(msg.content.metric_records["metrics"].keys()) == {
            "num-examples", "train-loss", "adaptor-weights", "client-id"}

    # --- results contract
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["task"] == "digits-label-shift" and "torch" in config["versions"]
    rounds = list(csv.DictReader((run / "rounds.csv").open()))
    assert [int(r["round"]) for r in rounds] == [1, 2, 3]
    assert all(int(r["received"]) == 4 and int(r["failures"]) == 0 for r in rounds)
    clients = list(csv.DictReader((run / "clients.csv").open()))
    assert len(clients) == 3 * 4 and {int(r["client-id"]) for r in clients} == {0, 1, 2, 3}
    last = [r for r in clients if r["round"] == "3"]
    assert float(rounds[-1]["mean"]) == pytest.approx(np.mean([float(r["accuracy"]) for r in last]))
    for r in last:  # mixtures are distributions
        assert sum(float(r[f"p{c}"]) for c in range(4)) == pytest.approx(1.0, abs=1e-5)
        assert int(r["true-cluster"]) == int(r["client-id"]) % 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["round"] == 3
    assert summary["final"]["accuracy-mean"] == pytest.approx(float(rounds[-1]["mean"]))
    assert summary["parameters"]["base"] > 0 and summary["parameters"]["mixture"] == 4
    assert summary["bytes-up-per-round"] == pytest.approx(float(rounds[-1]["bytes-up"]))
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 3
    state = load_npz(run / "checkpoint" / "state-000003.npz")
    assert any(k.startswith("adaptor.") for k in state) and not any("mixture" in k for k in state)
    for png in ("metric.png", "loss.png", "mixtures.png"):
        assert (run / "plots" / png).stat().st_size > 1000

    # --- the same seed gives the same model in the Ray simulation and in-process (InlineGrid):
    # every source of randomness is seeded by (seed, round, client id), none by the engine
    from floral_flwr.inline import run_inline

    run_inline({**cfg, "run-name": "inline"}, 4)
    other = load_npz(tmp_path / "inline" / "checkpoint" / "state-000003.npz")
    assert other.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(other[key], state[key], err_msg=key)


@pytest.mark.slow
def test_secure_aggregation_runs_in_the_ray_simulation_as_in_process(tmp_path):
    """The default (secagg) through Flower's simulation engine: Flower's SecAgg+ workflow on the
    engine's grid, the mod in Ray actors; the same global model as the inline engine, bit for bit
    (the mod's rounding noise is seeded per client and round, the masked sums are exact)."""
    cfg = {"task": "digits-label-shift", "num-server-rounds": 2, "eval-every": 2, "mixture-lr": 3.0, "num-threads": 1,
           "output-dir": str(tmp_path), "run-name": "ray", "min-available-nodes": 4}
    simulate(cfg, 4)
    rounds = list(csv.DictReader((tmp_path / "ray" / "rounds.csv").open()))
    assert all(int(r["received"]) == 4 and int(r["failures"]) == 0 for r in rounds)
    assert rounds[-1]["cluster-ari"] != ""  # from the securely summed table
    from floral_flwr.inline import run_inline

    run_inline({**cfg, "run-name": "inline"}, 4)
    a = load_npz(tmp_path / "ray" / "checkpoint" / "state-000002.npz")
    b = load_npz(tmp_path / "inline" / "checkpoint" / "state-000002.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_floral_beats_fedavg_on_synthetic_linear(tmp_path):
    """The paper's synthetic task (2 clusters of linear maps): FedAvg cannot fit both."""
    final = {}
    for method in ("floral", "fedavg"):
        cfg = {"task": "synthetic-linear", "method": method, "num-server-rounds": 50, "eval-every": 50,
               "output-dir": str(tmp_path), "run-name": method, "min-available-nodes": 10}
        simulate(cfg, 10)
        final[method] = json.loads((tmp_path / method / "summary.json").read_text())["final"]
    assert final["floral"]["mse-mean"] * 10 < final["fedavg"]["mse-mean"]
    assert final["floral"]["cluster-ari"] == pytest.approx(1.0)
