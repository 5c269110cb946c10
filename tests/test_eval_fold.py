"""Evaluation folded into the next round's train messages (``fold-evaluation``, the default):
the same numbers as a separate evaluate exchange, bit for bit, with fewer messages.

Each run is done twice on the same federation, once with ``fold-evaluation = false`` (a separate
evaluate message to every evaluated client after the round, as Flower's FedAvg does) and once
folded; every recorded number (rounds.csv, clients.csv, the final global state) must be equal,
and the folded run must send one message per sampled client plus an evaluate message only to the
evaluated clients that do not train next.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

from floral_flwr.inline import InlineGrid
from floral_flwr.results import RunRecorder
from floral_flwr.strategy.eval_fold import EVAL_RECORD

TIMING = {"elapsed-s", "round-s", "bytes-down"}  # not results; bytes-down shrinks when folded

# rounds 1 and 2 are evaluated with the train messages of rounds 2 and 3, round 3 at once
# (plaintext 'mean': under secagg the train messages are SecAgg+ stages and nothing folds, see below)
BASE = {"task": "digits-label-shift", "aggregation": "mean", "num-server-rounds": 3, "eval-every": 1, "fraction-train": 0.5,
        "fraction-evaluate": 0.75, "min-available-nodes": 4, "local-epochs": 1}


def _run(tmp: Path, name: str, cfg: dict, num_clients: int) -> tuple[Path, InlineGrid]:
    from floral_flwr.client import make_client_app
    from floral_flwr.server import run_server

    cfg = {**BASE, **cfg, "output-dir": str(tmp), "run-name": name}
    grid = InlineGrid(make_client_app(cfg), num_clients, keep_replies=None)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_server(grid, cfg)
    return tmp / name, grid


def _rows(path: Path, drop: set[str] = frozenset()) -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.fixture
def checkpoints(monkeypatch):
    """Every checkpoint each run saves: run name -> [(round, global state, optimizer state)]."""
    saved: dict[str, list] = {}
    original = RunRecorder.save_checkpoint

    def spy(self, server_round, arrays, optimizer, extra):
        saved.setdefault(self.run_dir.name, []).append(
            (server_round, {k: np.array(v) for k, v in arrays.items()}, {k: np.array(v) for k, v in optimizer.items()}))
        return original(self, server_round, arrays, optimizer, extra)

    monkeypatch.setattr(RunRecorder, "save_checkpoint", spy)
    return saved


def _same_checkpoints(a: list, b: list) -> bool:
    def same(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)

    return len(a) == len(b) and all(ra == rb and same(sa, sb) and same(oa, ob)
                                    for (ra, sa, oa), (rb, sb, ob) in zip(a, b))


@pytest.mark.parametrize("extra", [
    {"method": "floral"},
    # prepare_eval fits what is personal before evaluating: the folded train must start afresh
    {"method": "fedavg-ft"},
    # held-out clients only ever get evaluate messages; the others fold. FedAvgM: the checkpoint
    # of an evaluation round is written before the next round's server step
    {"method": "floral", "holdout-clients": 0.2, "server-optimizer": "fedavgm"},
], ids=["floral", "fedavg-ft", "holdout-fedavgm"])
def test_folded_evaluation_gives_the_same_numbers_with_fewer_messages(tmp_path, checkpoints, extra):
    num_clients = 6
    sep, sep_grid = _run(tmp_path, "separate", {**extra, "fold-evaluation": False}, num_clients)
    fold, fold_grid = _run(tmp_path, "folded", {**extra, "fold-evaluation": True}, num_clients)

    assert _rows(fold / "rounds.csv", TIMING) == _rows(sep / "rounds.csv", TIMING)
    assert _rows(fold / "clients.csv") == _rows(sep / "clients.csv")
    assert [r["round"] for r in _rows(sep / "clients.csv")].count("1") >= 4  # round 1 was evaluated
    assert [c[0] for c in checkpoints["folded"]] == [1, 2, 3]
    assert _same_checkpoints(checkpoints["folded"], checkpoints["separate"])

    # the evaluation of rounds 1 and 2 rode on the train replies of rounds 2 and 3
    sep_types = Counter(m.metadata.message_type for m in sep_grid.replies_seen)
    fold_types = Counter(m.metadata.message_type for m in fold_grid.replies_seen)
    riding = [m for m in fold_grid.replies_seen
              if m.metadata.message_type == MessageType.TRAIN and EVAL_RECORD in m.content.metric_records]
    assert riding, "no train reply carried an evaluation"
    assert fold_types[MessageType.TRAIN] == sep_types[MessageType.TRAIN]
    assert fold_types[MessageType.EVALUATE] == sep_types[MessageType.EVALUATE] - len(riding)
    sep_down = [int(r["bytes-down"]) for r in _rows(sep / "rounds.csv")]
    fold_down = [int(r["bytes-down"]) for r in _rows(fold / "rounds.csv")]
    assert sum(fold_down) < sum(sep_down)


def test_under_secagg_evaluation_stays_a_separate_exchange(tmp_path):
    """Under secagg the train messages are SecAgg+ stage messages: nothing can ride in them, so
    fold-evaluation (on by default) must leave every evaluation round to its own evaluate
    exchange: the same evaluations and evaluate messages as fold-evaluation = false."""
    num_clients = 6
    secure = {"method": "floral", "aggregation": "secagg"}
    sep, sep_grid = _run(tmp_path, "separate", {**secure, "fold-evaluation": False}, num_clients)
    fold, fold_grid = _run(tmp_path, "folded", {**secure, "fold-evaluation": True}, num_clients)

    evaluated = _rows(fold / "clients.csv")
    assert {r["round"] for r in evaluated} == {"1", "2", "3"}  # no evaluation lost to a fold
    assert evaluated == _rows(sep / "clients.csv")
    assert _rows(fold / "rounds.csv", TIMING) == _rows(sep / "rounds.csv", TIMING)

    def evaluate_replies(grid: InlineGrid) -> list:
        return [m for m in grid.replies_seen if m.metadata.message_type == MessageType.EVALUATE]

    assert len(evaluate_replies(fold_grid)) == len(evaluate_replies(sep_grid)) >= 3 * 4
    assert not [m for m in fold_grid.replies_seen if m.has_content() and EVAL_RECORD in m.content.metric_records]
    assert all("mixture" not in m.content["metrics"] for m in evaluate_replies(fold_grid))


@pytest.mark.slow
def test_folded_evaluation_is_bit_identical_in_flowers_simulation_engine(tmp_path):
    """The same comparison through ``flwr.simulation.run_simulation`` (Ray actors, protobuf)."""
    from flwr.simulation import run_simulation

    from floral_flwr.client import make_client_app
    from floral_flwr.server import make_server_app

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    runs = {}
    for fold in (False, True):
        name = f"fold-{fold}"
        cfg = {**BASE, "fold-evaluation": fold, "output-dir": str(tmp_path), "run-name": name}
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_simulation(make_server_app(cfg), make_client_app(cfg), num_supernodes=6, backend_config=backend)
        runs[fold] = tmp_path / name
    assert _rows(runs[True] / "rounds.csv", TIMING) == _rows(runs[False] / "rounds.csv", TIMING)
    evaluated = _rows(runs[True] / "clients.csv")
    assert {r["round"] for r in evaluated} == {"1", "2", "3"}
    assert evaluated == _rows(runs[False] / "clients.csv")
