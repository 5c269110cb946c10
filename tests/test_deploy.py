"""Deployment helpers (floral_flwr.deploy) without a federation: settings are checked with clear
errors, insecure mode is loopback-only, certificates are generated, processes are stopped by
their recorded PID/process group, an unreachable SuperLink ends a SuperNode in bounded time."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from floral_flwr import deploy
from floral_flwr.deploy import DeployError
from floral_flwr.deploy.cli import _parse_node_config
from floral_flwr.deploy.processes import _is_zombie, _spawn
from floral_flwr.deploy.settings import NodeRuntime, _env
from floral_flwr.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                     ("0.0.0.0", False), ("10.1.2.3", False), ("link.example.org", False)])
def test_insecure_mode_is_loopback_only(host, ok):
    assert deploy.is_loopback(host) is ok
    if ok:
        deploy.check_insecure(host, False, "SuperLink")
    else:
        with pytest.raises(DeployError, match="insecure mode .* refused"):
            deploy.check_insecure(host, False, "SuperLink")


def test_insecure_remote_needs_the_flag_and_then_warns(capsys, tmp_path):
    deploy.check_insecure("0.0.0.0", True, "SuperLink")
    assert "INSECURE" in capsys.readouterr().err
    with pytest.raises(DeployError, match="refused"):  # refused before anything is started
        deploy.start_superlink(tmp_path, host="0.0.0.0")
    with pytest.raises(DeployError, match="needs TLS"):
        deploy.start_superlink(tmp_path, auth=True)
    assert not (tmp_path / "pids").exists()


def test_node_config_errors_name_the_setting(tmp_path):
    with pytest.raises(DeployError, match="'data-path' = .* does not exist"):
        deploy.check_node_config({"data-path": str(tmp_path / "nope")})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DeployError, match="'state-dir' = .* is not writable"):
        deploy.check_node_config({"partition-id": 0, "num-partitions": 2, "state-dir": str(blocker / "s")})
    with pytest.raises(DeployError, match="'partition-id' = 2"):
        deploy.check_node_config({"partition-id": 2, "num-partitions": 2})
    with pytest.raises(DeployError, match="'partition-id' \\+ 'num-partitions' or a 'data-path'"):
        deploy.check_node_config({"state-dir": str(tmp_path)})
    deploy.check_node_config({"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path / "ok")})
    with pytest.raises(DeployError, match="'data-path'"):  # checked before a process starts
        deploy.start_supernode(tmp_path, 0, "127.0.0.1:1", {"data-path": "/does/not/exist"})
    with pytest.raises(DeployError, match="'state-dir'"):
        deploy.check_node_config({"partition-id": 1, "num-partitions": 2})


def test_node_config_is_formatted_as_toml():
    text = deploy.format_node_config({"partition-id": 0, "state-dir": "/a b/c", "flag": True})
    assert text == 'partition-id=0 state-dir="/a b/c" flag=true'
    assert _parse_node_config(text) == {"partition-id": 0, "state-dir": "/a b/c", "flag": True}


def test_certs_have_loopback_sans_and_node_keys(tmp_path):
    certs = deploy.make_certs(tmp_path / "c", num_nodes=2, hosts=["link.example.org", "10.0.0.7"])
    text = subprocess.run(["openssl", "x509", "-in", str(certs.server_cert), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    for san in ("IP Address:127.0.0.1", "DNS:localhost", "DNS:link.example.org", "IP Address:10.0.0.7"):
        assert san in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca), str(certs.server_cert)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    for i in range(2):
        assert certs.node_pub(i).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert "OPENSSH PRIVATE KEY" in certs.node_key(i).read_text()
        assert certs.node_key(i).stat().st_mode & 0o077 == 0


def test_stop_kills_the_group_and_detached_descendants_by_pid(tmp_path):
    # a parent that starts a child in a *new session*, as flower-* start flower-superexec
    code = ("import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(300)'],"
            "start_new_session=True); time.sleep(300)")
    proc = _spawn(tmp_path, "dummy", [sys.executable, "-c", code], _env(), {})
    deadline = time.monotonic() + 20
    while not deploy.descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    kids = deploy.descendants(proc.pid)
    assert len(kids) == 1 and proc.pidfile.exists()
    deploy.stop_proc(proc, grace=5)
    assert proc.popen.poll() is not None and not proc.pidfile.exists()
    assert not Path(f"/proc/{kids[0]}").exists() or _is_zombie(kids[0])


def test_stop_all_ignores_stale_or_foreign_pid_files(tmp_path):
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "supernode-0.pid").write_text('{"pid": 1}')  # init: not a Flower process
    (tmp_path / "pids" / "broken.pid").write_text("garbage")
    assert deploy.stop_all(tmp_path) == ["supernode-0"]
    assert not list((tmp_path / "pids").glob("*.pid"))


def test_byte_counting_proxy_forwards_and_counts():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    proxy = deploy.ByteCountingProxy("127.0.0.1", srv.getsockname()[1])
    try:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        s, _ = srv.accept()
        c.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += s.recv(4096)
        s.sendall(b"y" * 10)
        assert c.recv(100) == b"y" * 10
        c.close(), s.close()
        time.sleep(0.2)
        assert proxy.snapshot() == (1000, 10)
    finally:
        proxy.close()
        srv.close()


def test_byte_counting_proxy_tap_sees_every_forwarded_byte_per_connection_and_direction():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    proxy = deploy.ByteCountingProxy("127.0.0.1", srv.getsockname()[1])
    seen: list[tuple[int, bool, bytes]] = []
    proxy.tap = lambda conn, upstream, data: seen.append((conn, upstream, data))
    try:
        for i, (up, down) in enumerate([(b"first-up" * 50, b"first-down"), (b"second-up", b"second-down" * 30)]):
            c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s, _ = srv.accept()
            c.sendall(up)
            got = b""
            while len(got) < len(up):
                got += s.recv(4096)
            s.sendall(down)
            back = b""
            while len(back) < len(down):
                back += c.recv(4096)
            c.close(), s.close()
        time.sleep(0.2)
        joined = {(conn, u): b"".join(d for k, uu, d in seen if k == conn and uu == u)
                  for conn in (0, 1) for u in (True, False)}
        assert joined == {(0, True): b"first-up" * 50, (0, False): b"first-down",
                          (1, True): b"second-up", (1, False): b"second-down" * 30}
        assert sum(len(d) for _, _, d in seen) == sum(proxy.snapshot())
    finally:
        proxy.close()
        srv.close()


@pytest.mark.parametrize("runtime", [NodeRuntime(), NodeRuntime(executor="flower", node_poll=0)],
                         ids=["warm-executor", "flower-superexec"])
def test_unreachable_superlink_ends_the_supernode_in_bounded_time(tmp_path, runtime):
    t0 = time.monotonic()
    proc = deploy.start_supernode(tmp_path, 0, f"127.0.0.1:{free_port()}",
                                  {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "s")},
                                  max_wait_time=3, runtime=runtime)
    started = [proc.pid, *(c.pid for c in proc.companions)]
    assert len(proc.companions) == (runtime.executor == "warm")  # the warm executor is a companion
    try:
        proc.popen.wait(timeout=90)
    finally:
        deploy.stop_proc(proc)
    assert proc.popen.returncode != 0 and time.monotonic() - t0 < 90
    log = proc.log.read_text()
    assert "could not establish a connection to the SuperLink" in log
    assert not [p for p in started if Path(f"/proc/{p}").exists() and not _is_zombie(p)]  # nothing left
    assert not list((tmp_path / "pids").glob("*.pid"))


def test_a_node_without_state_dir_is_refused_before_it_starts(tmp_path):
    with pytest.raises(DeployError, match="needs a 'state-dir'.*--state-dir DIR"):
        deploy.start_supernode(tmp_path, 0, "127.0.0.1:1", {"partition-id": 0, "num-partitions": 2})
    assert not (tmp_path / "pids").exists()
    out = subprocess.run([sys.executable, "-m", "floral_flwr.deploy", "supernode", "--work", str(tmp_path),
                          "--index", "0", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                          "--num-partitions", "2"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "needs a 'state-dir'" in out.stderr
    assert not (tmp_path / "pids").exists()


def test_cli_reports_bad_settings_with_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "floral_flwr.deploy", "supernode", "--work", str(tmp_path),
                          "--index", "0", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                          "--num-partitions", "2", "--data-path", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "'data-path'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "floral_flwr.deploy", "superlink", "--work", str(tmp_path),
                          "--host", "0.0.0.0"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "insecure mode" in out.stderr


def test_a_throw_away_deployment_dies_with_its_parent(tmp_path):
    """Deployment processes are tied to the process that started them (PR_SET_PDEATHSIG): a test
    runner killed mid-test leaves no SuperLink/SuperNode behind."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from floral_flwr.deploy.processes import _spawn\n"
        "from floral_flwr.deploy.settings import NodeRuntime, _env\n"
        "p = _spawn(Path(sys.argv[1]), 'x', [sys.executable, '-c', 'import time; time.sleep(300)'],"
        " _env(), {}, tie_to_parent=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert Path(f"/proc/{child}").exists()
    finally:
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{child}").exists() and not _is_zombie(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or _is_zombie(child)


def test_the_fab_carries_the_app_and_nothing_else(tmp_path, monkeypatch):
    """The FAB (what every ClientApp process receives and re-verifies) holds every module of the
    package and the two entry points, and none of the benchmarks, results, docs or tests."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist())
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "floral_flwr").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert package and package <= names
    assert {"client_app.py", "server_app.py", "README.md"} <= names
    outside = {n for n in names if not n.startswith((".info/", "floral_flwr/"))}
    assert outside == {"client_app.py", "server_app.py", "README.md", "pyproject.toml"}
