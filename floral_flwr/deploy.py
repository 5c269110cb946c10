"""Real deployment: a SuperLink, N SuperNodes, ``flwr run``, run status, and a clean stop.

``python -m floral_flwr.deploy <command>`` (thin wrappers in ``deploy/*.sh``; walkthrough in
``deploy/README.md``). Every process this module starts is started in its **own process group**,
its PID is written to ``<work>/pids/<name>.pid``, and ``stop`` signals exactly those process
groups (after checking that the PID still belongs to a Flower process), never anything found
by name.

Commands
--------
``certs``      throw-away CA + server certificate (SANs: 127.0.0.1, localhost, --host) + one EC
               key pair per SuperNode, for trying TLS and SuperNode authentication locally.
``superlink``  start ``flower-superlink`` (TLS when ``--certs`` is given, else insecure:
               loopback only) and return once it is healthy.
``supernode``  start one ``flower-supernode`` with ``partition-id``/``num-partitions`` or a
               ``data-path``, plus a ``state-dir``; the settings are checked first.
``register``   ``flwr supernode register`` a SuperNode public key (SuperNode authentication).
``run``        ``flwr run <app> <connection>``, then wait for the **run status** (exit 0 only
               for ``finished:completed``) and save the run's log.
``stop``       stop what ``superlink``/``supernode`` started (all, or ``--name``).
``local``      all of the above on loopback in one go (a throw-away deployment), then stop.

Security notes
--------------
- Insecure mode (no TLS) is refused for non-loopback addresses unless
  ``--allow-insecure-remote`` is given, and even then a warning is printed.
- Nothing received over the network is unpickled anywhere in this app: Flower carries arrays as
  raw bytes + dtype/shape, client state files are ``.npz`` loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from floral_flwr.launch import OFFLINE_ENV, _bin, free_port

CONNECTION = "deploy"


class DeployError(RuntimeError):
    """A deployment setting is wrong; the message names the setting."""


# ----------------------------------------------------------------------------- small helpers


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DeployError(f"SuperLink address '{address}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_insecure(host: str, allow_remote: bool, what: str) -> None:
    """Insecure (plain HTTP) transport is for loopback tests only."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise DeployError(
            f"{what}: insecure mode (no TLS) on non-loopback address '{host}' is refused: traffic "
            f"and node identities would be unprotected. Use TLS (--certs DIR, see `deploy certs`) "
            f"or pass --allow-insecure-remote on a trusted private network"
        )
    print(
        f"WARNING: {what} runs INSECURE (no TLS) on non-loopback address '{host}': anyone on the "
        f"network can read and forge model updates. Use TLS outside a trusted lab network.",
        file=sys.stderr, flush=True,
    )


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
    venv_bin = str(Path(sys.executable).parent)
    if venv_bin not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def format_node_config(cfg: Mapping[str, Any]) -> str:
    """``{"partition-id": 0, "state-dir": "/x"}`` -> ``partition-id=0 state-dir="/x"``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())


@dataclass
class Certs:
    """Paths of a CA, the SuperLink's certificate and key, and SuperNode key pairs."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, i: int) -> Path:
        return self.root / f"supernode-{i}"

    def node_pub(self, i: int) -> Path:
        return self.root / f"supernode-{i}.pub"

    def check(self) -> None:
        for p in (self.ca, self.server_cert, self.server_key):
            if not p.is_file():
                raise DeployError(f"--certs '{self.root}': missing {p.name} (create them with `deploy certs`)")


