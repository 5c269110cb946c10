"""Deployment settings: ``DeployError``, SuperLink addresses and the loopback-only rule for
insecure mode, the node config (checked, and formatted as Flower's TOML ``--node-config``), and
the environment every Flower process and ``flwr`` call gets."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from floral_flwr.deploy.flwr_pins import flwr_version_problem
from floral_flwr.launch import OFFLINE_ENV


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


# ----------------------------------------------------------------------------- node runtime

EXECUTORS = ("warm", "flower")


@dataclass(frozen=True)
class NodeRuntime:
    """How a SuperNode runs its ClientApps and how long it waits (``deploy/README.md``,
    "Warm executor").

    - ``executor``: ``"warm"`` = ``--isolation process`` + our fork-server SuperExec
      (``warm_executor.py``: torch and the app imported once, one forked process per message);
      ``"flower"`` = Flower's own SuperExec (a fresh ``flwr-clientapp`` per message).
    - ``node_poll``: the SuperNode's idle wait between pulls while a round is on (s); 0 keeps
      Flower's fixed 3 s idle wait and 0.5 s reply poll (the stock ``flower-supernode``).
    - ``task_poll``: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, how often the SuperExec asks its
      SuperNode for a new task (Flower's default 1 s; allowed 0.01-60).
    """

    executor: str = "warm"
    node_poll: float = 0.2
    task_poll: float = 0.1
    preload: str | None = None  # modules the warm executor imports once (default: its list)

    def describe(self) -> str:
        ex = "warm executor" if self.executor == "warm" else "Flower's SuperExec"
        poll = f"node poll {self.node_poll:g} s" if self.node_poll else "Flower's 3 s node wait"
        return f"{ex}, {poll}, task poll {self.task_poll:g} s"

    def check(self) -> None:
        if self.executor not in EXECUTORS:
            raise DeployError(f"--executor '{self.executor}' is not one of {', '.join(EXECUTORS)}")
        if self.node_poll != 0 and not 0.01 <= self.node_poll <= 3.0:
            raise DeployError(f"--node-poll {self.node_poll} is not 0 (Flower's fixed waits) or in [0.01, 3] s")
        if not 0.01 <= self.task_poll <= 60.0:
            raise DeployError(f"--task-poll {self.task_poll} is not in [0.01, 60] s (Flower's allowed range)")
        if self.executor == "warm" or self.node_poll:
            problem = flwr_version_problem()
            if problem:
                raise DeployError(problem)


# ----------------------------------------------------------------------------- node config


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
    if not sd:
        # without one the node's private state (its mixture) would live where the server says, or
        # be lost on every restart: each SuperNode keeps it in a directory of its own
        raise DeployError(
            "node config needs a 'state-dir': the directory where this SuperNode keeps its clients' "
            "private state (mixture, local adaptors) across rounds, restarts and runs (the server "
            "cannot choose it); pass --state-dir DIR"
        )
    # same probe as floral_flwr.client.state_store.check_writable (no torch import here)
    try:
        Path(str(sd)).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(sd), prefix=".probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise DeployError(f"node config 'state-dir' = '{sd}' is not writable: {exc}") from None
