"""Train replies on the server: their fixed order, checking each, and folding the good ones in.

:func:`fold_train_replies` sorts the replies by the client id each reports (float32 partial sums
depend on the order of the additions, and the engine delivers replies in any order), decodes
each one against the global state's shapes before anything is allocated (:mod:`floral_flwr.wire`),
validates it (:mod:`.validation`: its weight capped by what the server knows about that node,
its client id the one discovery recorded) and adds the good ones to the accumulator (the p(k|c)
rule of :mod:`.aggregate`, or a robust mode of :mod:`.robust`); error replies and invalid ones
are counted and logged with the node id, never aggregated. :func:`report_unanswered` logs the error replies and counts the sampled nodes
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
from floral_flwr.strategy.validation import InvalidReply, TrainReply, check_client_id, validate_train_reply
from floral_flwr.wire import decode_record

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
            cid = check_client_id(msg.content.metric_records["metrics"]["client-id"])
        except (KeyError, TypeError, InvalidReply):  # inf, NaN, 1e300, ...: validated (and refused) later
            pass
    return cid, int(msg.metadata.src_node_id)


def check_train_reply(
    msg: Message, arrayrecord_key: str, template: Mapping[str, np.ndarray], num_adaptors: int,
    max_examples: float | None, expected_client_id: int | None = None,
) -> tuple[TrainReply, ArrayRecord]:
    """Decode and validate one (non-error) train reply; raises InvalidReply (or ValueError /
    TypeError from decoding) when it must not be aggregated."""
    if arrayrecord_key not in msg.content.array_records:
        raise InvalidReply(f"no ArrayRecord '{arrayrecord_key}'")
    if "metrics" not in msg.content.metric_records:
        raise InvalidReply("no MetricRecord 'metrics'")
    record = msg.content.array_records[arrayrecord_key]
    arrays = decode_record(record, template)  # sizes checked before anything is allocated
    checked = validate_train_reply(
        arrays, msg.content.metric_records["metrics"], template, num_adaptors, max_examples=max_examples,
        expected_client_id=expected_client_id,
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
    first_rejection: str = ""  # "node N: why", for the message when nothing was accepted


def fold_train_replies(
    replies: Iterable[Message], acc: FloralAccumulator, *, server_round: int, arrayrecord_key: str,
    template: Mapping[str, np.ndarray], num_adaptors: int, client_sizes: Mapping[int, float],
    presummed: bool, client_ids: Mapping[int, int] | None = None,
) -> FoldedReplies:
    """Add every valid reply, in :func:`reply_order`, to ``acc``; count and log the others.

    ``client_sizes``: node -> the server's cap on its num-examples (a node the server has no cap
    for may not contribute); ``client_ids``: node -> the client id discovery recorded."""
    out = FoldedReplies()
    for msg in sorted(replies, key=reply_order):
        node = msg.metadata.src_node_id
        out.answered.append(node)
        if msg.has_error():
            out.errors.append((node, msg.error.reason))
            continue
        try:
            checked, record = check_train_reply(
                msg, arrayrecord_key, template, num_adaptors, client_sizes.get(node, 0.0),
                (client_ids or {}).get(node),
            )
        except (InvalidReply, ValueError, TypeError, OverflowError) as exc:
            out.rejected += 1
            out.first_rejection = out.first_rejection or f"node {node}: {exc}"
            log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, exc)
            continue
        acc.add(checked.arrays, checked.num_examples, checked.adaptor_weights, presummed=presummed,
                small=checked.small)
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