def make_certs(out: str | Path, num_nodes: int = 2, hosts: Iterable[str] = (), days: int = 30) -> Certs:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost (+ ``hosts``) signed by it,
    and ``num_nodes`` ECDSA P-384 SuperNode key pairs (OpenSSH format). For trying TLS and
    SuperNode authentication; use your organisation's PKI in production."""
    certs = Certs(Path(out))
    certs.root.mkdir(parents=True, exist_ok=True)
    openssl, keygen = shutil.which("openssl"), shutil.which("ssh-keygen")
    if not openssl or not keygen:
        raise DeployError("`deploy certs` needs openssl and ssh-keygen on PATH")
    r = certs.root
    san_dns, san_ip = {"localhost"}, {"127.0.0.1"}
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            san_ip.add(h)
        except ValueError:
            san_dns.add(h)
    san = ",".join([f"DNS:{d}" for d in sorted(san_dns)] + [f"IP:{i}" for i in sorted(san_ip)])

    def sh(*cmd: str) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise DeployError(f"{cmd[0]} failed: {p.stderr.strip()[-400:]}")

    sh(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
       "-keyout", str(r / "ca.key"), "-out", str(certs.ca), "-subj", "/CN=floral-flwr throw-away CA")
    sh(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs.server_key),
       "-out", str(r / "server.csr"), "-subj", "/CN=floral-superlink")
    (r / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    sh(openssl, "x509", "-req", "-in", str(r / "server.csr"), "-CA", str(certs.ca), "-CAkey", str(r / "ca.key"),
       "-CAcreateserial", "-out", str(certs.server_cert), "-days", str(days), "-sha256",
       "-extfile", str(r / "server.ext"))
    for i in range(num_nodes):
        key = certs.node_key(i)
        for p in (key, certs.node_pub(i)):
            p.unlink(missing_ok=True)
        sh(keygen, "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"supernode-{i}", "-f", str(key))
    for p in r.iterdir():
        if p.name.endswith(".key") or (p.name.startswith("supernode-") and not p.name.endswith(".pub")):
            p.chmod(0o600)
    return certs


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A process this module started (its own process group), with its PID file and log."""

    name: str
    popen: subprocess.Popen | None
    pid: int
    pidfile: Path
    log: Path
    info: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_is_ours(self.pid)

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


def _pid_is_ours(pid: int) -> bool:
    """Only signal a PID that still runs a Flower process (PIDs get recycled)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "flower-superlink" in cmd or "flower-supernode" in cmd


# Execs the real command after asking the kernel to SIGTERM it when its parent dies
# (PR_SET_PDEATHSIG survives execve): a throw-away deployment cannot outlive a killed test run.
_TIE_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"  # the parent died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _spawn(work: Path, name: str, cmd: list[str], env: dict[str, str], info: dict[str, Any],
           tie_to_parent: bool = False) -> Proc:
    (work / "pids").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{name}.log"
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(cmd)}\n".encode())
        fh.flush()
        run = cmd
        if tie_to_parent and sys.platform.startswith("linux"):
            run = [sys.executable, "-c", _TIE_TO_PARENT, str(os.getpid()), *cmd]
        popen = subprocess.Popen(run, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    pidfile = work / "pids" / f"{name}.pid"
    pidfile.write_text(json.dumps({"pid": popen.pid, "cmd": cmd, **info}))
    return Proc(name, popen, popen.pid, pidfile, log, info)


def descendants(pid: int) -> list[int]:
    """PIDs of all living descendants of ``pid`` (from /proc; children first seen, then theirs).

    Flower starts ``flower-superexec`` (and it the ServerApp/ClientApp processes) in a *new
    session*, so they are not in our process group: they are found here, before anything is
    signalled (once a parent dies, its children are re-parented and the link is lost)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = pids
    while left and time.monotonic() < deadline:
        left = [p for p in left if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if left:
            time.sleep(0.2)
    return left


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except (OSError, IndexError):
        return True


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


def stop_proc(proc: Proc, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``'s process group and its descendants (SIGTERM, then SIGKILL after
    ``grace``); remove its PID file.

    Only a process we started (``popen``) or, from a PID file, a still-running Flower process
    that leads its own process group is signalled; anything else (a stale or recycled PID) is
    left alone and only the PID file is removed."""
    if proc.popen is not None:
        ours = proc.popen.poll() is None
    else:
        ours = _pid_is_ours(proc.pid) and _is_group_leader(proc.pid)
    if not ours:
        proc.pidfile.unlink(missing_ok=True)
        return
    kids = descendants(proc.pid)  # before signalling: detached children are found via the parent
    _signal_pids(kids, sig)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = proc.popen.poll() is None if proc.popen is not None else (
            Path(f"/proc/{proc.pid}").exists() and not _is_zombie(proc.pid))
        if not alive:
            break
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of our own group
    except (ProcessLookupError, PermissionError):
        pass
    if proc.popen is not None:
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    left = _wait_gone(kids, grace)
    _signal_pids(left, signal.SIGKILL)
    _wait_gone(left, 5.0)
    proc.pidfile.unlink(missing_ok=True)


def kill_proc(proc: Proc) -> None:
    """Crash a process group abruptly (fault tests): SIGKILL, no clean shutdown."""
    stop_proc(proc, grace=5.0, sig=signal.SIGKILL)


def load_procs(work: Path, names: Iterable[str] | None = None) -> list[Proc]:
    out = []
    wanted = set(names) if names else None
    for pf in sorted((work / "pids").glob("*.pid")) if (work / "pids").is_dir() else []:
        name = pf.stem
        if wanted is not None and name not in wanted:
            continue
        try:
            meta = json.loads(pf.read_text())
            pid = int(meta["pid"])
        except (ValueError, KeyError, OSError):
            pf.unlink(missing_ok=True)
            continue
        out.append(Proc(name, None, pid, pf, work / "logs" / f"{name}.log", meta))
    return out


def stop_all(work: Path, names: Iterable[str] | None = None) -> list[str]:
    """Stop the processes recorded under ``work/pids`` (SuperNodes first)."""
    procs = load_procs(work, names)
    procs.sort(key=lambda p: p.name == "superlink")
    for p in procs:
        stop_proc(p)
    return [p.name for p in procs]


def _ssl_context(ca: Path | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    return ssl.create_default_context(cafile=str(ca))


def wait_healthy(host: str, port: int, timeout: float, proc: Proc | None = None, ca: Path | None = None) -> None:
    scheme = "https" if ca else "http"
    ctx = _ssl_context(ca)
    deadline = time.monotonic() + timeout
    err: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            tail = proc.log.read_text(errors="replace")[-1500:] if proc.log.exists() else ""
            raise DeployError(f"SuperLink exited (code {proc.returncode()}) before becoming healthy:\n{tail}")
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            err = exc
        time.sleep(0.3)
    raise DeployError(f"SuperLink on {host}:{port} not healthy after {timeout:g} s ({err})")


def start_superlink(
    work: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    certs: Certs | None = None,
    auth: bool = False,
    database: str | None = None,
    allow_insecure_remote: bool = False,
    health_timeout: float = 90.0,
    tie_to_parent: bool = False,
) -> Proc:
    """Start ``flower-superlink`` (own FLWR_HOME under ``work``) and wait until it is healthy."""
    work = Path(work)
    port = port or free_port()
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        if auth:
            raise DeployError("--auth (SuperNode authentication) needs TLS: pass --certs DIR")
        check_insecure(host, allow_insecure_remote, "SuperLink")
        cmd.append("--insecure")
    else:
        certs.check()
        cmd += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key)]
        if auth:
            cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    home = work / "superlink"
    home.mkdir(parents=True, exist_ok=True)
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    proc = _spawn(work, "superlink", cmd, _env(home),
                  {"address": f"{dial}:{port}", "tls": certs is not None, "auth": auth}, tie_to_parent)
    wait_healthy(dial, port, health_timeout, proc, certs.ca if certs else None)
    return proc


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """Catch the usual mistakes before a SuperNode starts (errors name the setting)."""
    has_part = "partition-id" in node_config or "num-partitions" in node_config
    if has_part:
        try:
            pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except (KeyError, TypeError, ValueError):
            raise DeployError("node config needs both 'partition-id' and 'num-partitions' as integers") from None
        if not 0 <= pid < n:
            raise DeployError(f"node config 'partition-id' = {pid} is not in [0, num-partitions={n})")
    elif "data-path" not in node_config:
        raise DeployError("node config needs 'partition-id' + 'num-partitions' or a 'data-path'")
    dp = node_config.get("data-path")
    if dp is not None and not Path(str(dp)).exists():
        raise DeployError(f"node config 'data-path' = '{dp}' does not exist on this machine")
    sd = node_config.get("state-dir")
    if sd:
        # same probe as floral_flwr.client.state_store.check_writable (no torch import here)
        try:
            Path(str(sd)).mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=str(sd), prefix=".probe-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise DeployError(f"node config 'state-dir' = '{sd}' is not writable: {exc}") from None


