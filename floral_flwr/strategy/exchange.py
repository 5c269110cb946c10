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

import queue
import threading
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
    ``timeout`` s have passed (the replies that arrived, like ``send_and_receive``).

    The pulls run in a helper thread: Flower's ``pull_messages`` returns a reply as soon as its
    header is on the SuperLink and then blocks until all of its arrays are there, so a node
    that is still uploading (a slow link) would hold the round past ``timeout``; here the round
    ends at ``timeout`` and such a late reply is dropped when it completes."""
    if poll <= 0 or getattr(grid, "in_process", False):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(_packed(messages)))
    deadline = time.monotonic() + timeout
    arrived: queue.Queue = queue.Queue()
    done = threading.Event()
    threading.Thread(target=_pull_until_done, args=(grid, set(pending), poll, arrived, done), daemon=True).start()
    replies: list[Message] = []
    try:
        while pending:
            try:
                item = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break  # reply-timeout: the others count as missing
            if isinstance(item, BaseException):
                raise item
            replies.append(_unpacked(item))
            pending.discard(item.metadata.reply_to_message_id)
    finally:
        done.set()
    return replies


def _pull_until_done(grid: Grid, pending: set[str], poll: float, arrived: queue.Queue,
                     done: threading.Event) -> None:
    try:
        while pending and not done.is_set():
            for msg in grid.pull_messages(pending):
                pending.discard(msg.metadata.reply_to_message_id)
                if not done.is_set():
                    arrived.put(msg)
            if pending:
                done.wait(poll)
    except BaseException as exc:  # noqa: BLE001 - re-raised by exchange() in the round's thread
        if not done.is_set():
            arrived.put(exc)


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
