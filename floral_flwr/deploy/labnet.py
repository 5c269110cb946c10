"""A real network on one machine: each SuperNode in its own Linux network namespace, joined to
this (the SuperLink's) namespace by a veth pair, links shaped with ``tc``; for multi-host tests
and the edge-network benchmark.

Node i lives in namespace ``<name>-n<i>`` at ``198.18.<i>.2/24`` (RFC 2544 benchmark range);
the SuperLink's end of its link is ``198.18.<i>.1`` in this namespace, so every byte between
them crosses a veth pair on non-loopback addresses. ``shape`` puts an edge link on both ends
(``netem`` delay/loss/rate where the kernel has it, else ``tbf`` for the rate and, where the
``iptables`` tool and the kernel's ``statistic`` match are there, random packet loss as
``iptables`` DROP rules on the receiving end of the link), ``cut`` and ``restore`` take a link
down and up. Everything is made by this process and torn down by ``down`` (deleting a namespace
deletes its veth pair; the loss rules in this namespace are deleted one by one). Needs root
(CAP_NET_ADMIN) and the ``ip``/``tc`` tools; :func:`labnet_problem` says why not, in one line,
where they are missing; :func:`iptables_loss_problem` the same for the loss without netem.
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


def _loss_rule(dev: str, loss_pct: float) -> list[str]:
    """The INPUT rule that drops ``loss_pct`` % of the packets arriving on ``dev`` at random."""
    return ["INPUT", "-i", dev, "-m", "statistic", "--mode", "random", "--probability",
            f"{loss_pct / 100:.6g}", "-j", "DROP"]


def iptables_loss_problem() -> str | None:
    """None when random packet loss can be made without netem (``iptables`` with the kernel's
    ``statistic`` match, probed in a throw-away namespace), else why not (one line)."""
    if shutil.which("iptables") is None:
        return "the `iptables` tool is not installed (Debian/Ubuntu: apt-get install -y iptables)"
    ns = f"flloss{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", ns)
        p = _run("ip", "netns", "exec", ns, "iptables", "-w", "-A", *_loss_rule("lo", 1.0), check=False)
        if p.returncode != 0:
            return f"`iptables -m statistic` refused: {(p.stderr or p.stdout).strip()}"
        return None
    except LabNetError as exc:
        return str(exc)
    finally:
        _run("ip", "netns", "del", ns, check=False)


@dataclass
class LabNet:
    """``num_nodes`` namespaces joined to this one by veth pairs (see the module docstring)."""

    num_nodes: int
    name: str = field(default_factory=lambda: f"fl{os.getpid() % 10000}")
    made: list[str] = field(default_factory=list)
    # loss rules (node, side, rule) in place; those of side "node" live in this namespace
    loss_rules: list[tuple[int, str, list[str]]] = field(default_factory=list)

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
        """Delete every namespace this object made (their veth pairs go with them) and every loss
        rule it added here."""
        for i in range(self.num_nodes):
            self._drop_loss(i)
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
        round trip is ``2 * delay_ms``). ``netem=False`` (kernels without it): ``tbf`` for the rate,
        ``iptables`` for the loss (see :func:`iptables_loss_problem`; a LabNetError where it is
        missing), no delay."""
        for side in sides:
            if loss_pct and not netem:
                self._add_loss(i, side, loss_pct)
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

    def _add_loss(self, i: int, side: str, loss_pct: float) -> None:
        """Drop ``loss_pct`` % of what ``side`` sends at random, where it arrives (as a lossy
        link would). Segmentation offload is turned off on both ends first, so a packet is one
        MTU-sized frame, not a 64 KB TCP super-packet, and the loss is per frame as on a wire."""
        if (problem := iptables_loss_problem()) is not None:
            raise LabNetError(f"packet loss without netem: {problem}")
        _run("ip", "link", "set", "dev", self.host_dev(i), "gso_max_segs", "1")
        _run("ip", "-n", self.ns(i), "link", "set", "dev", self.node_dev(i), "gso_max_segs", "1")
        if side == "host":  # what node i downloads: dropped on arrival in its namespace
            rule = _loss_rule(self.node_dev(i), loss_pct)
            _run("ip", "netns", "exec", self.ns(i), "iptables", "-w", "-A", *rule)
        else:  # what node i uploads: dropped on arrival at the SuperLink's end, in this namespace
            rule = _loss_rule(self.host_dev(i), loss_pct)
            _run("iptables", "-w", "-A", *rule)
        self.loss_rules.append((i, side, rule))

    def _drop_loss(self, i: int) -> None:
        for entry in [e for e in self.loss_rules if e[0] == i]:
            _, side, rule = entry
            prefix = ["ip", "netns", "exec", self.ns(i)] if side == "host" else []
            _run(*prefix, "iptables", "-w", "-D", *rule, check=False)
            self.loss_rules.remove(entry)

    def dropped(self, i: int) -> dict[str, int]:
        """Packets the loss rules of node i dropped so far, per side ("host": on the way down to
        the node, "node": on the way up)."""
        out: dict[str, int] = {}
        for j, side, rule in self.loss_rules:
            if j != i:
                continue
            prefix = ["ip", "netns", "exec", self.ns(i)] if side == "host" else []
            listing = _run(*prefix, "iptables", "-w", "-L", "INPUT", "-v", "-n", "-x").stdout
            dev = rule[2]
            out[side] = sum(int(line.split()[0]) for line in listing.splitlines()
                            if f" {dev} " in f" {line} " and "statistic" in line)
        return out

    def unshape(self, i: int) -> None:
        self._drop_loss(i)
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