def start_supernode(
    work: str | Path,
    index: int,
    superlink: str,
    node_config: Mapping[str, Any],
    port: int | None = None,
    certs: Certs | None = None,
    ca: Path | None = None,
    auth_key: Path | None = None,
    max_wait_time: float | None = 120.0,
    allow_insecure_remote: bool = False,
    env_extra: Mapping[str, str] | None = None,
    tie_to_parent: bool = False,
) -> Proc:
    """Start one ``flower-supernode`` with its own FLWR_HOME and runtime ``--port``.

    ``max_wait_time`` bounds how long it retries an unreachable SuperLink before exiting
    (``None``: forever, Flower's default)."""
    work = Path(work)
    check_node_config(node_config)
    host, _ = split_address(superlink)
    ca = ca or (certs.ca if certs else None)
    port = port or free_port()
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", format_node_config(node_config)]
    if ca is None:
        check_insecure(host, allow_insecure_remote, f"SuperNode {index}")
        cmd.append("--insecure")
    else:
        if not Path(ca).is_file():
            raise DeployError(f"--root-certificates '{ca}' does not exist")
        cmd += ["--root-certificates", str(ca)]
    if auth_key is not None:
        if not Path(auth_key).is_file():
            raise DeployError(f"--auth-key '{auth_key}' does not exist")
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(float(max_wait_time))]
    home = work / f"supernode-{index}"
    home.mkdir(parents=True, exist_ok=True)
    env = _env(home)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return _spawn(work, f"supernode-{index}", cmd, env,
                  {"superlink": superlink, "port": port, "node-config": dict(node_config)}, tie_to_parent)


