"""Which nodes take part in a round: waiting for them, learning who they are, sampling them.

- :func:`wait_for_nodes` blocks until enough nodes are connected, with a timeout and a message
  that names the run-config keys to change instead of an endless loop;
- :class:`ClientDirectory` asks nodes it does not know for their client id and train size (a
  ``query`` message, every field checked), records the server's cap on each client's weight
  (:mod:`.bounds`: never the declared size), refuses a second node claiming a client that a
  connected node serves (a warning naming both; it is admitted once the first one is gone, as
  when a SuperNode restarts), and remembers the held-out clients;
- :func:`sample_nodes` draws a seeded sample from nodes ordered by client id, so the sample is a
  deterministic function of (seed, round, client ids): a resumed run samples exactly what the
  uninterrupted run would have, whatever node ids the engine handed out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from floral_flwr.strategy.bounds import ExampleCaps
from floral_flwr.strategy.exchange import DEFAULT_POLL, exchange
from floral_flwr.strategy.validation import InvalidReply, check_discovery

UNKNOWN_CLIENT = 1 << 62  # sorts nodes with no known client id last


class NodeWaitTimeout(RuntimeError):
    """Too few nodes connected within ``node_wait_timeout`` seconds."""


class ClientSetupError(RuntimeError):
    """Every node failed to set up (bad data, bad config on the client side): nothing can train."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Block until ``minimum`` nodes are connected, at most ``timeout`` s; their sorted ids."""
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        now = time.monotonic()
        if now > deadline:
            raise NodeWaitTimeout(
                f"only {len(nodes)} node(s) connected after waiting {timeout:g} s, "
                f"but {minimum} are required (run config 'min-available-nodes' / the sample "
                f"size). Start more SuperNodes, pass --federation-config "
                f"\"num-supernodes=N\" in simulation, lower 'min-available-nodes', or raise "
                f"'node-wait-timeout'."
            )
        if now - last_log > 5:
            log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), minimum)
            last_log = now
        time.sleep(0.2)


