"""Real deployment: a SuperLink, N SuperNodes, ``flwr run``, run status, and a clean stop.

``python -m floral_flwr.deploy <command>`` (thin wrappers in ``deploy/*.sh``; walkthrough in
``deploy/README.md``). Every process this package starts is started in its **own process group**,
its PID is written to ``<work>/pids/<name>.pid``, and ``stop`` signals exactly those process
groups (after checking that the PID still belongs to a Flower process), never anything found
by name.

Commands
--------
``certs``      throw-away CA + server certificate (SANs: 127.0.0.1, localhost, --host) + one EC
               key pair per SuperNode, for trying TLS and SuperNode authentication locally.
``superlink``  start ``flower-superlink`` (TLS when ``--certs`` is given, else insecure:
               loopback only) and return once it is healthy. On a non-loopback ``--host`` the
               SuperLink itself listens on 127.0.0.1 and a Fleet gateway on ``--host``
               forwards only the Fleet API: the Control API (register keys, submit runs) is
               reachable from the SuperLink host only.
``supernode``  start one ``flower-supernode`` with ``partition-id``/``num-partitions`` or a
               ``data-path``, plus a ``state-dir`` (required); the settings are checked first.
``register``   ``flwr supernode register`` a SuperNode public key (SuperNode authentication).
``run``        ``flwr run <app> <connection>``, then wait for the **run status** (exit 0 only
               for ``finished:completed``) and save the run's log.
``stop``       stop what ``superlink``/``supernode`` started (all, or ``--name``).
``local``      all of the above on loopback in one go (a throw-away deployment), then stop.

Security notes
--------------
- Insecure mode (no TLS) is refused for non-loopback addresses unless
  ``--allow-insecure-remote`` is given, and even then a warning is printed.
- Off loopback only the Fleet API is reachable (a gateway in front of a 127.0.0.1 SuperLink):
  SuperNode keys are registered and runs submitted on the SuperLink host only.
- Every SuperNode needs its own ``state-dir``; the server cannot choose where a node writes.
- Nothing received over the network is unpickled anywhere in this app: Flower carries arrays as
  raw bytes + dtype/shape, client state files are ``.npz`` loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from floral_flwr.deploy.certificates import Certs, make_certs
from floral_flwr.deploy.connection import follow_run, print_line, register_supernode, stop_run, submit, write_connection
from floral_flwr.deploy.deployment import Deployment
from floral_flwr.deploy.processes import start_superlink, start_supernode, stop_all
from floral_flwr.deploy.settings import EXECUTORS, DeployError, NodeRuntime, format_node_config

# The module docstring above is the ``--help`` text; the modules themselves are listed in
# ``floral_flwr/deploy/__init__.py``.


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
    NodeRuntime(executor=a.executor, task_poll=a.task_poll).check()
    proc = start_superlink(a.work, a.host, a.port, certs, a.auth, a.database, a.allow_insecure_remote,
                           task_poll=a.task_poll, executor=a.executor)
    cli = write_connection(a.work, proc.info["address"], certs.ca if certs else None)
    where = (f"Control API on {proc.info['address']} (this host only), Fleet gateway on "
             f"{a.host}:{proc.info['fleet-address'].rsplit(':', 1)[1]}" if proc.info.get("fleet-gateway")
             else f"on {a.host}:{proc.info['address'].rsplit(':', 1)[1]}")
    print(f"SuperLink pid {proc.pid} (process group) {where}; log {proc.log}; flwr CLI home {cli}")
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
                           max_wait_time=a.max_wait_time or None, allow_insecure_remote=a.allow_insecure_remote,
                           runtime=_runtime(a))
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
    print(f"[deploy] started run {run_id}; its output follows (at most {a.timeout:g} s; Ctrl-C stops the run)",
          flush=True)
    try:
        status, details, text = follow_run(cli, run_id, a.timeout, on_line=print_line)
    except KeyboardInterrupt:
        stop_run(cli, run_id)
        print(f"\n[deploy] interrupted: run {run_id} stopped", flush=True)
        return 130
    log = Path(a.work) / "logs" / f"run-{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    if status.startswith("timeout"):
        stop_run(cli, run_id)
    print(run_summary(run_id, status, details, text, log), flush=True)
    return 0 if status == "finished:completed" else 1


def run_summary(run_id: str, status: str, details: str, log_text: str, log: Path) -> str:
    """The closing lines: the run's status (as ``launch`` prints it) and, when the ServerApp
    wrote its results, rounds done, the median warm round time and where the results are."""
    lines = [f"[deploy] run {run_id}: {status} {details if status != 'finished:completed' else ''}".rstrip()
             + f" (log {log})"]
    m = re.search(r"\[floral\] (?:.* \| )?run directory: (.+)", log_text)  # the ServerApp's first line
    rounds_csv = Path(m.group(1).strip()) / "rounds.csv" if m else None
    if rounds_csv is not None and rounds_csv.is_file():
        rows = list(csv.DictReader(rounds_csv.open()))
        secs = [float(r["round-s"]) for r in rows if r.get("round-s")]
        if secs:
            warm = secs[1:] or secs
            lines.append(f"[deploy] {len(rows)} round(s); round time median {statistics.median(warm):.2f} s "
                         f"(rounds 2..{len(rows)}), first round {secs[0]:.2f} s; results in {rounds_csv.parent}")
    return "\n".join(lines)


def _cmd_stop(a: argparse.Namespace) -> int:
    stopped = stop_all(Path(a.work), a.name or None)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing recorded"))
    return 0


def _runtime(a: argparse.Namespace) -> NodeRuntime:
    return NodeRuntime(executor=a.executor, node_poll=a.node_poll, task_poll=a.task_poll)


def _cmd_local(a: argparse.Namespace) -> int:
    work = Path(a.work or tempfile.mkdtemp(prefix="floral-deploy-"))
    runtime = _runtime(a)
    runtime.check()  # before anything is made or started
    certs = make_certs(work / "certs", a.num_supernodes) if (a.tls or a.auth) else None
    state = Path(a.state_root).resolve() if a.state_root else work / "state"
    log = work / "logs" / "run.log"
    with Deployment(work, a.num_supernodes, a.num_partitions, certs=certs, auth=a.auth, state_root=state,
                    proxy=a.count_bytes, runtime=runtime) as d:
        print(f"[deploy] SuperLink {d.address} ({'TLS' if certs else 'insecure, loopback only'}"
              f"{', SuperNode auth' if a.auth else ''}), {a.num_supernodes} SuperNodes ({runtime.describe()}); "
              f"work dir {work}", flush=True)
        d.wait_warm()
        run_id = d.submit(a.app, a.run_config)
        print(f"[deploy] started run {run_id}; its output follows (Ctrl-C stops everything)", flush=True)
        status, details = d.follow(run_id, a.timeout, on_line=print_line)
        log = work / "logs" / f"run-{run_id}.log"
        if d.byte_counter is not None:
            up, down = d.byte_counter.snapshot()
            print(f"[deploy] bytes on the wire (SuperNodes<->SuperLink): up {up}, down {down}")
    print(run_summary(run_id, status, details, d.run_log(run_id), log), flush=True)
    return 0 if status == "finished:completed" else 1


def _add_runtime_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--executor", choices=EXECUTORS, default="warm",
                   help="warm: SuperNodes in --isolation process with our fork-server executor (torch and "
                        "the app imported once; one forked process per message); flower: Flower's own SuperExec")
    c.add_argument("--node-poll", type=float, default=NodeRuntime.node_poll,
                   help="SuperNode idle wait while a round is on, s (0 = Flower's fixed 3 s)")
    c.add_argument("--task-poll", type=float, default=NodeRuntime.task_poll,
                   help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL, s (Flower's default 1)")


def _exit_on_signal(signum: int, _frame: object) -> None:
    # SIGTERM/SIGINT become exceptions, so the `with Deployment` blocks stop what they started
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


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
    c.add_argument("--task-poll", type=float, default=NodeRuntime.task_poll,
                   help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL for the ServerApp's SuperExec, s (Flower's default 1)")
    c.add_argument("--executor", choices=EXECUTORS, default="warm",
                   help="warm: --isolation process + our fork-server executor for the ServerApp; flower: Flower's SuperExec")
    c.set_defaults(fn=_cmd_superlink)

    c = sub.add_parser("supernode", help="start one SuperNode in the background")
    c.add_argument("--work", required=True)
    c.add_argument("--index", type=int, required=True, help="names its PID file/log/FLWR_HOME")
    c.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    c.add_argument("--partition-id", type=int, default=None)
    c.add_argument("--num-partitions", type=int, default=None)
    c.add_argument("--data-path", default=None, help="this node's own data (instead of a partition)")
    c.add_argument("--state-dir", default=None,
                   help="required: this node's private state (its mixture), kept across restarts, namespaced by run")
    c.add_argument("--node-config", default="", help="more node config, e.g. 'data-dir=\"/data\"'")
    c.add_argument("--port", type=int, default=None, help="the SuperNode's local runtime port (default: free)")
    c.add_argument("--root-certificates", default=None, help="CA certificate (TLS); without it: insecure")
    c.add_argument("--auth-key", default=None, help="private key registered with `register`")
    c.add_argument("--max-wait-time", type=float, default=120.0,
                   help="give up after this many seconds without a SuperLink (0 = retry forever)")
    c.add_argument("--allow-insecure-remote", action="store_true")
    _add_runtime_args(c)
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
    _add_runtime_args(c)
    c.set_defaults(fn=_cmd_local)

    a = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a background job may inherit SIGINT ignored
        signal.signal(sig, _exit_on_signal)
    try:
        return int(a.fn(a))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[deploy] interrupted: everything this command started was stopped", file=sys.stderr)
        return 130