# ----------------------------------------------------------------------------- flwr CLI


def write_connection(work: str | Path, superlink: str, ca: Path | None = None, name: str = CONNECTION) -> Path:
    """A private FLWR_HOME for the ``flwr`` CLI with one connection to ``superlink``."""
    home = Path(work) / "cli"
    home.mkdir(parents=True, exist_ok=True)
    body = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{superlink}"\n'
    body += f"root-certificates = {json.dumps(str(Path(ca).resolve()))}\n" if ca else "insecure = true\n"
    (home / "config.toml").write_text(body)
    return home


def _flwr(args: list[str], cli_home: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_bin("flwr"), *args], capture_output=True, text=True,
                              env=_env(cli_home), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g} s "
                          f"(is the SuperLink reachable and the certificate right?)") from exc


def register_supernode(cli_home: Path, public_key: Path, conn: str = CONNECTION, timeout: float = 60) -> str:
    """``flwr supernode register`` (SuperNode authentication); returns the CLI output."""
    p = _flwr(["supernode", "register", str(public_key), conn], cli_home, timeout)
    if p.returncode != 0:
        raise DeployError(f"registering '{public_key}' failed: {(p.stdout + p.stderr).strip()[-600:]}")
    return p.stdout.strip()


def run_status(cli_home: Path, run_id: str, conn: str = CONNECTION, timeout: float = 30) -> tuple[str, str]:
    p = _flwr(["list", conn, "--run-id", str(run_id), "--format", "json"], cli_home, timeout)
    try:
        run = json.loads(p.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError):
        return "unknown", (p.stdout + p.stderr).strip()[-500:]


