"""Malicious replies through the real ClientApp's wire format, and real faults, end to end.

The battery (``tests/adversary.py``) rewrites client 0's real reply (weights, values, raw
``.npy`` bytes, ids, metric types) and round-trips it through Flower's protobuf serialization;
the strategy's own ``aggregate_train`` / discovery / evaluation must drop it with a logged reason
(``rejected``) or accept it with a bounded effect (``bounded``), never raise (``crash``) or let
it take the model over / make it non-finite (``loss``). Then whole runs on the inline engine: a
run that trains nothing stops with a message naming the cause, an impersonating node is refused,
a full disk mid-run loses nothing, an attacker under each robust mode leaves a finite model.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adversary as A  # noqa: E402

from floral_flwr.inline import run_inline  # noqa: E402
from floral_flwr.rundir import CheckpointWriteError, RunFailed  # noqa: E402

# accepted with a bounded effect under robust=none: finite values (the weight is capped, the
# value is not: that is what robust modes are for) and adaptor weights each <= n_k (FedEM's rule
# puts n_k on every component, so the server cannot ask sum_c w_k(c) <= n_k of every method)
BOUNDED_UNDER_NONE = {"values 3e38", "values -3e38", "values 1e20", "adaptor weights > n"}


@pytest.fixture(scope="module")
def honest():
    return A.honest_round()


@pytest.fixture(scope="module")
def train_outcomes(honest):
    return {name: (cat, outcome, detail) for cat, name, outcome, detail in A.run_train_battery(honest)}


@pytest.mark.parametrize("attack", list(A.TRAIN_ATTACKS))
def test_every_malicious_train_reply_is_rejected_or_bounded(train_outcomes, attack):
    _, outcome, detail = train_outcomes[attack]
    expected = "bounded" if attack in BOUNDED_UNDER_NONE else "rejected"
    assert outcome == expected, f"{attack}: {outcome} {detail}"


def test_the_weight_takeover_of_the_issue_is_refused(honest, caplog):
    """num-examples = 1e9 made the global base exactly the attacker's arrays."""
    original = next(r for r in honest.replies if r.metadata.src_node_id == honest.attacker)
    evil = A.rebuilt(original, A.poison(original), {"num-examples": 1e9,
                                                     "adaptor-weights": A._weights_times(original, 1e9 / A._n(original))})
    out, stats = A.aggregate(honest, [evil if r is original else r for r in honest.replies])
    assert stats.rejected == 1 and stats.received == A.NUM_CLIENTS - 1
    assert f"rejected reply from node {honest.attacker}" in caplog.text and "server's cap" in caplog.text
    assert not any(np.allclose(v, A.POISON) for k, v in out.items() if v.dtype.kind == "f" and v.size > 1)


def test_finite_extreme_values_cannot_make_the_global_state_infinite(honest):
    original = next(r for r in honest.replies if r.metadata.src_node_id == honest.attacker)
    big = {k: (np.full_like(v, 3e38) if v.dtype.kind == "f" else v) for k, v in A._arrays(original).items()}
    out, stats = A.aggregate(honest, [A.rebuilt(original, big) if r is original else r for r in honest.replies])
    assert stats.received == A.NUM_CLIENTS and all(np.isfinite(v).all() for v in out.values())


def test_discovery_attacks_are_refused(honest):
    for cat, name, outcome, detail in A.run_discovery_battery(honest):
        assert outcome == "rejected", f"{name}: {outcome} {detail}"


def test_evaluation_attacks_are_refused(honest):
    for cat, name, outcome, detail in A.run_eval_battery(honest):
        assert outcome == "rejected", f"{name}: {outcome} {detail}"


@pytest.mark.parametrize("robust", ["clip", "trimmed-mean", "median"])
def test_robust_modes_bound_what_one_accepted_client_can_do(honest, robust):
    """A finite, capped, well-formed reply with a huge update: under 'none' it moves the model by
    its weight share times the update; each robust mode keeps the aggregate within two honest
    rounds' steps of the honest aggregate (a trimmed mean also drops honest weight at the other
    end, a median moves to another honest client's value)."""
    rnd = A.with_discovery(honest, None, robust=robust)
    original = next(r for r in rnd.replies if r.metadata.src_node_id == rnd.attacker)
    initial = {k: np.array(a.numpy(), dtype=np.float64) for k, a in rnd.initial.items()}
    boosted = {k: (np.asarray(initial[k] - 1e6 * (v - initial[k]), v.dtype) if v.dtype.kind == "f" else v)
               for k, v in A._arrays(original).items()}
    evil = A.rebuilt(original, boosted)
    honest_agg, _ = A.aggregate(rnd, rnd.replies)
    out, stats = A.aggregate(rnd, [evil if r is original else r for r in rnd.replies])
    assert stats.received == A.NUM_CLIENTS  # accepted: it is well-formed and within its cap
    step = A._distance(honest_agg, initial)
    assert A._distance(out, honest_agg) < 2 * step, robust
    plain, _ = A.aggregate(A.with_discovery(honest, None), [evil if r is original else r for r in rnd.replies])
    assert A._distance(plain, honest_agg) > 1e3 * step  # what the same reply does under 'none'


