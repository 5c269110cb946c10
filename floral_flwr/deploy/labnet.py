"""A real network on one machine: each SuperNode in its own Linux network namespace, joined to
this (the SuperLink's) namespace by a veth pair, links shaped with ``tc``; for multi-host tests
and the edge-network benchmark.

Node i lives in namespace ``<name>-n<i>`` at ``198.18.<i>.2/24`` (RFC 2544 benchmark range);
the SuperLink's end of its link is ``198.18.<i>.1`` in this namespace, so every byte between
them crosses a veth pair on non-loopback addresses. ``shape`` puts an edge link on both ends
(``netem`` delay/loss/rate where the kernel has it, else ``tbf``: rate only), ``cut`` and
``restore`` take a link down and up. Everything is made by this process and torn down by
``down`` (deleting a namespace deletes its veth pair). Needs root (CAP_NET_ADMIN) and the
``ip``/``tc`` tools; :func:`labnet_problem` says why not, in one line, where they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "198.18"


class LabNetError(RuntimeError):
    """A namespace, link or qdisc could not be made; the message names the command."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise LabNetError(f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()}")
    return p


def labnet_problem() -> str | None:
    """None when network namespaces can be made here, else why not (one line)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the `ip` and `tc` tools (iproute2) are not installed"
    probe = f"flprobe{os.getpid() % 100000}"
    p = _run("ip", "netns", "add", probe, check=False)
    if p.returncode != 0:
        return (f"the kernel refused `ip netns add` ({(p.stderr or p.stdout).strip()}): "
                f"network namespaces need root / CAP_NET_ADMIN")
    _run("ip", "netns", "del", probe, check=False)
    return None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (delay and loss); probed on a throw-away veth."""
    ns = f"flnetem{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        return _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "a0", "root", "netem",
                    "delay", "1ms", check=False).returncode == 0
    except LabNetError:
        return False
    finally:
        _run("ip", "netns", "del", ns, check=False)


@dataclass
class LabNet:
    """``num_nodes`` namespaces joined to this one by veth pairs (see the module docstring)."""

    num_nodes: int
    name: str = field(default_factory=lambda: f"fl{os.getpid() % 10000}")
    made: list[str] = field(default_factory=list)

    def ns(self, i: int) -> str:
        return f"{self.name}-n{i}"

    def link_ip(self, i: int) -> str:
        """The SuperLink's address as node i sees it."""
        return f"{SUBNET}.{i}.1"

    def node_ip(self, i: int) -> str:
        return f"{SUBNET}.{i}.2"

    def host_dev(self, i: int) -> str:
        return f"{self.name}h{i}"[:15]  # interface names are at most 15 characters

    def node_dev(self, i: int) -> str:
        return f"{self.name}v{i}"[:15]

    def up(self) -> "LabNet":
        try:
            for i in range(self.num_nodes):
                ns, h, v = self.ns(i), self.host_dev(i), self.node_dev(i)
                _run("ip", "netns", "add", ns)
                self.made.append(ns)
                _run("ip", "link", "add", h, "type", "veth", "peer", "name", v)
                _run("ip", "link", "set", v, "netns", ns)
                _run("ip", "addr", "add", f"{self.link_ip(i)}/24", "dev", h)
                _run("ip", "link", "set", h, "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.node_ip(i)}/24", "dev", v)
                _run("ip", "-n", ns, "link", "set", v, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")  # the SuperNode's Runtime API
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Delete every namespace this object made (their veth pairs go with them)."""
        for ns in reversed(self.made):
            _run("ip", "netns", "del", ns, check=False)
        for i in range(self.num_nodes):  # a host end left by a half-made pair
            _run("ip", "link", "del", self.host_dev(i), check=False)
        self.made.clear()

    def __enter__(self) -> "LabNet":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # shaping and faults ----------------------------------------------------------------------
    def _tc(self, i: int, side: str, *spec: str) -> None:
        if side == "host":  # egress of the SuperLink's end: what node i downloads
            _run("tc", "qdisc", "replace", "dev", self.host_dev(i), "root", *spec)
        else:  # egress of the node's end: what node i uploads
            _run("ip", "netns", "exec", self.ns(i), "tc", "qdisc", "replace", "dev", self.node_dev(i), "root", *spec)

    def shape(self, i: int, delay_ms: float = 0.0, rate_mbit: float | None = None, loss_pct: float = 0.0,
              sides: tuple[str, ...] = ("host", "node"), netem: bool = True) -> None:
        """An edge link for node i on the given sides (each side delays its own egress, so the
        round trip is ``2 * delay_ms``). ``netem=False`` (kernels without it): ``tbf``, rate only."""
        for side in sides:
            if netem:
                spec = ["netem"]
                if delay_ms:
                    spec += ["delay", f"{delay_ms:g}ms"]
                if loss_pct:
                    spec += ["loss", f"{loss_pct:g}%"]
                if rate_mbit:
                    spec += ["rate", f"{rate_mbit:g}mbit"]
                self._tc(i, side, *spec)
            elif rate_mbit:
                self._tc(i, side, "tbf", "rate", f"{rate_mbit:g}mbit", "burst", "16kb", "latency", "2s")

    def throttle(self, i: int, rate_kbit: float, side: str = "node") -> None:
        """A very slow link (a straggler): ``tbf`` at ``rate_kbit``."""
        self._tc(i, side, "tbf", "rate", f"{rate_kbit:g}kbit", "burst", "4kb", "latency", "60s")

    def unshape(self, i: int) -> None:
        _run("tc", "qdisc", "del", "dev", self.host_dev(i), "root", check=False)
        _run("ip", "netns", "exec", self.ns(i), "tc", "qdisc", "del", "dev", self.node_dev(i), "root", check=False)

    def cut(self, i: int) -> None:
        """Node i's link goes down (as an unplugged cable: TCP connections stay, packets stop)."""
        _run("ip", "link", "set", self.host_dev(i), "down")

    def restore(self, i: int) -> None:
        _run("ip", "link", "set", self.host_dev(i), "up")

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside node i's namespace."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.ns(i)]