def submit(app_dir: str | Path, cli_home: Path, run_config: str = "", conn: str = CONNECTION,
           timeout: float = 180) -> str:
    """``flwr run <app> <conn>`` (no streaming); returns the run id."""
    args = ["run", str(app_dir), conn, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    p = _flwr(args, cli_home, timeout)
    out = p.stdout + p.stderr
    m = re.search(r'"run-id":\s*"?(\d+)', out) or re.search(r"started run (\d+)", out)
    if not m:
        raise DeployError(f"`flwr run` did not start a run: {out.strip()[-800:]}")
    return m.group(1)


def fetch_log(cli_home: Path, run_id: str, conn: str = CONNECTION, timeout: float = 60) -> str:
    try:
        p = _flwr(["log", str(run_id), conn, "--show"], cli_home, timeout)
        return p.stdout + p.stderr
    except DeployError as exc:
        return str(exc)


def wait_run(cli_home: Path, run_id: str, timeout: float, conn: str = CONNECTION,
             poll: float = 2.0, on_poll: Any = None) -> tuple[str, str]:
    """Poll the run status until it is ``finished:*`` or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    status, details = "unknown", ""
    while time.monotonic() < deadline:
        try:
            status, details = run_status(cli_home, run_id, conn)
        except DeployError as exc:
            status, details = "unknown", str(exc)
        if status.startswith("finished"):
            return status, details
        if on_poll is not None:
            on_poll(status)
        time.sleep(poll)
    return f"timeout ({status})", details


def stop_run(cli_home: Path, run_id: str, conn: str = CONNECTION) -> None:
    try:
        _flwr(["stop", str(run_id), conn], cli_home, 30)
    except DeployError:
        pass


# ----------------------------------------------------------------------------- one-shot deployment


@dataclass
class Deployment:
    """A throw-away loopback deployment: SuperLink + SuperNodes, stopped on exit.

    >>> with Deployment(work, num_supernodes=2) as d:
    ...     run_id = d.submit(app_dir, "num-server-rounds=2")
    ...     status, _ = d.wait(run_id, timeout=600)
    """

    work: Path
    num_supernodes: int = 2
    num_partitions: int | None = None  # default: num_supernodes (node i hosts partition i)
    certs: Certs | None = None
    auth: bool = False
    state_root: Path | None = None
    node_extra: dict[int, dict[str, Any]] = field(default_factory=dict)
    max_wait_time: float | None = 120.0
    link_port: int | None = None
    proxy: bool = False  # count bytes between SuperNodes and SuperLink through a TCP proxy
    # keep the SuperLink's state (registered nodes, runs) in <work>/superlink/state.db: a restarted
    # SuperLink then still knows its SuperNodes, which reconnect; with the default in-memory state
    # they are refused (401) and exit, and must be restarted too
    database: bool = False
    superlink: Proc | None = None
    nodes: dict[int, Proc] = field(default_factory=dict)
    byte_counter: "ByteCountingProxy | None" = None
    cli_home: Path | None = None

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        assert self.superlink is not None
        return str(self.superlink.info["address"])

    @property
    def fleet_address(self) -> str:
        if self.byte_counter is not None:
            return f"127.0.0.1:{self.byte_counter.port}"
        return self.address

    def start_link(self) -> Proc:
        db = str(self.work / "superlink" / "state.db") if self.database else None
        self.superlink = start_superlink(self.work, port=self.link_port, certs=self.certs, auth=self.auth,
                                         database=db, tie_to_parent=True)
        self.link_port = int(self.address.rsplit(":", 1)[1])
        self.cli_home = write_connection(self.work, self.address, self.certs.ca if self.certs else None)
        if self.proxy and self.byte_counter is None:
            self.byte_counter = ByteCountingProxy("127.0.0.1", self.link_port)
        return self.superlink

    def node_config(self, i: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {"partition-id": i, "num-partitions": self.num_partitions or self.num_supernodes}
        if self.state_root is not None:
            cfg["state-dir"] = str(self.state_root / f"node-{i}")
        cfg.update(self.node_extra.get(i, {}))
        return cfg

    def start_node(self, i: int) -> Proc:
        key = self.certs.node_key(i) if (self.certs and self.auth) else None
        if key is not None and self.cli_home is not None:
            register_supernode(self.cli_home, self.certs.node_pub(i))  # type: ignore[union-attr]
        proc = start_supernode(self.work, i, self.fleet_address, self.node_config(i), certs=self.certs,
                               auth_key=key, max_wait_time=self.max_wait_time, tie_to_parent=True)
        self.nodes[i] = proc
        return proc

    def __enter__(self) -> "Deployment":
        try:
            self.start_link()
            for i in range(self.num_supernodes):
                self.start_node(i)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def submit(self, app_dir: str | Path, run_config: str = "") -> str:
        assert self.cli_home is not None
        return submit(app_dir, self.cli_home, run_config)

    def wait(self, run_id: str, timeout: float, on_poll: Any = None) -> tuple[str, str]:
        assert self.cli_home is not None
        status = wait_run(self.cli_home, run_id, timeout, on_poll=on_poll)
        (self.work / "logs" / f"run-{run_id}.log").write_text(fetch_log(self.cli_home, run_id))
        return status

    def run_log(self, run_id: str) -> str:
        p = self.work / "logs" / f"run-{run_id}.log"
        return p.read_text() if p.exists() else ""

    def stop(self) -> None:
        for proc in list(self.nodes.values()):
            stop_proc(proc)
        if self.superlink is not None:
            stop_proc(self.superlink)
        if self.byte_counter is not None:
            self.byte_counter.close()
            self.byte_counter = None

    def pids(self) -> list[int]:
        procs = list(self.nodes.values()) + ([self.superlink] if self.superlink else [])
        return [p.pid for p in procs]


# ----------------------------------------------------------------------------- bytes on the wire


class ByteCountingProxy:
    """A loopback TCP forwarder that counts the bytes SuperNodes and the SuperLink exchange
    (everything on the wire: HTTP framing, protobuf, heartbeats; TLS is forwarded as is)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        import threading

        self.target = (target_host, target_port)
        self.up = 0  # SuperNodes -> SuperLink
        self.down = 0  # SuperLink -> SuperNodes
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = int(self._srv.getsockname()[1])
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if upstream:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self._srv.close()
        except OSError:
            pass
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------- CLI


def _parse_node_config(text: str) -> dict[str, Any]:
    import tomllib

    out: dict[str, Any] = {}
    for part in shlex.split(text):
        k, sep, v = part.partition("=")
        if not sep:
            raise DeployError(f"--node-config entry '{part}' is not key=value")
        try:
            out[k] = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            out[k] = v  # bare string
    return out


def _cmd_certs(a: argparse.Namespace) -> int:
    certs = make_certs(a.out, a.nodes, a.host)
    print(f"CA {certs.ca}\nserver certificate {certs.server_cert} (key {certs.server_key})")
    for i in range(a.nodes):
        print(f"SuperNode {i}: private key {certs.node_key(i)}, public key {certs.node_pub(i)}")
    return 0


def _cmd_superlink(a: argparse.Namespace) -> int:
    certs = Certs(Path(a.certs)) if a.certs else None
    proc = start_superlink(a.work, a.host, a.port, certs, a.auth, a.database, a.allow_insecure_remote)
    cli = write_connection(a.work, proc.info["address"], certs.ca if certs else None)
    print(f"SuperLink pid {proc.pid} (process group) on {a.host}:{proc.info['address'].rsplit(':', 1)[1]}; "
          f"log {proc.log}; flwr CLI home {cli}")
    return 0


def _cmd_supernode(a: argparse.Namespace) -> int:
    nc = _parse_node_config(a.node_config)
    if a.partition_id is not None:
        nc["partition-id"] = a.partition_id
    if a.num_partitions is not None:
        nc["num-partitions"] = a.num_partitions
    if a.data_path:
        nc["data-path"] = a.data_path
    if a.state_dir:
        nc["state-dir"] = os.path.abspath(a.state_dir)
    proc = start_supernode(a.work, a.index, a.superlink, nc, a.port, ca=Path(a.root_certificates) if a.root_certificates else None,
                           auth_key=Path(a.auth_key) if a.auth_key else None,
                           max_wait_time=a.max_wait_time or None, allow_insecure_remote=a.allow_insecure_remote)
    time.sleep(2.0)
    if not proc.alive():
        print(proc.log.read_text(errors="replace")[-1500:], file=sys.stderr)
        raise DeployError(f"SuperNode {a.index} exited with code {proc.returncode()} (log {proc.log})")
    print(f"SuperNode {a.index} pid {proc.pid} (process group), node config {format_node_config(nc)}; log {proc.log}")
    return 0


def _cmd_register(a: argparse.Namespace) -> int:
    ca = Path(a.root_certificates) if a.root_certificates else None
    cli = write_connection(a.work, a.superlink, ca) if a.superlink else Path(a.work) / "cli"
    if not Path(a.public_key).is_file():
        raise DeployError(f"public key '{a.public_key}' does not exist")
    print(register_supernode(cli, Path(a.public_key)))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    cli = write_connection(a.work, a.superlink, Path(a.root_certificates) if a.root_certificates else None) \
        if a.superlink else Path(a.work) / "cli"
    if not (cli / "config.toml").exists():
        raise DeployError(f"no connection in '{cli}': pass --superlink HOST:PORT (and --root-certificates)")
    run_id = submit(a.app, cli, a.run_config)
    print(f"[deploy] started run {run_id}; waiting for its status (at most {a.timeout:g} s)", flush=True)
    status, details = wait_run(cli, run_id, a.timeout)
    log = Path(a.work) / "logs" / f"run-{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(fetch_log(cli, run_id))
    if status.startswith("timeout"):
        stop_run(cli, run_id)
    print(f"[deploy] run {run_id}: {status} {details}".rstrip() + f" (log {log})", flush=True)
    return 0 if status == "finished:completed" else 1


def _cmd_stop(a: argparse.Namespace) -> int:
    stopped = stop_all(Path(a.work), a.name or None)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing recorded"))
    return 0


def _cmd_local(a: argparse.Namespace) -> int:
    work = Path(a.work or tempfile.mkdtemp(prefix="floral-deploy-"))
    certs = make_certs(work / "certs", a.num_supernodes) if (a.tls or a.auth) else None
    state = Path(a.state_root).resolve() if a.state_root else work / "state"
    with Deployment(work, a.num_supernodes, a.num_partitions, certs=certs, auth=a.auth, state_root=state, proxy=a.count_bytes) as d:
        print(f"[deploy] SuperLink {d.address} ({'TLS' if certs else 'insecure, loopback only'}"
              f"{', SuperNode auth' if a.auth else ''}), {a.num_supernodes} SuperNodes; work dir {work}", flush=True)
        run_id = d.submit(a.app, a.run_config)
        print(f"[deploy] started run {run_id}", flush=True)
        status, details = d.wait(run_id, a.timeout)
        if d.byte_counter is not None:
            up, down = d.byte_counter.snapshot()
            print(f"[deploy] bytes on the wire (SuperNodes<->SuperLink): up {up}, down {down}")
    print(f"[deploy] run {run_id}: {status} {details}".rstrip() + f" (log {work / 'logs' / f'run-{run_id}.log'})")
    return 0 if status == "finished:completed" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m floral_flwr.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("certs", help="throw-away CA, server certificate and SuperNode keys")
    c.add_argument("--out", required=True)
    c.add_argument("--nodes", type=int, default=2)
    c.add_argument("--host", action="append", default=[], help="extra SAN (the SuperLink's DNS name or IP); repeatable")
    c.set_defaults(fn=_cmd_certs)

    c = sub.add_parser("superlink", help="start a SuperLink in the background")
    c.add_argument("--work", required=True, help="state, logs and PID files go here")
    c.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept remote SuperNodes (needs --certs)")
    c.add_argument("--port", type=int, default=None, help="default: a free port")
    c.add_argument("--certs", default=None, help="directory from `certs` (TLS); without it: insecure, loopback only")
    c.add_argument("--auth", action="store_true", help="enable SuperNode authentication (needs --certs)")
    c.add_argument("--database", default=None, help="SQLite file for the SuperLink state (default: in memory)")
    c.add_argument("--allow-insecure-remote", action="store_true")
    c.set_defaults(fn=_cmd_superlink)

    c = sub.add_parser("supernode", help="start one SuperNode in the background")
    c.add_argument("--work", required=True)
    c.add_argument("--index", type=int, required=True, help="names its PID file/log/FLWR_HOME")
    c.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    c.add_argument("--partition-id", type=int, default=None)
    c.add_argument("--num-partitions", type=int, default=None)
    c.add_argument("--data-path", default=None, help="this node's own data (instead of a partition)")
    c.add_argument("--state-dir", default=None, help="private client state that survives restarts and runs")
    c.add_argument("--node-config", default="", help="more node config, e.g. 'data-dir=\"/data\"'")
    c.add_argument("--port", type=int, default=None, help="the SuperNode's local runtime port (default: free)")
    c.add_argument("--root-certificates", default=None, help="CA certificate (TLS); without it: insecure")
    c.add_argument("--auth-key", default=None, help="private key registered with `register`")
    c.add_argument("--max-wait-time", type=float, default=120.0,
                   help="give up after this many seconds without a SuperLink (0 = retry forever)")
    c.add_argument("--allow-insecure-remote", action="store_true")
    c.set_defaults(fn=_cmd_supernode)

    c = sub.add_parser("register", help="register a SuperNode public key (SuperNode authentication)")
    c.add_argument("--work", required=True)
    c.add_argument("--superlink", default=None)
    c.add_argument("--root-certificates", default=None)
    c.add_argument("public_key")
    c.set_defaults(fn=_cmd_register)

    c = sub.add_parser("run", help="submit the app and wait for its run status")
    c.add_argument("--work", required=True)
    c.add_argument("--app", default=".")
    c.add_argument("--superlink", default=None, help="HOST:PORT (default: the connection `superlink` wrote)")
    c.add_argument("--root-certificates", default=None)
    c.add_argument("--run-config", default="")
    c.add_argument("--timeout", type=float, default=3600.0)
    c.set_defaults(fn=_cmd_run)

    c = sub.add_parser("stop", help="stop what superlink/supernode started (by PID file)")
    c.add_argument("--work", required=True)
    c.add_argument("--name", action="append", default=[], help="e.g. supernode-0; repeatable (default: all)")
    c.set_defaults(fn=_cmd_stop)

    c = sub.add_parser("local", help="throw-away loopback deployment: start, run, stop")
    c.add_argument("--num-supernodes", type=int, default=2)
    c.add_argument("--num-partitions", type=int, default=None,
                   help="clients the data is split into (default: --num-supernodes); node i hosts partition i")
    c.add_argument("--app", default=".")
    c.add_argument("--run-config", default="")
    c.add_argument("--tls", action="store_true")
    c.add_argument("--auth", action="store_true", help="TLS + SuperNode authentication")
    c.add_argument("--state-root", default=None)
    c.add_argument("--work", default=None)
    c.add_argument("--count-bytes", action="store_true", help="route SuperNode traffic through a byte-counting proxy")
    c.add_argument("--timeout", type=float, default=3600.0)
    c.set_defaults(fn=_cmd_local)

    a = p.parse_args(argv)
    try:
        return int(a.fn(a))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
