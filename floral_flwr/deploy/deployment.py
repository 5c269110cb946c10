"""``Deployment``: a throw-away loopback deployment (SuperLink + SuperNodes, optionally TLS,
SuperNode authentication and a byte-counting proxy) for tests, benchmarks and ``deploy local``,
stopped on exit."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floral_flwr.deploy.certificates import Certs
from floral_flwr.deploy.connection import (fetch_log, follow_run, register_supernode, submit, wait_run,
                                           write_connection)
from floral_flwr.deploy.labnet import LabNet
from floral_flwr.deploy.processes import Proc, start_superlink, start_supernode, stop_proc
from floral_flwr.deploy.proxy import ByteCountingProxy
from floral_flwr.deploy.settings import DeployError, NodeRuntime

from floral_flwr.deploy.warm_executor import READY_LINE  # logged once torch is imported


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
    state_root: Path | None = None  # node i keeps its state in <state_root>/node-i (default <work>/state)
    node_extra: dict[int, dict[str, Any]] = field(default_factory=dict)
    max_wait_time: float | None = 120.0
    link_port: int | None = None
    proxy: bool = False  # count bytes between SuperNodes and SuperLink through a TCP proxy
    proxy_delay_s: float = 0.0  # ... which can also shape the link: one-way delay per direction
    proxy_rate_bit_s: float | None = None  # ... and bandwidth per direction (None: unlimited)
    # keep the SuperLink's state (registered nodes, runs) in <work>/superlink/state.db: a restarted
    # SuperLink then still knows its SuperNodes, which reconnect; with the default in-memory state
    # they are refused (401) and exit, and must be restarted too
    database: bool = False
    # how SuperNodes run ClientApps (default: the warm executor and short waits; see NodeRuntime)
    runtime: NodeRuntime = field(default_factory=NodeRuntime)
    # SuperNodes in their own network namespaces, reaching the SuperLink over veth pairs (the
    # SuperLink then listens on all addresses, behind the Fleet gateway: pass certs with the
    # LabNet's link addresses)
    labnet: LabNet | None = None
    # SuperNodes reach the SuperLink through a Fleet-API-only gateway (on by default off loopback)
    fleet_gateway: bool | None = None
    superlink: Proc | None = None
    nodes: dict[int, Proc] = field(default_factory=dict)
    byte_counter: "ByteCountingProxy | None" = None
    cli_home: Path | None = None

    def __post_init__(self) -> None:
        self.work = Path(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        if self.state_root is None:  # every SuperNode needs a state-dir of its own
            self.state_root = self.work / "state"

    @property
    def address(self) -> str:
        assert self.superlink is not None
        return str(self.superlink.info["address"])

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the byte counter, else the Fleet gateway, else the SuperLink."""
        if self.byte_counter is not None:
            return f"127.0.0.1:{self.byte_counter.port}"
        assert self.superlink is not None
        return str(self.superlink.info.get("fleet-address", self.address))

    def start_link(self) -> Proc:
        db = str(self.work / "superlink" / "state.db") if self.database else None
        host = "0.0.0.0" if self.labnet is not None else "127.0.0.1"
        self.superlink = start_superlink(self.work, host=host, port=self.link_port, certs=self.certs, auth=self.auth,
                                         database=db, tie_to_parent=True, task_poll=self.runtime.task_poll,
                                         executor=self.runtime.executor, fleet_gateway=self.fleet_gateway)
        self.link_port = int(self.fleet_address.rsplit(":", 1)[1])
        self.cli_home = write_connection(self.work, self.address, self.certs.ca if self.certs else None)
        if self.proxy and self.byte_counter is None:
            self.byte_counter = ByteCountingProxy("127.0.0.1", self.link_port, self.proxy_delay_s,
                                                  self.proxy_rate_bit_s)
        return self.superlink

    def node_config(self, i: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {"partition-id": i, "num-partitions": self.num_partitions or self.num_supernodes}
        # every SuperNode keeps its private client state in a state-dir (default: under work/)
        cfg["state-dir"] = str((self.state_root or self.work / "state") / f"node-{i}")
        cfg.update(self.node_extra.get(i, {}))
        return cfg

    def start_node(self, i: int) -> Proc:
        key = self.certs.node_key(i) if (self.certs and self.auth) else None
        if key is not None and self.cli_home is not None:
            register_supernode(self.cli_home, self.certs.node_pub(i))  # type: ignore[union-attr]
        address, prefix = self.fleet_address, None
        if self.labnet is not None:
            address, prefix = f"{self.labnet.link_ip(i)}:{self.link_port}", self.labnet.prefix(i)
        proc = start_supernode(self.work, i, address, self.node_config(i), certs=self.certs,
                               auth_key=key, max_wait_time=self.max_wait_time, tie_to_parent=True,
                               runtime=self.runtime, prefix=prefix)
        self.nodes[i] = proc
        return proc

    def __enter__(self) -> "Deployment":
        self.runtime.check()  # before anything starts
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

    def wait_warm(self, timeout: float = 600.0) -> bool:
        """Block until every warm executor (SuperNodes', SuperLink's) has imported torch and polls
        for tasks (so the run does not wait for them); False (and a warning) after ``timeout`` s."""
        procs = [*self.nodes.values(), *([self.superlink] if self.superlink else [])]
        execs = [c for p in procs for c in p.companions if c.name.endswith("-exec")]  # not the gateway
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.log.exists() and READY_LINE in c.log.read_text(errors="replace") for c in execs):
                return True
            dead = [c.name for c in execs if not c.alive()]
            if dead:
                raise DeployError(f"warm executor(s) {dead} exited: see {self.work / 'logs'}")
            time.sleep(0.5)
        print(f"WARNING: warm executors not ready after {timeout:g} s; the first round will wait for them",
              file=sys.stderr, flush=True)
        return False

    def submit(self, app_dir: str | Path, run_config: str = "") -> str:
        assert self.cli_home is not None
        return submit(app_dir, self.cli_home, run_config)

    def wait(self, run_id: str, timeout: float, on_poll: Any = None) -> tuple[str, str]:
        assert self.cli_home is not None
        status = wait_run(self.cli_home, run_id, timeout, on_poll=on_poll)
        (self.work / "logs" / f"run-{run_id}.log").write_text(fetch_log(self.cli_home, run_id))
        return status

    def follow(self, run_id: str, timeout: float, on_line: Any = None) -> tuple[str, str]:
        """Like :meth:`wait`, with the run's output streamed live to ``on_line`` (one long-lived
        ``flwr log`` process instead of a status poll every 2 s)."""
        assert self.cli_home is not None
        status, details, log = follow_run(self.cli_home, run_id, timeout, on_line)
        (self.work / "logs" / f"run-{run_id}.log").write_text(log or fetch_log(self.cli_home, run_id))
        return status, details

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
        return [p.pid for p in procs] + [c.pid for p in procs for c in p.companions]
