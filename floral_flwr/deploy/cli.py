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
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from floral_flwr.deploy.certificates import Certs, make_certs
from floral_flwr.deploy.connection import fetch_log, register_supernode, stop_run, submit, wait_run, write_connection
from floral_flwr.deploy.deployment import Deployment
from floral_flwr.deploy.processes import start_superlink, start_supernode, stop_all
from floral_flwr.deploy.settings import DeployError, format_node_config

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
