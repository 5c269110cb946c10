"""Real processes on loopback: SuperLink + SuperNodes + ``flwr run``, with faults.

1. ``test_supernode_killed_mid_round_rejoins_with_state_and_bad_client_is_rejected`` (default
   suite): 3 SuperNodes, one of them misbehaving (test-only node config ``fault``); a SuperNode is
   SIGKILLed at the start of round 2 and restarted. The round completes with the others after
   ``reply-timeout``, the failure and the rejections are logged with node ids, the run finishes,
   and the restarted node rejoins (the final evaluation) with the state from its state-dir.
2. ``test_superlink_killed_mid_run_resumes_from_last_round`` (slow): the SuperLink (and with it
   the ServerApp) is SIGKILLed after round 1, restarted on the same port, and the run is
   resubmitted with ``resume=true``: rounds 1..2 each recorded once.
3. ``test_tls_and_supernode_auth_end_to_end`` (slow): TLS + SuperNode authentication, an
   unregistered key and a wrong CA are refused with clear errors in bounded time.
4. ``test_secure_aggregation_survives_a_dropout_in_deployment`` (slow): the default
   ``aggregation='secagg'`` on 3 SuperNodes, one of which drops out of every secure exchange after
   the key sharing (test-only node config ``secagg-drop-at``): every round completes with the two
   others, the dropout is logged with its node id and stage.

Every process is stopped by its recorded PID/process group; the tests check none is left.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from floral_flwr import deploy
from floral_flwr.deploy import Deployment
from floral_flwr.deploy.processes import _is_zombie
from floral_flwr.results import load_npz

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 420


def _run_config(out: Path, name: str, **kw) -> str:
    cfg = {"task": "'digits-label-shift'", "num-server-rounds": 3, "eval-every": 3, "batch-size": 16,
           "output-dir": f"'{out}'", "run-name": f"'{name}'", "min-available-nodes": 2,
           "node-wait-timeout": 90.0, "reply-timeout": 60.0,
           "aggregation": "'mean'", **kw}  # plaintext: the fault tests look at single replies
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def _rounds(run_dir: Path) -> list[dict]:
    p = run_dir / "rounds.csv"
    return list(csv.DictReader(p.open())) if p.exists() else []


def _wait_for_round(run_dir: Path, rnd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_rounds(run_dir)) >= rnd:
            return
        time.sleep(0.5)
    raise TimeoutError(f"round {rnd} not recorded in {run_dir} within {timeout} s")


def _assert_all_gone(pids: list[int]) -> None:
    left = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
    assert not left, f"processes left behind: {left}"


def _tree(d: Deployment) -> list[int]:
    pids = d.pids()
    for p in list(pids):
        pids += deploy.descendants(p)
    return pids


def test_supernode_killed_mid_round_rejoins_with_state_and_bad_client_is_rejected(tmp_path):
    out = tmp_path / "out"
    seen: list[int] = []
    d = Deployment(tmp_path / "w", num_supernodes=3, num_partitions=4, state_root=tmp_path / "state",
                   node_extra={2: {"fault": "nan,shape"}}, max_wait_time=60)
    with d:
        run_id = d.submit(ROOT, _run_config(out, "kill-node", **{"reply-timeout": 120.0, "num-server-rounds": 2,
                                                                "eval-every": 2}))
        _wait_for_round(out / "kill-node", 1, RUN_TIMEOUT)
        seen += _tree(d)
        deploy.kill_proc(d.nodes[1])  # SIGKILL node 1 (+ its ClientApp) as round 2 starts
        d.start_node(1)  # comes back with the same state-dir, gets a new node id
        status, details = d.wait(run_id, RUN_TIMEOUT)
        seen += _tree(d)
        log = d.run_log(run_id)
        node_logs = {i: p.log.read_text(errors="replace") for i, p in d.nodes.items()}
    _assert_all_gone(seen)
    assert status == "finished:completed", (status, details, log[-3000:])
    rows = _rounds(out / "kill-node")
    assert [int(r["round"]) for r in rows] == [1, 2]
    # the misbehaving node: rejected every round, logged with its node id, model stays finite
    assert [int(r["rejected"]) for r in rows] == [1, 1]
    bad = [line for line in log.splitlines() if "rejected reply from node" in line]
    assert len(bad) == 2 and len({line.split("from node ")[1].split(":")[0] for line in bad}) == 1
    assert "contains NaN or Inf" in bad[0] and "differs from the expected" in bad[1]
    # round 2 completed without the killed node 1 (the missing reply is a logged failure) ...
    assert int(rows[0]["received"]) == 2 and int(rows[1]["received"]) == 1
    # (logged as a missing reply after reply-timeout, or as "node unavailable" once the SuperLink
    # notices the missed heartbeats, whichever comes first)
    assert int(rows[1]["failures"]) == 1
    assert "within the reply timeout" in log or "round 2: node" in log
    # ... and the restarted node 1 rejoined (new node id) with the state from its state-dir
    assert "restarted or replaced" in log
    assert "private state of round 1 restored from" in node_logs[1]
    clients = list(csv.DictReader((out / "kill-node" / "clients.csv").open()))
    assert sorted(int(r["client-id"]) for r in clients) == [0, 1, 2]
    meta = json.loads((out / "kill-node" / "checkpoint" / "meta.json").read_text())
    final = load_npz(out / "kill-node" / "checkpoint" / f"state-{meta['round']:06d}.npz")
    assert meta["round"] == 2 and all(np.isfinite(v).all() for v in final.values())
    summary = json.loads((out / "kill-node" / "summary.json").read_text())
    assert summary["rejected"] == 2 and summary["failures"] == 1


@pytest.mark.slow
def test_secure_aggregation_survives_a_dropout_in_deployment(tmp_path):
    out = tmp_path / "out"
    d = Deployment(tmp_path / "w", num_supernodes=3, num_partitions=4, state_root=tmp_path / "state",
                   node_extra={2: {"secagg-drop-at": "collect_masked_vectors"}}, max_wait_time=60)
    with d:
        run_id = d.submit(ROOT, _run_config(out, "secure", **{"aggregation": "'secagg'", "num-server-rounds": 2,
                                                              "eval-every": 2}))
        status, details = d.wait(run_id, 2 * RUN_TIMEOUT)
        seen = _tree(d)
        log = d.run_log(run_id)
    _assert_all_gone(seen)
    assert status == "finished:completed", (status, details, log[-3000:])
    rows = _rounds(out / "secure")
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(int(r["received"]) == 2 and int(r["failures"]) == 1 for r in rows)
    dropped = [ln for ln in log.splitlines() if "left secure aggregation" in ln]
    # the node drops out of every exchange at that stage: both train rounds (and the last round's
    # secure ARI tally, when it is logged before the run ends)
    assert len([ln for ln in dropped if "(train)" in ln]) == 2
    assert all("'collect_masked_vectors'" in ln and "secagg-drop-at" in ln for ln in dropped)
    assert rows[-1]["cluster-ari"] != ""  # the secure tally ran with the live nodes
    meta = json.loads((out / "secure" / "checkpoint" / "meta.json").read_text())
    final = load_npz(out / "secure" / "checkpoint" / f"state-{meta['round']:06d}.npz")
    assert all(np.isfinite(v).all() for v in final.values())


@pytest.mark.slow
def test_superlink_killed_mid_run_resumes_from_last_round(tmp_path):
    out = tmp_path / "out"
    seen: list[int] = []
    d = Deployment(tmp_path / "w", num_supernodes=2, num_partitions=4, state_root=tmp_path / "state",
                   max_wait_time=180, database=True)  # the SuperLink's state survives its restart
    with d:
        two = {"num-server-rounds": 2, "eval-every": 2}
        d.submit(ROOT, _run_config(out, "kill-link", **two))
        _wait_for_round(out / "kill-link", 1, RUN_TIMEOUT)
        seen += _tree(d)
        deploy.kill_proc(d.superlink)  # the SuperLink and its ServerApp die mid-run
        assert len(_rounds(out / "kill-link")) == 1
        d.start_link()  # same port and database: the SuperNodes reconnect on their own
        run_id = d.submit(ROOT, _run_config(out, "kill-link", resume="true", **two))
        status, details = d.wait(run_id, RUN_TIMEOUT)
        seen += _tree(d)
        log = d.run_log(run_id)
        node_logs = [p.log.read_text(errors="replace") for p in d.nodes.values()]
    _assert_all_gone(seen)
    assert status == "finished:completed", (status, details, log[-3000:])
    assert "resuming after round" in log
    rows = _rounds(out / "kill-link")
    assert [int(r["round"]) for r in rows] == [1, 2]  # none lost, none double-counted
    meta = json.loads((out / "kill-link" / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 2
    # a new run: Flower's context.state is empty, the clients continue from their state-dir
    assert all("restored from" in text for text in node_logs)


@pytest.mark.slow
def test_tls_and_supernode_auth_end_to_end(tmp_path):
    certs = deploy.make_certs(tmp_path / "certs", num_nodes=2)
    wrong = deploy.make_certs(tmp_path / "other-ca", num_nodes=0)
    out = tmp_path / "out"
    seen: list[int] = []
    d = Deployment(tmp_path / "w", num_supernodes=1, num_partitions=4, certs=certs, auth=True,
                   state_root=tmp_path / "state", max_wait_time=60)
    with d:
        # an unregistered key is refused by the SuperLink: the SuperNode exits, no hang
        intruder = deploy.start_supernode(d.work, 1, d.address, {"partition-id": 1, "num-partitions": 4,
                                                                 "state-dir": str(tmp_path / "s1")},
                                          certs=certs, auth_key=certs.node_key(1), max_wait_time=20)
        # a SuperNode that does not trust the SuperLink's certificate gives up after max-wait-time
        mistrust = deploy.start_supernode(d.work, 2, d.address, {"partition-id": 2, "num-partitions": 4,
                                                                 "state-dir": str(tmp_path / "s2")},
                                          ca=wrong.ca, max_wait_time=5)
        seen += _tree(d) + [p.pid for x in (intruder, mistrust) for p in (x, *x.companions)]
        try:
            assert intruder.popen.wait(timeout=120) != 0
            assert mistrust.popen.wait(timeout=120) != 0
        finally:
            deploy.stop_proc(intruder)
            deploy.stop_proc(mistrust)
        # the CLI with the wrong CA fails with an error instead of hanging
        bad_cli = deploy.write_connection(tmp_path / "badcli", d.address, wrong.ca)
        status, details = deploy.run_status(bad_cli, "1")
        assert status == "unknown" and details
        run_id = d.submit(ROOT, _run_config(out, "tls", **{"num-server-rounds": 1, "eval-every": 1,
                                                          "min-available-nodes": 1}))
        status, details = d.wait(run_id, RUN_TIMEOUT)
        seen += _tree(d)
        log = d.run_log(run_id)
    _assert_all_gone(seen)
    assert "Failed to activate SuperNode" in intruder.log.read_text(errors="replace") or \
        "305" in intruder.log.read_text(errors="replace")
    assert status == "finished:completed", (status, details, log[-3000:])
    assert [int(r["received"]) for r in _rounds(out / "tls")] == [1]
