"""Checkpoint + resume: an interrupted run, resumed, ends with the uninterrupted run's model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from floral_flwr.config import ConfigError
from floral_flwr.inline import run_inline
from floral_flwr.results import load_npz

NUM_CLIENTS = 6


class Crash(Exception):
    """Stands for the ServerApp process being killed."""


def _base(tmp_path, **kw):
    return {
        "task": "digits-label-shift", "num-server-rounds": 4, "eval-every": 2, "batch-size": 16,
        "output-dir": str(tmp_path), "min-available-nodes": 1, "fraction-train": 0.67,
        "server-optimizer": "fedadam", "server-lr": 0.01, "mixture-lr": 2.0, **kw,
    }


def _final_state(tmp_path, name):
    meta = json.loads((tmp_path / name / "checkpoint" / "meta.json").read_text())
    return meta["round"], load_npz(tmp_path / name / "checkpoint" / f"state-{meta['round']:06d}.npz")


def _trained(reply) -> bool:
    """A reply sent after local training: a plaintext train reply, or the masked vector of a
    secure one (SecAgg+'s 'collect masked vectors' stage; not the evaluation tally's)."""
    if reply.metadata.message_type != "train" or reply.has_error():
        return False
    records = reply.content.config_records
    stage = records.get("secaggplus_configs")
    return stage is None or ("masked_params" in stage and "train-loss" in records.get("fitres.metrics", {}))


# (aggregation, fold-evaluation, the last checkpoint when round 3 crashes). Folded, round 2's
# evaluation rides in round 3's train messages, so round 2 is recorded (rounds.csv row, checkpoint)
# only once round 3's exchange is in: the crash loses it and the resumed run redoes round 2.
# Under secagg nothing folds (the train messages are SecAgg+ stages).
@pytest.mark.parametrize("aggregation, fold, last", [("mean", False, 2), ("mean", True, 1), ("secagg", True, 2)],
                         ids=["mean", "mean-folded", "secagg"])
def test_resume_after_a_crash_mid_round_equals_uninterrupted_run(tmp_path, aggregation, fold, last):
    def cfg(**kw):
        return _base(tmp_path, aggregation=aggregation, **{"fold-evaluation": fold, **kw})

    run_inline(cfg(**{"run-name": "full"}), NUM_CLIENTS)

    # Crash in round 3 after two clients have already trained (and saved their round-3 state).
    trained = {"n": 0}

    def crash_in_round_3(node, reply):
        if _trained(reply):
            trained["n"] += 1
            if trained["n"] == 4 + 4 + 2:  # 4 sampled clients per round
                raise Crash()
        return reply

    with pytest.raises(Crash):
        run_inline(cfg(**{"run-name": "cut"}), NUM_CLIENTS, reply_hook=crash_in_round_3)
    rnd, _ = _final_state(tmp_path, "cut")
    assert rnd == last  # the last recorded round
    summary, _ = run_inline(cfg(**{"run-name": "cut", "resume": True}), NUM_CLIENTS)

    r_full, full = _final_state(tmp_path, "full")
    r_cut, cut = _final_state(tmp_path, "cut")
    assert r_full == r_cut == 4
    assert full.keys() == cut.keys()
    for key in full:
        np.testing.assert_array_equal(full[key], cut[key], err_msg=key)
    # optimizer state restored too (FedAdam moments), and no round lost or double-counted
    rows = list(csv.DictReader((tmp_path / "cut" / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    rows_full = list(csv.DictReader((tmp_path / "full" / "rounds.csv").open()))
    assert rows[-1]["mean"] == rows_full[-1]["mean"] and rows[-1]["cluster-ari"] == rows_full[-1]["cluster-ari"]
    clients = list(csv.DictReader((tmp_path / "cut" / "clients.csv").open()))
    assert sorted({int(r["round"]) for r in clients}) == [2, 4] and len(clients) == 2 * NUM_CLIENTS


def test_resume_without_checkpoint_stops_before_round_one(tmp_path):
    with pytest.raises(ConfigError, match="'resume' = true"):
        run_inline(_base(tmp_path, **{"run-name": "nothing-here", "resume": True}), NUM_CLIENTS)


def test_unwritable_output_dir_stops_before_round_one(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="'output-dir'"):
        run_inline(_base(tmp_path, **{"output-dir": str(blocker / "sub")}), NUM_CLIENTS)


def test_bad_run_config_stops_before_round_one(tmp_path):
    with pytest.raises(ConfigError, match="'num-adaptors' = 0"):
        run_inline(_base(tmp_path, **{"num-adaptors": 0}), NUM_CLIENTS)
    with pytest.raises(ConfigError, match="'task'"):
        run_inline(_base(tmp_path, task="imagenet"), NUM_CLIENTS)
    with pytest.raises(ConfigError, match="num-adaptors >= the task's 4 clusters"):
        run_inline(_base(tmp_path, method="floral-oracle", **{"num-adaptors": 2}), NUM_CLIENTS)
    # an image task whose clients lack the data: one clear error naming the dataset and how to
    # provide it, raised at client discovery, before any training
    from floral_flwr.strategy.nodes import ClientSetupError

    with pytest.raises(ClientSetupError, match="dataset 'mnist'.*was not found.*floral_flwr.data download"):
        run_inline(_base(tmp_path, task="mnist-rotate", **{"data-dir": str(tmp_path)}), NUM_CLIENTS)
    assert not list(tmp_path.rglob("rounds.csv"))  # no round ran


def test_export_models_writes_merged_personalized_models_on_the_client_side(tmp_path):
    import torch

    from floral_flwr.config import parse_run_config
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import get_task

    cfg = _base(tmp_path, **{"run-name": "exp", "export-models": True, "num-server-rounds": 2,
                             "server-optimizer": "fedavg"})
    summary, _ = run_inline(cfg, NUM_CLIENTS)
    assert summary["exported-models"] == NUM_CLIENTS
    # the exported model is the plain base architecture and reproduces the client's personalized
    # model: rebuild FLoRAL from the checkpoint + that client's private state and compare outputs
    run_cfg = parse_run_config(cfg)
    task = get_task("digits-label-shift", num_clients=NUM_CLIENTS, seed=0)
    client = 3
    exported = load_npz(tmp_path / "exp" / "client-state" / f"client-{client}" / "personalized-model.npz")
    plain = task.build_model()
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    handle = build_handle(run_cfg, task.build_model)
    _, state = _final_state(tmp_path, "exp")
    handle.load_shared_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    private = sorted((tmp_path / "exp" / "client-state" / f"client-{client}").glob("round-*.npz"))[-1]
    with np.load(private) as z:
        handle.load_private_state_dict({"mixture.logits": torch.from_numpy(z["mixture.logits"])})
    x = task.client_data(client).test_x
    handle.module.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), handle.module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ditto", "ifca"])
def test_export_models_of_baselines_is_the_plain_personal_model(tmp_path, method):
    """Ditto exports its personal model v_k (its private state), IFCA the cluster model it chose
    (one slice of the final global state): the plain task architecture, not the wrapper."""
    from floral_flwr.tasks import get_task

    cfg = _base(tmp_path, **{"run-name": method, "method": method, "export-models": True,
                             "num-server-rounds": 2, "server-optimizer": "fedavg"})
    summary, _ = run_inline(cfg, NUM_CLIENTS)
    assert summary["exported-models"] == NUM_CLIENTS
    keys = list(get_task("digits-label-shift", num_clients=NUM_CLIENTS, seed=0).build_model().state_dict())
    _, state = _final_state(tmp_path, method)
    for client in range(NUM_CLIENTS):
        folder = tmp_path / method / "client-state" / f"client-{client}"
        exported = load_npz(folder / "personalized-model.npz")
        assert list(exported) == keys
        private = sorted(folder.glob("round-*.npz"))[-1]
        with np.load(private) as z:
            if method == "ditto":
                expected = {k: z["personal." + k] for k in keys}
            else:
                j = int(z["ifca.cluster"])
                assert 0 <= j < 4
                expected = {k: state["adaptor.model." + k][j] for k in keys}
        for k in keys:
            np.testing.assert_array_equal(exported[k], expected[k], err_msg=f"client {client} {k}")
