"""Sending messages and collecting their replies, at the speed of the round.

Flower's ``Grid.send_and_receive`` pulls replies every 3 s (``http_grid.py``), so a deployed
round that takes 0.5 s of work waits up to 3 s for nothing. :func:`exchange` does the same job
through the Grid's public ``push_messages`` / ``pull_messages``, pulling every ``poll`` seconds
(run config ``reply-poll``), and packs the arrays of every outgoing record into one Array
(:func:`floral_flwr.wire.pack_record`: ~6 objects per message instead of ~2 per array, each one
HTTP request per hop); replies come back packed by the ClientApp's ``packed_arrays_mod`` and are
unpacked here, so the strategy sees the records it always saw, bit for bit.

``poll = 0`` keeps Flower's own ``send_and_receive`` and per-array records (today's path, for
comparisons). A grid that runs its clients in-process (``in_process = True``, the tests'
``InlineGrid``) has nothing to poll and no wire: ``send_and_receive`` is used as is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from floral_flwr.wire import pack_content, unpack_content

DEFAULT_POLL = 0.1  # s between pulls (run config "reply-poll"); Flower's send_and_receive: 3 s


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, poll: float = DEFAULT_POLL) -> list[Message]:
    """Push ``messages``, then pull their replies every ``poll`` s until all are in or
    ``timeout`` s have passed (the replies that arrived, like ``send_and_receive``)."""
    if poll <= 0 or getattr(grid, "in_process", False):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(_packed(messages)))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(_unpacked(m) for m in got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def _packed(messages: Iterable[Message]) -> list[Message]:
    """The messages with packed arrays; a RecordDict shared by several messages (one round's
    broadcast) is packed once and stays shared (Flower then uploads its objects once)."""
    done: dict[int, object] = {}
    out = []
    for msg in messages:
        if msg.has_content():
            key = id(msg.content)
            if key not in done:
                done[key] = pack_content(msg.content)
            msg.content = done[key]  # type: ignore[assignment]
        out.append(msg)
    return out


def _unpacked(msg: Message) -> Message:
    if msg.has_error() or not msg.has_content():
        return msg
    try:
        msg.content = unpack_content(msg.content)
    except ValueError as exc:  # left packed: the strategy's validation rejects it, with the node id
        log(WARNING, "reply from node %d has malformed packed arrays: %s", msg.metadata.src_node_id, exc)
    return msg