class ClientDirectory:
    """What the server knows about each node: its client id, weight cap and role."""

    def __init__(self, caps: ExampleCaps | None = None) -> None:
        self.caps = caps if caps is not None else ExampleCaps()
        self.client_ids: dict[int, int] = {}  # node id -> client id (partition id)
        self.client_sizes: dict[int, float] = {}  # node id -> the server's cap on num-examples
        # node ids replaced by a newer node with the same client id (a restarted SuperNode gets a
        # new node id; the old one stays "online" in the SuperLink until its heartbeat expires)
        self.superseded: set[int] = set()
        self.holdout_nodes: set[int] = set()  # nodes that never train (run config holdout-clients)
        # node -> its checked discovery reply, while another connected node serves that client
        self.refused: dict[int, dict] = {}

    def discover(self, grid: Grid, timeout: float = 120.0, poll: float = DEFAULT_POLL,
                 nodes: list[int] | None = None) -> None:
        """Ask nodes we do not know yet for their client id and train size (a query message);
        ``nodes``: the connected nodes when the caller just asked the grid (one request less)."""
        nodes = sorted(grid.get_node_ids() if nodes is None else nodes)
        self._readmit(nodes)
        unknown = [n for n in nodes if n not in self.client_ids and n not in self.refused]
        if not unknown:
            return
        msgs = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown
        ]
        errors = []
        checked: list[tuple[int, dict]] = []
        answered: set[int] = set()
        for reply in exchange(grid, msgs, timeout, poll):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                log(WARNING, "Node %d failed the discovery query: %s", node, reply.error.reason)
                errors.append(reply.error.reason)
                continue
            try:
                if "metrics" not in reply.content.metric_records:
                    raise InvalidReply("no MetricRecord 'metrics'")
                checked.append((node, check_discovery(reply.content.metric_records["metrics"])))
            except (InvalidReply, KeyError, TypeError, ValueError) as exc:
                log(WARNING, "Node %d sent a malformed discovery reply (%s): ignored", node, exc)
                errors.append(f"node {node}: malformed discovery reply ({exc})")
        self._pin_partitions(checked)
        for node, info in sorted(checked):
            try:
                self._learn(node, info, set(nodes))
            except InvalidReply as exc:
                log(WARNING, "Node %d sent a discovery reply the server refuses (%s): ignored", node, exc)
                errors.append(f"node {node}: {exc}")
        silent = sorted(set(unknown) - answered)
        if errors and not self.client_ids:
            # no node can run the task: stop before training instead of running empty rounds
            raise ClientSetupError(f"all {len(errors)} node(s) failed to set up the task; first error: {errors[0]}")
        if silent and not self.client_ids:
            raise ClientSetupError(
                f"none of the {len(silent)} connected node(s) answered the discovery query within "
                f"{timeout:g} s (run config 'reply-timeout'): the ClientApps are not running or are "
                f"starved of CPU; nothing can be sampled")
        if silent:
            # not sampled until they answer (asked again next round): say so, a smaller sample
            # than the run asked for must never be silent
            log(WARNING, "Discovery: %d of %d node(s) did not answer within %g s (run config "
                "'reply-timeout'); they are not sampled until they answer: %s", len(silent), len(unknown),
                timeout, silent[:10])

    def _pin_partitions(self, checked: list[tuple[int, dict]]) -> None:
        """The federation's number of partitions: the value most nodes of the first discovery
        report (one node claiming another count cannot set it for everyone)."""
        if self.caps.num_partitions is not None:
            return
        counts: dict[int, int] = {}
        for _, info in checked:
            if "num-partitions" in info:
                counts[int(info["num-partitions"])] = counts.get(int(info["num-partitions"]), 0) + 1
        if counts:
            self.caps.admit_partitions(max(counts, key=lambda v: (counts[v], -v)))

    def _serving(self, cid: int, connected: set[int], besides: int) -> int | None:
        """The connected, current node serving client ``cid`` (other than ``besides``)."""
        for old, old_cid in self.client_ids.items():
            if old_cid == cid and old != besides and old not in self.superseded and old in connected:
                return old
        return None

    def _learn(self, node: int, info: dict, connected: set[int]) -> None:
        """Record one checked discovery reply. A client that a connected node already serves is
        refused (an impersonator must not evict the honest node); a node that is gone is
        superseded by the new one (a restarted SuperNode gets a new node id)."""
        cid = int(info["client-id"])
        holder = self._serving(cid, connected, node)
        if holder is not None:
            if node not in self.refused:
                log(WARNING, "node %d claims client %d, which node %d serves: refused (stop node %d "
                    "first if it was replaced, or give node %d its own partition-id)", node, cid, holder, holder, node)
            self.refused[node] = info
            return
        self.refused.pop(node, None)
        cap = self.caps.admit(cid, float(info["num-train-examples"]), info.get("num-partitions"))
        for old, old_cid in self.client_ids.items():
            if old_cid == cid and old != node and old not in self.superseded:
                self.superseded.add(old)
                log(INFO, "node %d serves client %d now; node %d (restarted or replaced) is gone",
                    node, cid, old)
        self.client_ids[node] = cid
        self.client_sizes[node] = cap
        if int(info.get("holdout", 0)):
            self.holdout_nodes.add(node)

    def _readmit(self, connected: list[int]) -> None:
        """Refused claimants whose rival is gone are admitted now (their reply was checked)."""
        alive = set(connected)
        for node in [n for n in self.refused if n in alive]:
            info = self.refused[node]
            if self._serving(int(info["client-id"]), alive, node) is None:
                try:
                    self._learn(node, info, alive)
                except InvalidReply as exc:
                    self.refused.pop(node, None)
                    log(WARNING, "node %d: %s: ignored", node, exc)
        for node in [n for n in self.refused if n not in alive]:
            del self.refused[node]

    def ordered(self, nodes: Iterable[int]) -> list[int]:
        """``nodes`` by client id, so that seeded sampling does not depend on random node ids."""
        return sorted(nodes, key=lambda n: (self.client_ids.get(n, UNKNOWN_CLIENT), n))

    def candidates(self, grid: Grid, connected: list[int], training: bool, fresh: bool = True) -> list[int]:
        """Known, current nodes in client-id order (all ``connected`` ones if none is known yet);
        held-out clients never take part in ``training``. ``fresh=False``: ``connected`` is
        current (the caller just asked the grid), no new request."""
        online = grid.get_node_ids() if fresh else connected
        nodes = self.ordered(
            n for n in online if n in self.client_ids and n not in self.superseded
        ) or self.ordered(connected)
        if training and self.holdout_nodes:
            nodes = [n for n in nodes if n not in self.holdout_nodes]
        return nodes


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """How many of ``num_nodes`` nodes :func:`sample_nodes` draws."""
    return min(num_nodes, max(int(num_nodes * fraction), minimum))


def sample_nodes(
    nodes: list[int], fraction: float, minimum: int, seed: int, server_round: int, salt: int
) -> list[int]:
    """Deterministic sample of ``max(int(N * fraction), minimum)`` of the ordered ``nodes``."""
    size = sample_size(len(nodes), fraction, minimum)
    if size >= len(nodes):
        return nodes
    rng = np.random.default_rng([seed, server_round, salt])
    idx = np.sort(rng.choice(len(nodes), size=size, replace=False))
    return [nodes[i] for i in idx]
