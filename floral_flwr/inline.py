"""An in-process, Ray-free federation: the real ServerApp logic against the real ClientApp.

``InlineGrid`` implements Flower's ``Grid`` by calling a ``ClientApp`` directly, one message
after the other, with one persistent ``Context`` per virtual node (as the simulation engine
keeps them). Messages are round-tripped through Flower's own protobuf serialization, so a
client never shares an object with the server, just as over the network. It exists for:

- unit tests of the ClientApp + strategy without Ray start-up;
- tuning and benchmarks, where Ray's per-message overhead would dominate tiny models;
- measuring what Flower itself costs (compare with ``flwr run`` in ``benchmarks/``).

It is not a deployment mode: there is no concurrency and no isolation between clients. Every
exchange the server runs works here, including the four stages of a SecAgg+ secure aggregation
(``aggregation='secagg'``, :mod:`floral_flwr.strategy.secagg`): each stage is one
``send_and_receive``, and each node's ``Context`` keeps the protocol state between them.
``run_inline(run_config, num_clients)`` runs a whole federation and returns the summary.

Note: building server-side messages needs the runtime's task identity, which only Flower's
own runtimes set; we set it through ``flwr.supercore.task_identity.TaskIdentity`` (internal).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def _roundtrip(msg: Message) -> Message:
    """Serialize and parse a message, as the wire would."""
    return message_from_proto(message_to_proto(msg))


class InlineGrid(Grid):
    """A Grid whose nodes are virtual clients run in this process (a simulation: ``simulated``).

    Parameters
    ----------
    client_app : ClientApp
        The application every node runs.
    num_nodes : int
        Number of virtual nodes; node k gets ``partition-id = k``.
    node_config : callable, optional
        ``k -> dict`` extra node config (e.g. ``state-dir``).
    reply_hook : callable, optional
        ``(node_id, reply) -> reply``, lets tests tamper with replies (fault injection); a hook
        that returns None loses the reply (the node looks dead to the server, e.g. a dropout in
        the middle of a secure-aggregation exchange).
    serialize : bool
        Round-trip messages through protobuf (default True).
    keep_replies : int or None
        ``replies_seen`` holds the last ``keep_replies`` replies (default 256; None: all). Every
        reply carries the client's whole shared state, so keeping all of them grows without
        bound (~10 GB over a 500-round, 300-client MNIST-sized run).
    """

    # the strategy's exchange() calls send_and_receive directly: nothing to poll, no wire
    in_process = True
    simulated = True  # every node is set up by whoever runs the server (floral_flwr.server.is_simulated)

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_config: Callable[[int], Mapping[str, Any]] | None = None,
        run_config: Mapping[str, Any] | None = None,
        reply_hook: Callable[[int, Message], Message | None] | None = None,
        serialize: bool = True,
        run_id: int = 1,
        keep_replies: int | None = 256,
    ) -> None:
        self.client_app = client_app
        self.reply_hook = reply_hook
        self.serialize = serialize
        self._run_id = run_id
        self.contexts: dict[int, Context] = {}
        self.replies_seen: deque[Message] = deque(maxlen=keep_replies)
        for k in range(num_nodes):
            node_id = 1000 + 7919 * k  # arbitrary, not equal to the partition id
            cfg = {"partition-id": k, "num-partitions": num_nodes, **dict((node_config or (lambda _: {}))(k))}
            self.contexts[node_id] = Context(
                run_id=run_id, node_id=node_id, node_config=cfg, state=RecordDict(), run_config=dict(run_config or {})
            )
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1

    # -- the Grid interface -------------------------------------------------------------

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used in-process
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - not used in-process
        raise NotImplementedError("InlineGrid has no Run object")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("InlineGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("InlineGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # set by the SuperLink in Flower
            incoming = _roundtrip(msg) if self.serialize else msg
            context = self.contexts[node]
            try:
                reply = self.client_app(incoming, context)
            except Exception as exc:  # the ClientApp runtime turns exceptions into error replies
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
            if self.serialize:
                reply = _roundtrip(reply)
            if self.reply_hook is not None:
                reply = self.reply_hook(node, reply)
                if reply is None:
                    continue
            self.replies_seen.append(reply)
            replies.append(reply)
        return replies


def run_inline(
    run_config: Mapping[str, Any],
    num_clients: int,
    node_config: Callable[[int], Mapping[str, Any]] | None = None,
    reply_hook: Callable[[int, Message], Message | None] | None = None,
) -> tuple[dict[str, Any], InlineGrid]:
    """Run a whole federation in-process; returns (summary, grid)."""
    from floral_flwr.client import make_client_app
    from floral_flwr.server import run_server

    grid = InlineGrid(make_client_app(run_config), num_clients, node_config=node_config, reply_hook=reply_hook)
    summary = run_server(grid, dict(run_config))
    return summary, grid
