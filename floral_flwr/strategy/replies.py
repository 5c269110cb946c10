"""Train replies on the server: their fixed order, checking each, and folding the good ones in.

:func:`fold_train_replies` sorts the replies by the client id each reports (float32 partial sums
depend on the order of the additions, and the engine delivers replies in any order), decodes
and validates each one (:mod:`.validation`) and adds the good ones to the p(k|c) accumulator
(:mod:`.aggregate`); error replies and invalid ones are counted and logged with the node id,
never aggregated. :func:`report_unanswered` logs the error replies and counts the sampled nodes
that sent nothing within the reply timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from floral_flwr.strategy.aggregate import FloralAccumulator
from floral_flwr.strategy.validation import InvalidReply, TrainReply, validate_train_reply
from floral_flwr.wire import from_array

NO_CLIENT_ID = 1 << 62  # sorts error and malformed replies last (they are not aggregated anyway)


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays of ``record`` (what one message carries)."""
    return int(sum(len(a.data) for a in record.values()))


def reply_order(msg: Message) -> tuple[int, int]:
    """Sort key of a train reply: (reported client id, node id); errors and malformed replies
    last (they are not aggregated anyway)."""
    cid = NO_CLIENT_ID
    if not msg.has_error():
        try:
            cid = int(msg.content.metric_records["metrics"]["client-id"])
        except (KeyError, TypeError, ValueError):
            pass
    return cid, int(msg.metadata.src_node_id)


def check_train_reply(
    msg: Message, arrayrecord_key: str, template: Mapping[str, np.ndarray], num_adaptors: int,
    max_examples: float | None,
) -> tuple[TrainReply, ArrayRecord]:
    """Decode and validate one (non-error) train reply; raises InvalidReply (or ValueError /
    TypeError from decoding) when it must not be aggregated."""
    if arrayrecord_key not in msg.content.array_records:
        raise InvalidReply(f"no ArrayRecord '{arrayrecord_key}'")
    if "metrics" not in msg.content.metric_records:
        raise InvalidReply("no MetricRecord 'metrics'")
    record = msg.content.array_records[arrayrecord_key]
    arrays = {k: from_array(a) for k, a in record.items()}
    checked = validate_train_reply(
        arrays, msg.content.metric_records["metrics"], template, num_adaptors, max_examples=max_examples
    )
    return checked, record


@dataclass
class FoldedReplies:
    """What :func:`fold_train_replies` saw: the accepted replies' losses and weights, the error
    replies (node, reason), the number rejected, every replying node, and the bytes accepted."""

    losses: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    rejected: int = 0
    answered: list[int] = field(default_factory=list)
    bytes_up: int = 0


def fold_train_replies(
    replies: Iterable[Message], acc: FloralAccumulator, *, server_round: int, arrayrecord_key: str,
    template: Mapping[str, np.ndarray], num_adaptors: int, client_sizes: Mapping[int, float],
    presummed: bool,
) -> FoldedReplies:
    """Add every valid reply, in :func:`reply_order`, to ``acc``; count and log the others."""
    out = FoldedReplies()
    for msg in sorted(replies, key=reply_order):
        node = msg.metadata.src_node_id
        out.answered.append(node)
        if msg.has_error():
            out.errors.append((node, msg.error.reason))
            continue
        try:
            checked, record = check_train_reply(
                msg, arrayrecord_key, template, num_adaptors, client_sizes.get(node)
            )
        except (InvalidReply, ValueError, TypeError) as exc:
            out.rejected += 1
            log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, exc)
            continue
        acc.add(checked.arrays, checked.num_examples, checked.adaptor_weights, presummed=presummed)
        out.bytes_up += record_nbytes(record)
        out.losses.append(checked.train_loss)
        out.weights.append(checked.num_examples)
    return out


def report_unanswered(server_round: int, folded: FoldedReplies, sampled: set[int]) -> int:
    """Log the error replies and the sampled nodes that sent nothing; returns how many sent nothing."""
    awaiting = sampled.difference(folded.answered)
    for node, reason in folded.errors:
        # the SuperLink answers for a node whose heartbeat expired (src = the SuperLink)
        who = (str(node) if (node in sampled or not sampled)
               else f"{sorted(awaiting)} (answered by the SuperLink)")
        log(WARNING, "round %d: node %s failed: %s", server_round, who, reason)
    missing = len(sampled) - len(folded.answered)
    if missing > 0:  # no reply within reply-timeout: a SuperNode died or is too slow
        log(WARNING, "round %d: %d sampled node(s) among %s sent no reply within the reply timeout "
            "(run config 'reply-timeout'): counted as failures", server_round, missing, sorted(awaiting))
    return max(missing, 0)
