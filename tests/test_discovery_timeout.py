"""Discovery under a slow federation: the query waits the run's reply-timeout (not a fixed 120 s),
nodes that stay silent are named in a warning (a smaller sample is never silent), and a
federation where no node answers stops with one message instead of running on nothing."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from floral_flwr.client import make_client_app
from floral_flwr.inline import InlineGrid
from floral_flwr.strategy.nodes import ClientDirectory, ClientSetupError
from floral_flwr.strategy.optimizers import build_strategy

RUN = {"task": "digits-label-shift", "method": "floral", "persist-client-state": False, "aggregation": "mean"}


class SlowGrid(InlineGrid):
    """Some nodes never answer a query within the exchange; records each exchange's timeout."""

    def __init__(self, *a, silent: set[int] | None = None, **k) -> None:
        super().__init__(*a, **k)
        self.silent_nodes = silent or set()
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.timeouts.append(timeout)
        kept = [m for m in messages if not (m.metadata.message_type == "query"
                                             and m.metadata.dst_node_id in self.silent_nodes)]
        return super().send_and_receive(kept, timeout=timeout)


def _grid(n: int = 4, silent_idx: tuple[int, ...] = ()) -> SlowGrid:
    grid = SlowGrid(make_client_app(RUN), n, run_config=RUN)
    nodes = sorted(grid.get_node_ids())
    grid.silent_nodes = {nodes[i] for i in silent_idx}
    return grid


def test_silent_nodes_are_named_and_asked_again(caplog):
    grid = _grid(4, silent_idx=(1, 3))
    directory = ClientDirectory()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        directory.discover(grid, timeout=7.0)
    assert len(directory.client_ids) == 2
    assert any("2 of 4 node(s) did not answer within 7 s" in r.getMessage() and "reply-timeout" in r.getMessage()
               for r in caplog.records)
    grid.silent_nodes = set()
    directory.discover(grid, timeout=7.0)  # they answer now: learned on the next round's discovery
    assert len(directory.client_ids) == 4


def test_no_answer_at_all_stops_with_one_message():
    grid = _grid(3, silent_idx=(0, 1, 2))
    with pytest.raises(ClientSetupError, match=r"none of the 3 connected node\(s\) answered .* 'reply-timeout'"):
        ClientDirectory().discover(grid, timeout=5.0)


def test_the_strategy_gives_discovery_the_runs_reply_timeout():
    grid = _grid(4)
    strategy = build_strategy("fedavg", num_adaptors=4, metric="accuracy", seed=0, eval_every=100, num_rounds=1,
                              fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=1, node_wait_timeout=10)
    from floral_flwr.config import parse_run_config
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import task_info
    from floral_flwr.wire import to_array

    cfg = parse_run_config(RUN)
    handle = build_handle(cfg, task_info(cfg.task).build_model)
    arrays = ArrayRecord({k: to_array(v.detach().numpy()) for k, v in handle.shared_state_dict().items()})
    strategy.start(grid, arrays, num_rounds=1, timeout=1234.0, train_config=ConfigRecord({}),
                   evaluate_config=ConfigRecord({}))
    assert grid.timeouts[0] == 1234.0  # the first exchange of a run is the discovery query
