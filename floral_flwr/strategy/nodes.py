"""Which nodes take part in a round: waiting for them, learning who they are, sampling them.

- :func:`wait_for_nodes` blocks until enough nodes are connected, with a timeout and a message
  that names the run-config keys to change instead of an endless loop;
- :class:`ClientDirectory` asks nodes it does not know for their client id and train size (a
  ``query`` message), drops a node that a restarted SuperNode replaced, and remembers the
  held-out clients;
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

from floral_flwr.strategy.exchange import DEFAULT_POLL, exchange

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
    """What the server knows about each node: its client id, train size and role."""

    def __init__(self) -> None:
        self.client_ids: dict[int, int] = {}  # node id -> client id (partition id)
        self.client_sizes: dict[int, float] = {}  # node id -> declared train examples
        # node ids replaced by a newer node with the same client id (a restarted SuperNode gets a
        # new node id; the old one stays "online" in the SuperLink until its heartbeat expires)
        self.superseded: set[int] = set()
        self.holdout_nodes: set[int] = set()  # nodes that never train (run config holdout-clients)

    def discover(self, grid: Grid, timeout: float = 120.0, poll: float = DEFAULT_POLL,
                 nodes: list[int] | None = None) -> None:
        """Ask nodes we do not know yet for their client id and train size (a query message);
        ``nodes``: the connected nodes when the caller just asked the grid (one request less)."""
        nodes = sorted(grid.get_node_ids()) if nodes is None else nodes
        unknown = [n for n in nodes if n not in self.client_ids]
        if not unknown:
            return
        msgs = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown
        ]
        errors = []
        for reply in exchange(grid, msgs, timeout, poll):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Node %d failed the discovery query: %s", node, reply.error.reason)
                errors.append(reply.error.reason)
                continue
            try:
                self._learn(node, reply.content["metrics"])
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "Node %d sent a malformed discovery reply (%s): ignored", node, exc)
        if errors and not self.client_ids:
            # no node can run the task: stop before training instead of running empty rounds
            raise ClientSetupError(f"all {len(errors)} node(s) failed to set up the task; first error: {errors[0]}")

    def _learn(self, node: int, metrics: dict) -> None:
        """Record one discovery reply; an older node serving the same client is superseded."""
        cid = int(metrics["client-id"])
        for old, old_cid in self.client_ids.items():
            if old_cid == cid and old != node and old not in self.superseded:
                self.superseded.add(old)
                log(INFO, "node %d serves client %d now; node %d (restarted or replaced) is dropped",
                    node, cid, old)
        self.client_ids[node] = cid
        self.client_sizes[node] = float(metrics["num-train-examples"])
        if int(metrics.get("holdout", 0)):
            self.holdout_nodes.add(node)

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


def sample_nodes(
    nodes: list[int], fraction: float, minimum: int, seed: int, server_round: int, salt: int
) -> list[int]:
    """Deterministic sample of ``max(int(N * fraction), minimum)`` of the ordered ``nodes``."""
    size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    if size >= len(nodes):
        return nodes
    rng = np.random.default_rng([seed, server_round, salt])
    idx = np.sort(rng.choice(len(nodes), size=size, replace=False))
    return [nodes[i] for i in idx]
