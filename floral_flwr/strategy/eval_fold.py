"""An evaluation round's evaluation, folded into the next round's train messages.

Round r's evaluation needs round r's *aggregated* global state, which is exactly what round r+1's
train messages carry. So instead of a separate exchange after round r (a second message to every
client: in deployment a second ClientApp start-up and a second set of waits), the strategy
samples round r's evaluation clients where it always did (after round r's aggregation), and then
sends, in round r+1's single exchange:

- to each evaluation client that also trains in round r+1: its train message, whose config says
  ``evaluate-round = r``; the client first evaluates (the shared state of the message and its
  private state of round r, as a separate evaluate message would), then trains, and replies with
  the metrics in a MetricRecord :data:`EVAL_RECORD` next to its train reply;
- to each evaluation client that does not train in round r+1: the evaluate message of today.

The numbers are the ones of a separate evaluation (a test checks them bit for bit in
simulation); round r is recorded (``on_round_end``) as soon as that exchange's replies are in,
before round r+1's aggregation. The last round's evaluation, with nothing after it, is sent at
once as before. Run config ``fold-evaluation = false`` sends every evaluation separately.

One difference: a folded client whose *training* then fails (an error reply) loses that
evaluation too (it counts as a failed train and a failed evaluation); a separate evaluate
message would still have been answered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from floral_flwr.strategy.replies import record_nbytes
from floral_flwr.strategy.round_stats import RoundStats

EVAL_ROUND_KEY = "evaluate-round"  # train config: evaluate for this round first
EVAL_RECORD = "evaluate-metrics"  # train reply: the MetricRecord of that evaluation


@dataclass
class PendingEval:
    """Round ``round``'s evaluation, sampled and waiting for the next round's exchange."""

    round: int
    arrays: ArrayRecord  # round ``round``'s global state (what its on_round_end records)
    stats: RoundStats  # round ``round``'s bookkeeping, completed when the replies are in
    nodes: set[int]  # the nodes sampled to evaluate
    config: ConfigRecord = field(default_factory=ConfigRecord)  # the evaluate config


def fold_into(pending: PendingEval, train_msgs: list[Message], arrays_key: str, config_key: str) -> list[Message]:
    """Round r+1's messages with round r's evaluation folded in: the train messages (those to
    evaluation nodes with ``evaluate-round``), plus an evaluate message to each evaluation node
    that does not train. Adds the evaluate messages' bytes to round r's ``bytes_down``."""
    out: list[Message] = []
    training: set[int] = set()
    for msg in train_msgs:
        node = msg.metadata.dst_node_id
        training.add(node)
        if node not in pending.nodes:
            out.append(msg)
            continue
        # a record of its own: the train messages of a round share one RecordDict
        config = ConfigRecord({**dict(msg.content.config_records[config_key]), EVAL_ROUND_KEY: pending.round})
        content = RecordDict({arrays_key: msg.content.array_records[arrays_key], config_key: config})
        out.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    others = sorted(pending.nodes - training)
    if others:
        config = ConfigRecord({**dict(pending.config), "server-round": pending.round})
        record = RecordDict({arrays_key: pending.arrays, config_key: config})
        out += [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in others]
        pending.stats.bytes_down += record_nbytes(pending.arrays) * len(others)
    return out


def split_folded_replies(replies: Iterable[Message], pending: PendingEval) -> tuple[list[Message], list[Message]]:
    """(train replies, replies that carry round r's evaluation). A train reply of an evaluation
    node is in both lists (its error, if any, is a failed train and a failed evaluation)."""
    train: list[Message] = []
    evaluated: list[Message] = []
    for msg in replies:
        if msg.metadata.message_type == MessageType.EVALUATE:
            evaluated.append(msg)
            continue
        train.append(msg)
        if msg.metadata.src_node_id in pending.nodes:
            evaluated.append(msg)
    return train, evaluated


def eval_record_name(msg: Message) -> str:
    """Where an evaluation reply keeps its metrics: ``metrics`` in an evaluate reply,
    :data:`EVAL_RECORD` in a train reply that evaluated first."""
    return EVAL_RECORD if msg.metadata.message_type == MessageType.TRAIN else "metrics"
