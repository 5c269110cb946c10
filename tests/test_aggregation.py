"""The FLoRAL aggregation rule against a hand-worked example, through the real strategy.

3 clients, 2 adaptors. Shared state: ``base.w`` (2,), ``adaptor.l.in`` (2, 1) (leading dim = C).

client  n_k  p_k         w_k = n_k p_k   base.w     adaptor.l.in
0       10   (1, 0)      (10, 0)         [1, 2]     [[1], [10]]
1       20   (.5, .5)    (10, 10)        [4, 8]     [[3], [20]]
2       30   (0, 1)      (0, 30)         [0, 0]     [[100], [40]]

base      = (10*[1,2] + 20*[4,8] + 30*[0,0]) / 60   = [1.5, 3.0]
adaptor 0 = (10*1 + 10*3 + 0*100) / 20              = 2.0
adaptor 1 = (0*10 + 10*20 + 30*40) / 40             = 35.0
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from floral_flwr.inline import InlineGrid
from floral_flwr.strategy import FloralAccumulator, aggregate_floral, build_strategy

CLIENTS = [
    dict(n=10, w=[10.0, 0.0], base=[1.0, 2.0], ad=[[1.0], [10.0]]),
    dict(n=20, w=[10.0, 10.0], base=[4.0, 8.0], ad=[[3.0], [20.0]]),
    dict(n=30, w=[0.0, 30.0], base=[0.0, 0.0], ad=[[100.0], [40.0]]),
]
INITIAL = {"base.w": np.array([0.5, 0.5], np.float32), "adaptor.l.in": np.array([[7.0], [7.0]], np.float32)}
EXPECTED = {"base.w": np.array([1.5, 3.0]), "adaptor.l.in": np.array([[2.0], [35.0]])}


def fake_client_app(mutate=None) -> ClientApp:
    """A ClientApp that answers with the table above (optionally tampered by ``mutate``)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord(
            {"client-id": k, "num-train-examples": CLIENTS[k]["n"], "true-cluster": -1})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": 5, "loss": 0.5, "accuracy": 0.5 + 0.1 * k, "client-id": k})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        c = CLIENTS[k]
        arrays = {"base.w": np.array(c["base"], np.float32), "adaptor.l.in": np.array(c["ad"], np.float32)}
        metrics = {"num-examples": c["n"], "train-loss": 1.0 + k, "adaptor-weights": c["w"], "client-id": k}
        if mutate is not None:
            arrays, metrics = mutate(k, arrays, metrics)
        content = RecordDict({"arrays": ArrayRecord({n: Array(v) for n, v in arrays.items()}),
                              "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app


def run_one_round(server_optimizer: str = "fedavg", mutate=None, **kw) -> tuple[dict, object]:
    strategy = build_strategy(
        server_optimizer, num_adaptors=2, metric="accuracy", seed=0, eval_every=10**6,
        num_rounds=1, fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3,
        node_wait_timeout=5, **kw,
    )
    grid = InlineGrid(fake_client_app(mutate), 3)
    result = strategy.start(grid, ArrayRecord({k: Array(v) for k, v in INITIAL.items()}), num_rounds=1)
    return {k: a.numpy() for k, a in result.arrays.items()}, strategy


def test_accumulator_matches_hand_computation():
    replies = [({"base.w": np.array(c["base"]), "adaptor.l.in": np.array(c["ad"])}, c["n"], c["w"]) for c in CLIENTS]
    out = aggregate_floral(INITIAL, replies, num_adaptors=2)
    np.testing.assert_allclose(out["base.w"], EXPECTED["base.w"], rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.l.in"], EXPECTED["adaptor.l.in"], rtol=1e-6)
    assert out["base.w"].dtype == np.float32


def test_adaptor_without_weight_keeps_previous_value():
    acc = FloralAccumulator(INITIAL, 2)
    acc.add({"base.w": np.ones(2), "adaptor.l.in": np.array([[5.0], [9.0]])}, 4, [4.0, 0.0])
    out = acc.result()
    assert out["adaptor.l.in"][0, 0] == pytest.approx(5.0)
    assert out["adaptor.l.in"][1, 0] == pytest.approx(7.0)  # nobody used adaptor 1: unchanged


def test_strategy_aggregates_hand_example():
    out, strategy = run_one_round()
    np.testing.assert_allclose(out["base.w"], EXPECTED["base.w"], rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.l.in"], EXPECTED["adaptor.l.in"], rtol=1e-6)
    assert strategy.stats.received == 3
    # train loss is the n-weighted mean: (10*1 + 20*2 + 30*3) / 60
    assert strategy.stats.train_loss == pytest.approx(140 / 60)
    assert strategy.stats.adaptor_totals == pytest.approx([20.0, 40.0])


def test_fedadam_changes_only_the_server_step():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    out, _ = run_one_round("fedadam", server_lr=eta)
    for key, agg in EXPECTED.items():
        x0 = INITIAL[key].astype(np.float64)
        delta = agg - x0  # pseudo-gradient of the FLoRAL aggregate
        m = (1 - b1) * delta
        v = (1 - b2) * delta**2
        eta_norm = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)  # server_round = 1
        expected = x0 + eta_norm * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(out[key], expected, rtol=1e-5)
        assert out[key].dtype == np.float32


def test_fedavgm_with_lr_one_and_no_momentum_is_plain_floral():
    out, _ = run_one_round("fedavgm", server_lr=1.0, server_momentum=0.0)
    np.testing.assert_allclose(out["adaptor.l.in"], EXPECTED["adaptor.l.in"], rtol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        lambda a, m: ({**a, "base.w": np.array([np.nan, 1.0], np.float32)}, m),  # NaN
        lambda a, m: ({**a, "base.w": np.array([1.0, 2.0, 3.0], np.float32)}, m),  # wrong shape
        lambda a, m: ({**a, "base.w": np.array([1.0, 2.0], np.float64)}, m),  # wrong dtype
        lambda a, m: ({**a, "mixture.logits": np.zeros(2, np.float32)}, m),  # private key
        lambda a, m: ({k: v for k, v in a.items() if k != "base.w"}, m),  # missing key
        lambda a, m: (a, {**m, "num-examples": 0}),  # non-positive n
        lambda a, m: (a, {**m, "num-examples": 10**12}),  # absurd n
        lambda a, m: (a, {**m, "adaptor-weights": [1.0]}),  # wrong length
        lambda a, m: (a, {**m, "adaptor-weights": [-5.0, 1.0]}),  # negative weight
        lambda a, m: (a, {**m, "adaptor-weights": [1e9, 1.0]}),  # weight > n
        lambda a, m: (a, {k: v for k, v in m.items() if k != "num-examples"}),  # missing key
    ],
)
def test_bad_reply_is_rejected_and_others_aggregate(bad):
    """Client 2 misbehaves: it is excluded; the aggregate is that of clients 0 and 1 alone."""

    def mutate(k, arrays, metrics):
        return bad(arrays, metrics) if k == 2 else (arrays, metrics)

    out, strategy = run_one_round(mutate=mutate)
    assert strategy.stats.rejected == 1 and strategy.stats.received == 2
    np.testing.assert_allclose(out["base.w"], (10 * np.array([1, 2]) + 20 * np.array([4, 8])) / 30, rtol=1e-6)
    np.testing.assert_allclose(out["adaptor.l.in"], [[(10 * 1 + 10 * 3) / 20], [20.0]], rtol=1e-6)


def test_error_reply_is_counted_and_round_continues():
    def mutate(k, arrays, metrics):
        if k == 1:
            raise RuntimeError("client crashed")
        return arrays, metrics

    out, strategy = run_one_round(mutate=mutate)
    assert strategy.stats.failures == 1 and strategy.stats.received == 2
    np.testing.assert_allclose(out["base.w"], (10 * np.array([1, 2])) / 40 + (30 * np.zeros(2)) / 40, rtol=1e-6)


def test_waiting_for_nodes_times_out_with_clear_message():
    from floral_flwr.strategy.nodes import NodeWaitTimeout

    strategy = build_strategy(
        "fedavg", num_adaptors=2, metric="accuracy", seed=0, eval_every=1, num_rounds=1,
        fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=5, node_wait_timeout=0.5,
    )
    grid = InlineGrid(fake_client_app(), 3)
    with pytest.raises(NodeWaitTimeout, match="min-available-nodes"):
        strategy.start(grid, ArrayRecord({k: Array(v) for k, v in INITIAL.items()}), num_rounds=1)


@pytest.mark.parametrize("keep, expected", [(4, 4), (None, 3 + 3 * 3 + 3)])
def test_inline_grid_keeps_a_bounded_number_of_replies(keep, expected):
    # every reply holds a client's whole state: a long run must not keep them all (3 discovery
    # replies + 3 rounds x 3 train replies + 3 evaluate replies of the last round here); the
    # newest are kept
    strategy = build_strategy("fedavg", num_adaptors=2, metric="accuracy", seed=0, eval_every=10**6,
                              num_rounds=3, fraction_train=1.0, fraction_evaluate=1.0,
                              min_available_nodes=3, node_wait_timeout=5)
    grid = InlineGrid(fake_client_app(), 3, keep_replies=keep)
    strategy.start(grid, ArrayRecord({k: Array(v) for k, v in INITIAL.items()}), num_rounds=3)
    assert len(grid.replies_seen) == expected
    assert [m.metadata.message_type for m in list(grid.replies_seen)[-4:]] == ["train"] + ["evaluate"] * 3
