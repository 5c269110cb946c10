"""Every field of every reply is checked before use: ids, counts, metric types, values."""

from __future__ import annotations

import numpy as np
import pytest

from floral_flwr.strategy.validation import (InvalidReply, check_client_id, check_discovery,
                                             validate_eval_metrics, validate_train_reply)

TEMPLATE = {"base.w": np.zeros((2, 3), np.float32), "base.bn.running_var": np.ones(3, np.float32),
            "base.bn.num_batches_tracked": np.array(0, np.int64), "adaptor.a": np.zeros((2, 3), np.float32)}


def _arrays(**over):
    out = {k: v.copy() for k, v in TEMPLATE.items()}
    out.update(over)
    return out


def _metrics(**over):
    return {"num-examples": 10, "train-loss": 0.5, "client-id": 3, "adaptor-weights": [4.0, 6.0], **over}


def test_a_clean_reply_passes():
    r = validate_train_reply(_arrays(), _metrics(), TEMPLATE, 2, max_examples=10, expected_client_id=3)
    assert r.num_examples == 10 and r.client_id == 3 and r.small and r.adaptor_weights.tolist() == [4.0, 6.0]


@pytest.mark.parametrize("cid", [float("inf"), float("nan"), 1e300, 10**40, -1, 2.5, True, "3", [3], None])
def test_client_ids_that_are_not_small_integers_are_refused(cid):
    """client-id = inf raised OverflowError (not caught) and killed the ServerApp."""
    with pytest.raises(InvalidReply, match="client-id"):
        validate_train_reply(_arrays(), _metrics(**{"client-id": cid}), TEMPLATE, 2)
    with pytest.raises(InvalidReply, match="client-id"):
        check_discovery({"client-id": cid, "num-train-examples": 5})


def test_a_reply_claiming_another_client_is_refused():
    with pytest.raises(InvalidReply, match="discovered as client 3"):
        validate_train_reply(_arrays(), _metrics(**{"client-id": 4}), TEMPLATE, 2, expected_client_id=3)


@pytest.mark.parametrize("n", [float("inf"), float("nan"), -5, 0, 11, 3e38, 10**30, "10", True])
def test_counts_above_the_servers_cap_or_not_numbers_are_refused(n):
    with pytest.raises(InvalidReply, match="num-examples"):
        validate_train_reply(_arrays(), _metrics(**{"num-examples": n}), TEMPLATE, 2, max_examples=10)


def test_the_servers_cap_not_the_clients_declaration_bounds_the_weight():
    validate_train_reply(_arrays(), _metrics(**{"num-examples": 10}), TEMPLATE, 2, max_examples=10)
    with pytest.raises(InvalidReply, match="cap 10"):
        validate_train_reply(_arrays(), _metrics(**{"num-examples": 11, "adaptor-weights": [5.0, 6.0]}),
                             TEMPLATE, 2, max_examples=10)


@pytest.mark.parametrize("w", [[1.0], [1.0, 2.0, 3.0], "x", [float("nan"), 1.0], [-1.0, 11.0], [0.0, 0.0],
                               [11.0, 0.0], [True, 1.0]])
def test_bad_adaptor_weights_are_refused(w):
    with pytest.raises(InvalidReply, match="adaptor-weights"):
        validate_train_reply(_arrays(), _metrics(**{"adaptor-weights": w}), TEMPLATE, 2)


def test_values_that_would_break_every_client_are_refused():
    with pytest.raises(InvalidReply, match="negative"):
        validate_train_reply(_arrays(**{"base.bn.running_var": -np.ones(3, np.float32)}), _metrics(), TEMPLATE, 2)
    with pytest.raises(InvalidReply, match="2\\*\\*53"):
        validate_train_reply(_arrays(**{"base.bn.num_batches_tracked": np.array(2**62)}), _metrics(), TEMPLATE, 2)
    with pytest.raises(InvalidReply, match="NaN or Inf"):
        validate_train_reply(_arrays(**{"base.w": np.full((2, 3), np.inf, np.float32)}), _metrics(), TEMPLATE, 2)
    with pytest.raises(InvalidReply, match="train-loss"):
        validate_train_reply(_arrays(), _metrics(**{"train-loss": [1.0]}), TEMPLATE, 2)


def test_finite_but_huge_values_are_accepted_and_flagged_for_wide_sums():
    r = validate_train_reply(_arrays(**{"base.w": np.full((2, 3), 3e38, np.float32)}), _metrics(), TEMPLATE, 2)
    assert not r.small


def test_discovery_replies_are_type_and_range_checked():
    assert check_discovery({"client-id": 2, "num-train-examples": 50, "num-partitions": 4}) == {
        "client-id": 2, "num-train-examples": 50.0, "true-cluster": -1, "holdout": 0, "num-partitions": 4}
    for bad in ({"client-id": 1, "num-train-examples": float("inf")},
                {"client-id": 1, "num-train-examples": -1},
                {"client-id": 1},
                {"client-id": 5, "num-train-examples": 5, "num-partitions": 4},
                {"client-id": 1, "num-train-examples": 5, "holdout": 7}):
        with pytest.raises(InvalidReply):
            check_discovery(bad)
    assert check_client_id(3, num_clients=4) == 3
    with pytest.raises(InvalidReply):
        check_client_id(4, num_clients=4)


def test_evaluation_metrics_must_be_in_their_ranges():
    ok = {"num-examples": 5, "loss": 0.3, "accuracy": 0.8, "client-id": 1, "true-cluster": 0, "mixture": [0.25, 0.75]}
    assert validate_eval_metrics(ok, "accuracy", 2)["accuracy"] == 0.8
    for key, value, match in (("accuracy", 1e30, "outside"), ("accuracy", -0.1, "outside"), ("loss", -1.0, "negative"),
                              ("mixture", [2.0, -1.0], "outside"), ("client-id", float("inf"), "client-id"),
                              ("holdout", 2, "holdout"), ("accuracy", "0.9", "number")):
        with pytest.raises(InvalidReply, match=match):
            validate_eval_metrics({**ok, key: value}, "accuracy", 2)
