"""Deployment lockdown: only the Fleet API faces the network, a SuperNode keeps its state in a
directory of its own (namespaced by run), and the server cannot choose where a node writes."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from floral_flwr import deploy
from floral_flwr.deploy import DeployError
from floral_flwr.deploy.gateway import FleetGateway, Refused, check_request_head


def _head(line: str, *headers: str) -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode()


def test_the_gateway_forwards_only_fleet_requests():
    head, n = check_request_head(_head("POST /v1/fleet/pull-messages HTTP/1.1", "Host: x", "Content-Length: 12",
                                       "Connection: keep-alive"))
    assert n == 12 and head.endswith(b"Connection: close\r\n\r\n") and b"keep-alive" not in head
    assert check_request_head(_head("GET /health HTTP/1.1", "Host: x"))[1] == 0
    for line in ("POST /v1/control/start-run HTTP/1.1", "POST /v1/runtime/pull-app-inputs HTTP/1.1",
                 "GET /v1/fleet/pull-messages HTTP/1.1", "POST http://x/v1/fleet/pull-messages HTTP/1.1",
                 "POST /v1/fleet/../control/start-run HTTP/1.1", "POST /v1/fleet/pull-messages?x=1 HTTP/1.1",
                 "GET /docs HTTP/1.1"):
        with pytest.raises(Refused) as err:
            check_request_head(_head(line, "Host: x"))
        assert err.value.status == 403, line
    for headers in (("Transfer-Encoding: chunked",), ("Content-Length: 5", "Content-Length: 6"),
                    ("Content-Length: -1",), (" Content-Length: 5",)):
        with pytest.raises(Refused) as err:
            check_request_head(_head("POST /v1/fleet/push-messages HTTP/1.1", *headers))
        assert err.value.status == 400, headers


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, bytes]] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Recorder.seen.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST

    def log_message(self, *args):
        pass


def test_a_live_gateway_refuses_control_calls_and_smuggled_requests():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gw = FleetGateway(("127.0.0.1", 0), ("127.0.0.1", upstream.server_address[1])).start()
    base = f"http://127.0.0.1:{gw.port}"
    try:
        _Recorder.seen.clear()
        with urllib.request.urlopen(urllib.request.Request(base + "/v1/fleet/pull-messages", data=b"abc")) as r:
            assert r.read() == b"ok"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(base + "/v1/control/start-run", data=b"run"))
        assert err.value.code == 403
        # a second request riding on an allowed one's connection is never forwarded
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
                      b"POST /v1/control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1") and b"ok" in reply
        assert [(m, p, b) for m, p, b in _Recorder.seen] == [
            ("POST", "/v1/fleet/pull-messages", b"abc"), ("POST", "/v1/fleet/push-messages", b"xyz")]
        assert gw.refused == 1 and gw.forwarded == 2
    finally:
        gw.close()
        upstream.shutdown()


def test_a_real_superlink_behind_the_gateway_keeps_the_control_api_on_loopback(tmp_path):
    """flower-superlink listens on 127.0.0.1; through the public (gateway) address the health
    check and the Fleet API answer, the Control API does not."""
    link = deploy.start_superlink(tmp_path, fleet_gateway=True, tie_to_parent=True)
    try:
        fleet = link.info["fleet-address"]
        control = link.info["address"]
        assert fleet != control and control.startswith("127.0.0.1:")
        with urllib.request.urlopen(f"http://{fleet}/health", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"http://{fleet}/v1/control/list-runs", data=b""), timeout=10)
        assert err.value.code == 403
        # the same call on the SuperLink's own loopback address reaches Flower's Control API
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://{control}/v1/control/list-runs", data=b""),
                                   timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code != 403 and b"only the Fleet API" not in exc.read()
        pids = [link.pid] + [c.pid for c in link.companions]
    finally:
        deploy.stop_proc(link)
    assert all(not deploy.processes.Path(f"/proc/{p}").exists() or deploy.processes._is_zombie(p) for p in pids)


def test_a_supernode_needs_a_state_dir_of_its_own(tmp_path):
    with pytest.raises(DeployError, match="needs a 'state-dir'"):
        deploy.check_node_config({"partition-id": 0, "num-partitions": 2})
    out = subprocess.run([sys.executable, "-m", "floral_flwr.deploy", "supernode", "--work", str(tmp_path),
                          "--index", "0", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                          "--num-partitions", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "state-dir" in out.stderr


# ------------------------------------------------------------------ where a node writes


def _client_round(node: dict, config: dict, pid: int = 1):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from floral_flwr.client import make_client_app
    from floral_flwr.config import parse_run_config
    from floral_flwr.inline import InlineGrid
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import get_task
    from floral_flwr.wire import to_array

    run = {"task": "digits-label-shift", "batch-size": 16, "mixture-lr": 5.0, "aggregation": "mean"}
    cfg = parse_run_config(run)
    handle = build_handle(cfg, get_task(cfg.task, num_clients=8, seed=0).build_model)
    arrays = ArrayRecord({k: to_array(v.detach().numpy()) for k, v in handle.shared_state_dict().items()})
    InlineGrid(make_client_app(), 0)
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})}),
                  dst_node_id=42, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=42, node_config={"partition-id": pid, "num-partitions": 8, **node},
                  state=RecordDict(), run_config={})
    return make_client_app(run)(msg, ctx)


def test_node_state_is_namespaced_by_app_and_run(tmp_path):
    for run in ("run-a", "run-b"):
        assert not _client_round({"state-dir": str(tmp_path)}, {"run-key": run}).has_error()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("round-*.npz"))
    assert files == ["floral-flwr/run-a/client-1/round-000001.npz", "floral-flwr/run-b/client-1/round-000001.npz"]


def test_the_server_cannot_choose_where_a_node_writes(tmp_path):
    target = tmp_path / "elsewhere"
    # a node with a state-dir ignores the server's suggestion
    reply = _client_round({"state-dir": str(tmp_path / "node")}, {"client-state-dir": str(target), "run-key": "r"})
    assert not reply.has_error() and not target.exists()
    # a node without one uses it only inside a run directory the server created on this machine
    reply = _client_round({}, {"client-state-dir": str(target / "client-state")})
    assert not reply.has_error() and not target.exists()
    # and a run key that would leave the state-dir is refused
    for key in ("..", "../../etc", "a/b"):  # (the ClientApp runtime turns this into an error reply)
        with pytest.raises(ValueError, match="run-key"):
            _client_round({"state-dir": str(tmp_path / "node")}, {"run-key": key})
    assert {p.name for p in (tmp_path / "node" / "floral-flwr").iterdir()} == {"r"}


def test_the_simulation_run_directory_is_accepted(tmp_path):
    from floral_flwr.rundir import claim_run_dir

    run = claim_run_dir(tmp_path / "sim-run", {}, resume=False, auto_named=False)
    try:
        reply = _client_round({}, {"client-state-dir": str(run.path / "client-state")})
        assert not reply.has_error()
        saved = list((run.path / "client-state" / "client-1").glob("round-*.npz"))
        assert len(saved) == 1
        with np.load(saved[0]) as z:
            assert "mixture.logits" in z.files
    finally:
        run.release()


@pytest.mark.slow
def test_a_run_through_the_fleet_gateway_with_tls_and_auth(tmp_path):
    """SuperNodes reach the SuperLink only through the gateway (TLS with the SuperLink's own
    certificate, SuperNode authentication headers passed through); the run completes, and the
    Control API is refused on the public address while it works on the SuperLink host."""
    import ssl
    from pathlib import Path

    from floral_flwr.deploy import Deployment

    root = Path(__file__).resolve().parents[1]
    certs = deploy.make_certs(tmp_path / "certs", num_nodes=2)
    out = tmp_path / "out"
    d = Deployment(tmp_path / "w", num_supernodes=2, num_partitions=2, certs=certs, auth=True,
                   fleet_gateway=True, max_wait_time=60)
    with d:
        assert d.fleet_address != d.address
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"https://{d.fleet_address}/v1/control/list-runs",
                                                          data=b""), timeout=30, context=ctx)
        assert err.value.code == 403
        cfg = (f"task='synthetic-linear' num-server-rounds=1 eval-every=1 output-dir='{out}' run-name='gw' "
               f"min-available-nodes=2 node-wait-timeout=120.0 reply-timeout=120.0")
        run_id = d.submit(root, cfg)  # the flwr CLI talks to the loopback Control API
        status, details = d.wait(run_id, 420)
        gateway = next(c for c in d.superlink.companions if c.name == "fleet-gateway")  # (also: the warm executor)
    assert status == "finished:completed", (status, details, d.run_log(run_id)[-3000:])
    assert "fleet gateway on" in gateway.log.read_text()
