# size: every deployment process (SuperLink, its gateway and warm executor, SuperNodes and their executors) is started and stopped by one set of rules here.
"""Processes: start ``flower-superlink`` / ``flower-supernode`` (each in its own process group,
PID file ``<work>/pids/<name>.pid``, log ``<work>/logs/<name>.log``), wait until the SuperLink is
healthy, find the descendants Flower starts in their own sessions, and stop exactly those
processes (``stop_proc``, ``kill_proc``, ``stop_all``), never anything found by name.

A SuperLink on a non-loopback address is started on 127.0.0.1 behind a Fleet gateway
(:mod:`floral_flwr.deploy.gateway`) on the public address: only the Fleet API is reachable from
the network; the Control API (register keys, submit runs) stays on the SuperLink host."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from floral_flwr.deploy.certificates import Certs, _ssl_context
from floral_flwr.deploy.flwr_pins import TASK_POLL_ENV
from floral_flwr.deploy.settings import (DeployError, NodeRuntime, _env, check_insecure, check_node_config,
                                         format_node_config, is_loopback, split_address)
from floral_flwr.deploy.warm_executor import SERVER_PRELOAD
from floral_flwr.launch import _bin, free_port

# both run by path (they must not import this package: see their docstrings)
WARM_EXECUTOR = Path(__file__).resolve().with_name("warm_executor.py")
NODE_WAITS = Path(__file__).resolve().with_name("node_waits.py")


@dataclass
class Proc:
    """A process this module started (its own process group), with its PID file and log."""

    name: str
    popen: subprocess.Popen | None
    pid: int
    pidfile: Path
    log: Path
    info: dict[str, Any] = field(default_factory=dict)
    # processes that belong to this one and are stopped with it (a SuperNode's warm executor,
    # a SuperLink's warm executor and Fleet gateway)
    companions: list["Proc"] = field(default_factory=list)

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
    return any(name in cmd for name in ("flower-superlink", "flower-supernode", "floral_flwr.deploy.gateway",
                                         WARM_EXECUTOR.name, NODE_WAITS.name))


# Execs the real command after asking the kernel to SIGTERM it when its parent dies
# (PR_SET_PDEATHSIG survives execve): a throw-away deployment cannot outlive a killed test run.
_TIE_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"  # the parent died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _spawn(work: Path, name: str, cmd: list[str], env: dict[str, str], info: dict[str, Any],
           tie_to_parent: bool = False, log_name: str | None = None) -> Proc:
    """``log_name``: write to that process's log instead (a companion shares its owner's log, as
    Flower's own SuperExec and ClientApps share the SuperNode's output)."""
    (work / "pids").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{log_name or name}.log"
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
    left alone and only the PID file is removed. Companions are stopped first."""
    for companion in proc.companions:
        stop_proc(companion, grace, sig)
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
        log = work / "logs" / f"{name.removesuffix('-exec')}.log"  # a companion writes its owner's log
        out.append(Proc(name, None, pid, pf, log, meta))
    return out


def stop_all(work: Path, names: Iterable[str] | None = None) -> list[str]:
    """Stop the processes recorded under ``work/pids`` (executors, then SuperNodes, then the
    SuperLink); naming a SuperNode also stops its executor."""
    if names:
        names = [*names, *(f"{n}-exec" for n in names)]
    procs = load_procs(work, names)
    procs.sort(key=lambda p: (p.name.startswith("superlink"), not p.name.endswith("-exec")))
    for p in procs:
        stop_proc(p)
    return [p.name for p in procs]


