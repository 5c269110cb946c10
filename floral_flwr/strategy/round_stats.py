"""``RoundStats``: the bookkeeping of one server round (counts, losses, bytes, timings).

The strategy fills one per round; the results recorder (:mod:`floral_flwr.results`) reads it
to write ``rounds.csv``, ``clients.csv`` and the progress line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundStats:
    """Bookkeeping of one round, read by the results recorder."""

    server_round: int
    sampled: int = 0
    received: int = 0
    failures: int = 0
    rejected: int = 0
    train_loss: float = float("nan")
    adaptor_totals: list[float] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_summary: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds_train: float = 0.0
    seconds_eval: float = 0.0
    seconds_aggregate: float = 0.0  # server time in aggregate_train (decode, validate, accumulate)
