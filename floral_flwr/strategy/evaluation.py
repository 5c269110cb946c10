"""Personalized evaluation on the server: checking evaluate replies, and summarising them.

Each sampled client evaluates its own personalized model and replies with its metric, loss and
example count; its mixture only with run config ``report-mixtures`` (in 'mean' mode the argmax,
``assigned-adaptor``, for the cluster ARI). :func:`collect_eval_rows` validates the replies
(:mod:`.validation`) into one row per client; :func:`summarize_eval` gives the mean, std,
worst-10 %, example-weighted mean, per-cluster means and the cluster ARI of the clients that
trained, and :func:`summarize_holdout` the zero-shot vs adapted metric of held-out clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from floral_flwr.strategy.eval_fold import eval_record_name
from floral_flwr.strategy.masked_sum import ari_from_table
from floral_flwr.strategy.validation import InvalidReply, validate_eval_metrics


@dataclass
class EvalRows:
    """The validated rows of one evaluation round (sorted by client id) and what was dropped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0  # error replies
    rejected: int = 0  # replies that failed validation


def collect_eval_rows(
    replies: Iterable[Message], server_round: int, metric: str, num_adaptors: int,
    client_ids: Mapping[int, int],
) -> EvalRows:
    """Validate each evaluate reply into a row; errors and invalid replies are logged and counted."""
    out = EvalRows()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.failures += 1
            log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, node, msg.error.reason)
            continue
        name = eval_record_name(msg)  # an evaluate reply, or a train reply that evaluated first
        try:
            if name not in msg.content.metric_records:
                raise InvalidReply(f"no MetricRecord '{name}'")
            row = validate_eval_metrics(msg.content.metric_records[name], metric, num_adaptors)
        except (InvalidReply, ValueError, TypeError) as exc:
            out.rejected += 1
            log(WARNING, "round %d: rejected evaluation from node %d: %s", server_round, node, exc)
            continue
        row.setdefault("client-id", client_ids.get(node, -1))
        out.rows.append(row)
    out.rows.sort(key=lambda r: r["client-id"])
    return out


def summarize_round(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """The summary of the clients that trained (all rows if none did), plus the holdout summary."""
    trained = [r for r in rows if not r.get("holdout")]
    held = [r for r in rows if r.get("holdout")]
    summary = summarize_eval(trained or rows, metric)
    if held:
        summary.update(summarize_holdout(held, metric))
    return summary


def summarize_eval(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Mean/std/worst-10 % of the personalized metric, per-cluster means, and cluster ARI."""
    if not rows:
        return {}
    vals = np.array([float(r[metric]) for r in rows])
    higher_better = metric != "mse"
    order = np.sort(vals) if higher_better else -np.sort(-vals)
    k = max(1, int(np.ceil(0.1 * len(vals))))
    weights = np.array([float(r["num-examples"]) for r in rows])
    out = {
        f"{metric}-mean": float(vals.mean()),
        f"{metric}-std": float(vals.std()),
        f"{metric}-worst10": float(order[:k].mean()),
        f"{metric}-weighted": float((vals * weights).sum() / weights.sum()),
        "loss-mean": float(np.mean([float(r["loss"]) for r in rows])),
        "num-clients": float(len(rows)),
    }
    clusters = [int(r.get("true-cluster", -1)) for r in rows]
    if all(c >= 0 for c in clusters):
        for c in sorted(set(clusters)):
            out[f"{metric}-cluster{c}"] = float(np.mean([v for v, cc in zip(vals, clusters) if cc == c]))
        assigned = [_assigned(r) for r in rows]
        if all(a is not None for a in assigned) and len(set(clusters)) > 1:
            # the same ARI as the secure tally's, from the plaintext table: no scikit-learn import
            # (2-3 s on a loaded small CPU, paid by the first evaluation round of every run)
            # labels made dense first: a reply's true-cluster may be any integer up to 2**31 - 1,
            # which must not size the table (the ARI does not depend on the labels' values)
            true_ids = np.unique(clusters, return_inverse=True)[1]
            chosen_ids = np.unique(assigned, return_inverse=True)[1]
            table = np.zeros((int(true_ids.max()) + 1, int(chosen_ids.max()) + 1), dtype=np.int64)
            np.add.at(table, (true_ids, chosen_ids), 1)
            ari = ari_from_table(table)
            if ari is not None:
                out["cluster-ari"] = float(ari)
    return out


def _assigned(row: dict[str, Any]) -> int | None:
    """The adaptor a client is assigned to, from a plaintext reply: its reported mixture
    (report-mixtures) or its argmax ('mean' mode); None under secagg (the ARI then comes from a
    securely summed table, :mod:`.secure_rounds`)."""
    if row.get("mixture"):
        return int(np.argmax(row["mixture"]))
    if "assigned-adaptor" in row:
        return int(row["assigned-adaptor"])
    return None


def summarize_holdout(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Clients that never trained: zero-shot vs adapted metric (means over those clients)."""
    zs = [float(r[f"zero-shot-{metric}"]) for r in rows if f"zero-shot-{metric}" in r]
    ad = [float(r[metric]) for r in rows]
    out = {
        "holdout-num-clients": float(len(rows)),
        f"holdout-{metric}-adapted": float(np.mean(ad)),
        "holdout-adapt-steps": float(np.mean([float(r.get("adapt-steps", 0)) for r in rows])),
    }
    if zs:
        out[f"holdout-{metric}-zero-shot"] = float(np.mean(zs))
    return out