def wait_healthy(host: str, port: int, timeout: float, proc: Proc | None = None, ca: Path | None = None) -> None:
    scheme = "https" if ca else "http"
    ctx = _ssl_context(ca)
    deadline = time.monotonic() + timeout
    err: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            tail = proc.log.read_text(errors="replace")[-1500:] if proc.log.exists() else ""
            what = "SuperLink" if proc.name == "superlink" else proc.name
            raise DeployError(f"{what} exited (code {proc.returncode()}) before becoming healthy:\n{tail}")
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
    task_poll: float | None = None,
    executor: str = "flower",
    fleet_gateway: bool | None = None,
) -> Proc:
    """Start ``flower-superlink`` (own FLWR_HOME under ``work``) and wait until it is healthy.

    ``task_poll`` sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for the SuperExec it starts (how
    soon the ServerApp starts after ``flwr run``; Flower's default 1 s). ``executor="warm"``:
    ``--isolation process`` and the warm executor as a companion (the ServerApp of each run is
    a forked child; ``warm_executor.py``).

    ``fleet_gateway`` (default: when ``host`` is not loopback): the SuperLink listens on
    127.0.0.1 only and a Fleet gateway on ``host:port`` forwards only the Fleet API
    (``info["fleet-address"]`` is where SuperNodes connect, ``info["address"]`` the loopback
    address of the Control API for the ``flwr`` CLI on this host)."""
    work = Path(work)
    port = port or free_port()
    gateway = not is_loopback(host) if fleet_gateway is None else fleet_gateway  # 0.0.0.0 too
    public_host, public_port = host, port
    if gateway:
        host, port = "127.0.0.1", free_port()
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        if auth:
            raise DeployError("--auth (SuperNode authentication) needs TLS: pass --certs DIR")
        check_insecure(public_host, allow_insecure_remote, "SuperLink")
        cmd.append("--insecure")
    else:
        certs.check()
        cmd += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key)]
        if auth:
            cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    if executor == "warm":
        cmd += ["--isolation", "process"]
    home = work / "superlink"
    home.mkdir(parents=True, exist_ok=True)
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    env = _env(home)
    if task_poll is not None:
        env[TASK_POLL_ENV] = str(task_poll)
    proc = _spawn(work, "superlink", cmd, env,
                  {"address": f"{dial}:{port}", "fleet-address": f"{dial}:{port}", "tls": certs is not None,
                   "auth": auth}, tie_to_parent)
    wait_healthy(dial, port, health_timeout, proc, certs.ca if certs else None)
    try:  # companions are stopped in this order: the gateway first (no new requests), then the executor
        if gateway:
            proc.companions.append(_start_gateway(work, public_host, public_port, f"{dial}:{port}", certs,
                                                  health_timeout, tie_to_parent))
        if executor == "warm":
            ecmd = [sys.executable, str(WARM_EXECUTOR), "--runtime-api-address", f"{dial}:{port}",
                    "--parent-pid", str(proc.pid), "--preload", ",".join(SERVER_PRELOAD), "--no-warm-app"]
            ecmd += ["--root-certificates", str(certs.ca)] if certs else ["--insecure"]
            proc.companions.append(_spawn(work, "superlink-exec", ecmd, env, {"superlink": proc.pid},
                                          tie_to_parent, log_name="superlink"))
    except BaseException:
        stop_proc(proc)
        raise
    if gateway:
        gw_dial = "127.0.0.1" if public_host in ("0.0.0.0", "::", "") else public_host
        proc.info["fleet-address"] = f"{gw_dial}:{public_port}"
        proc.info["fleet-gateway"] = True
        proc.pidfile.write_text(json.dumps({"pid": proc.pid, "cmd": cmd, **proc.info}))
    return proc


def _start_gateway(work: Path, host: str, port: int, target: str, certs: Certs | None, timeout: float,
                   tie_to_parent: bool) -> Proc:
    """The Fleet gateway in front of the SuperLink (own process group and PID file)."""
    cmd = [sys.executable, "-m", "floral_flwr.deploy.gateway", "--listen", f"{host}:{port}", "--target", target]
    if certs is not None:
        cmd += ["--certs", str(certs.root)]
    gw = _spawn(work, "fleet-gateway", cmd, _env(), {"address": f"{host}:{port}", "target": target}, tie_to_parent)
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    wait_healthy(dial, port, timeout, gw, certs.ca if certs else None)
    return gw


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
    runtime: NodeRuntime | None = None,
    prefix: list[str] | None = None,
) -> Proc:
    """Start one SuperNode with its own FLWR_HOME and runtime ``--port``; with the warm executor
    (``runtime.executor == "warm"``, the default) also its executor, a companion process.

    ``max_wait_time`` bounds how long it retries an unreachable SuperLink before exiting
    (``None``: forever, Flower's default). ``prefix`` runs both processes through a command
    prefix (``ip netns exec NS``: a SuperNode in its own network namespace, ``labnet.py``)."""
    work = Path(work)
    rt = runtime or NodeRuntime()
    rt.check()
    check_node_config(node_config)
    host, _ = split_address(superlink)
    ca = ca or (certs.ca if certs else None)
    port = port or free_port()
    cmd = ["--superlink", superlink, "--port", str(port), "--node-config", format_node_config(node_config)]
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
    if rt.executor == "warm":
        cmd += ["--isolation", "process"]  # the SuperNode starts no SuperExec; we start ours
    if rt.node_poll:
        cmd = [sys.executable, str(NODE_WAITS), "--node-poll", str(rt.node_poll), "--", *cmd]
    else:
        cmd = [_bin("flower-supernode"), *cmd]
    home = work / f"supernode-{index}"
    home.mkdir(parents=True, exist_ok=True)
    env = _env(home)
    env.setdefault("OMP_NUM_THREADS", "1")
    env[TASK_POLL_ENV] = str(rt.task_poll)
    env.update(env_extra or {})
    prefix = list(prefix or [])
    proc = _spawn(work, f"supernode-{index}", [*prefix, *cmd], env,
                  {"superlink": superlink, "port": port, "node-config": dict(node_config),
                   "executor": rt.executor, "node-poll": rt.node_poll}, tie_to_parent)
    if rt.executor == "warm":
        ecmd = [sys.executable, str(WARM_EXECUTOR), "--runtime-api-address", f"127.0.0.1:{port}",
                "--insecure", "--parent-pid", str(proc.pid)]
        if rt.preload is not None:
            ecmd += ["--preload", rt.preload]
        proc.companions.append(_spawn(work, f"supernode-{index}-exec", [*prefix, *ecmd], env,
                                      {"supernode": proc.pid}, tie_to_parent, log_name=f"supernode-{index}"))
    return proc