def test_clip_bounds_a_boosted_client_under_sum_only_too():
    """Sum-only replies are n_k x_k: a client can scale its whole reply. The caps still bound
    n_k, and clip bounds n_k (x_k - g) to n_k tau, so the same reply is harmless there."""
    run = {"aggregation": "sum-only"}
    base = A.honest_round(run)
    original = next(r for r in base.replies if r.metadata.src_node_id == base.attacker)
    evil = A.rebuilt(original, {k: (1e4 * v if v.dtype.kind == "f" else v) for k, v in A._arrays(original).items()})
    replies = [evil if r is original else r for r in base.replies]
    initial = {k: np.array(a.numpy(), dtype=np.float64) for k, a in base.initial.items()}
    honest_agg, _ = A.aggregate(base, base.replies)
    step = A._distance(honest_agg, initial)
    plain, stats = A.aggregate(base, replies)
    assert stats.received == A.NUM_CLIENTS and A._distance(plain, honest_agg) > 1e2 * step
    clipped_rnd = A.with_discovery(base, None, run=run, robust="clip")
    clipped, stats = A.aggregate(clipped_rnd, replies)
    assert stats.received == A.NUM_CLIENTS and A._distance(clipped, honest_agg) < step


# ------------------------------------------------------------------ whole runs


def _cfg(tmp_path, name, **kw):
    # the plaintext wire: these attacks replace single replies, which the server sees only there
    return {"task": "synthetic-linear", "num-server-rounds": 3, "eval-every": 1, "output-dir": str(tmp_path),
            "run-name": name, "min-available-nodes": 1, "aggregation": "mean", **kw}


def test_a_run_that_trains_nothing_stops_loudly_naming_the_cause(tmp_path):
    def every_train_reply_fails(node, reply):
        return A.as_error(reply, "RuntimeError: Error(s) in loading state_dict") if \
            reply.metadata.message_type == "train" else reply

    with pytest.raises(RunFailed, match="round 1 accepted no reply .*4 failed.*first cause: node \\d+ failed: "
                                        "RuntimeError: Error\\(s\\) in loading state_dict"):
        run_inline(_cfg(tmp_path, "nothing"), 4, reply_hook=every_train_reply_fails)
    assert not (tmp_path / "nothing" / "summary.json").exists()  # not "completed"
    assert not (tmp_path / "nothing" / "rounds.csv").exists()


def test_a_run_whose_replies_are_all_rejected_stops_too(tmp_path):
    def all_poisoned(node, reply):
        if reply.metadata.message_type != "train":
            return reply
        return A.rebuilt(reply, metrics={"num-examples": 1e9})

    with pytest.raises(RunFailed, match="accepted no reply .*4 rejected.*first cause: rejected node \\d+: "
                                        "num-examples = 1e\\+09 exceeds the server's cap"):
        run_inline(_cfg(tmp_path, "rejected"), 4, reply_hook=all_poisoned)


def test_a_node_claiming_a_served_partition_is_refused_naming_both(tmp_path, caplog):
    """Node 4 says it is client 0: the honest node 0 keeps serving it; the run goes on."""
    summary, grid = run_inline(_cfg(tmp_path, "impostor", **{"num-server-rounds": 2}), 5,
                               node_config=lambda k: {"partition-id": 0, "num-partitions": 5} if k == 4 else {})
    honest_node, impostor = sorted(grid.contexts)[0], sorted(grid.contexts)[4]
    assert f"node {impostor} claims client 0, which node {honest_node} serves: refused" in caplog.text
    trained = [r for r in grid.replies_seen if r.metadata.message_type == "train"]
    assert impostor not in {r.metadata.src_node_id for r in trained}
    assert summary["failures"] == 0 and summary["rejected"] == 0


@pytest.mark.parametrize("robust", ["none", "clip", "trimmed-mean", "median"])
def test_an_attacker_under_each_robust_mode_leaves_a_finite_checkpointed_model(tmp_path, robust):
    """Client 0 sends a sign-flipped update boosted 1e3x every round (well-formed, its own
    weight). The run finishes or stops loudly; no checkpoint holds a non-finite state."""
    def flip(node, reply):
        if reply.metadata.message_type != "train" or reply.has_error() \
                or int(reply.content["metrics"]["client-id"]) != 0:
            return reply
        return A.rebuilt(reply, {k: (-1e3 * v if v.dtype.kind == "f" else v) for k, v in A._arrays(reply).items()})

    try:
        run_inline(_cfg(tmp_path, robust, robust=robust, **{"num-server-rounds": 3}), 6, reply_hook=flip)
    except RunFailed as exc:
        assert robust == "none" and "accepted no reply" in str(exc)  # clients diverged: stopped loudly
    ck = tmp_path / robust / "checkpoint"
    for state in ck.glob("state-*.npz"):
        with np.load(state) as z:
            assert all(np.isfinite(z[k]).all() for k in z.files)
    if robust != "none":
        assert json.loads((tmp_path / robust / "summary.json").read_text())["final"]


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("8m")


def test_a_disk_that_fills_mid_run_stops_it_and_resume_loses_nothing(small_disk):
    """The disk fills during round 2: one message naming the file, round 1's results and
    checkpoint intact; after space is freed, resume finishes with every round exactly once."""
    junk = small_disk / "junk"

    def fill_in_round_2(node, reply):
        if reply.metadata.message_type == "train" and not junk.exists() and \
                (small_disk / "r" / "checkpoint" / "meta.json").exists():
            free = subprocess.run(["df", "--output=avail", "-B1", str(small_disk)], capture_output=True,
                                  text=True).stdout.split()[-1]
            with junk.open("wb") as f:  # leave a few bytes: the next write fails
                f.write(b"\0" * max(int(free) - 512, 0))
        return reply

    cfg = _cfg(small_disk, "r", **{"persist-client-state": False})
    with pytest.raises(CheckpointWriteError, match="No space left on device.*round 1 is intact"):
        run_inline(cfg, 4, reply_hook=fill_in_round_2)
    assert json.loads((small_disk / "r" / "checkpoint" / "meta.json").read_text())["round"] == 1
    junk.unlink()
    summary, _ = run_inline({**cfg, "resume": True}, 4)
    rows = list(csv.DictReader((small_disk / "r" / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3] and summary["final"]["round"] == 3
