"""The secure parts of a FloralStrategy round (``aggregation = 'secagg'``).

- Train: the sampled clients' updates are summed by one SecAgg+ exchange
  (:func:`.secagg.secure_sum`); :func:`aggregate_secure` turns the sum into the new global state
  (:func:`.masked_sum.decode_train`) and fills the round's stats. The server never holds one
  client's update or weights; what it learns per client is in ``fitres.metrics`` (client id,
  n_k, train loss). Flower's server optimizers step on this aggregate as on the plaintext one
  (they wrap ``aggregate_train``).
- Evaluate: replies carry metrics only; the cluster ARI comes from a second exchange
  (:func:`secure_ari`) in which each evaluated client adds one-hot(true cluster) x
  one-hot(assigned adaptor), so the server learns the contingency table, not who is where.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from floral_flwr.config import ConfigError
from floral_flwr.strategy.masked_sum import (
    ADAPTORS_KEY,
    CLUSTERS_KEY,
    SCALE_KEY,
    ari_from_table,
    decode_tally,
    decode_train,
)
from floral_flwr.strategy.secagg import SecAggSettings, SecureSum, secure_sum
from floral_flwr.wire import to_array


@dataclass(frozen=True)
class SecureOptions:
    """What the strategy needs to run secure rounds."""

    settings: SecAggSettings
    num_clusters: int = 0  # the task's true clusters (0: none, no ARI)
    has_mixture: bool = False  # the method has a per-client mixture to assign clients with


def weight_scale(nodes: list[int], client_sizes: Mapping[int, float]) -> float:
    """s: the largest declared train size among the sampled clients (public: discovery), so every
    weight n_k / s, w_k(c) / s lies in [0, 1]."""
    sizes = [float(client_sizes.get(n, 0.0)) for n in nodes]
    return max(max(sizes, default=0.0), 1.0)


def secure_train_exchange(strategy: Any, rnd: int, arrays: ArrayRecord, grid: Grid,
                          train_config: ConfigRecord | None, first_round: bool) -> SecureSum:
    """Sample and send like a plaintext round, but through one SecAgg+ exchange. Too few
    clients stop the run in its first round (before any training) and skip a later round."""
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config or {})), grid))
    nodes = [int(m.metadata.dst_node_id) for m in msgs]
    if not msgs:
        return SecureSum(sampled=[])
    content = msgs[0].content  # every sampled client gets the same state and config
    config = dict(content["config"])
    config[SCALE_KEY] = weight_scale(nodes, strategy.clients.client_sizes)
    try:
        exchange = secure_sum(grid, nodes, content["arrays"], config, "train", strategy.secure.settings, rnd,
                              poll=getattr(strategy, "reply_poll", 0.0))
    except ConfigError:
        if first_round:
            raise
        log(WARNING, "round %d: only %d client(s) sampled, too few for secure aggregation: round skipped",
            rnd, len(nodes))
        return SecureSum(sampled=nodes)
    exchange.scale = float(config[SCALE_KEY])
    return exchange


def aggregate_secure(strategy: Any, rnd: int, exchange: SecureSum) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The new global state from a train exchange, and the round's stats."""
    t0 = time.perf_counter()
    stats = strategy.stats
    strategy._awaiting = set()
    stats.bytes_up, stats.bytes_down = exchange.bytes_up, exchange.bytes_down
    contributors = exchange.contributors if not exchange.halted else []
    failures = len(exchange.sampled) - len(contributors)
    strategy._count_train_replies(len(contributors), failures, 0)
    template = strategy._template
    decoded = None
    if not exchange.halted and template is not None:
        try:
            decoded = decode_train(exchange.total, template, strategy.num_adaptors,
                                   exchange.scale, exchange.precision)
        except ValueError as exc:
            log(WARNING, "round %d: the secure sum cannot be decoded (%s)", rnd, exc)
            strategy._first_cause = f"the secure sum cannot be decoded ({exc})"
    server_s = exchange.seconds_total - exchange.seconds_waiting
    if decoded is None:
        if exchange.halted:  # the run stops (RunFailed) naming this
            strategy._first_cause = (f"the SecAgg+ exchange halted: too few of the {len(exchange.sampled)} "
                                     f"sampled clients stayed for its threshold ('secagg-threshold')")
        log(WARNING, "round %d: no secure aggregate, the global model is unchanged", rnd)
        stats.seconds_aggregate = server_s + time.perf_counter() - t0
        return None, None
    if decoded.frozen_adaptors:
        log(INFO, "round %d: adaptor(s) %s got (almost) no weight and keep their values", rnd,
            decoded.frozen_adaptors)
    plain = [exchange.metrics.get(n, {}) for n in contributors]
    sizes = np.array([float(m.get("num-examples", 0.0)) for m in plain])
    losses = np.array([float(m.get("train-loss", np.nan)) for m in plain])
    ok = np.isfinite(losses) & (sizes > 0)
    stats.train_loss = float(np.average(losses[ok], weights=sizes[ok])) if ok.any() else float("nan")
    stats.adaptor_totals = decoded.adaptor_totals.tolist()
    out = ArrayRecord({k: to_array(v) for k, v in decoded.arrays.items()})
    metrics = MetricRecord({"train-loss": stats.train_loss, "num-replies": len(contributors)})
    stats.seconds_aggregate = server_s + time.perf_counter() - t0
    return out, metrics


def _tally_rows(strategy: Any) -> list[dict[str, Any]]:
    """The evaluated clients the ARI is about: those that trained (all if none did)."""
    rows = strategy.stats.eval_rows
    return [r for r in rows if not r.get("holdout")] or list(rows)


def wants_secure_ari(strategy: Any) -> bool:
    """A secure tally is due: secagg, a method with mixtures over C > 1 adaptors, a task with
    true clusters, every evaluated client knowing its own, and no plaintext mixture to use."""
    opts = strategy.secure
    if not (opts and opts.num_clusters > 1 and opts.has_mixture and strategy.num_adaptors > 1):
        return False
    rows = _tally_rows(strategy)
    clusters = {int(r.get("true-cluster", -1)) for r in rows}
    return (len(rows) >= 2 and min(clusters) >= 0 and len(clusters) > 1
            and "cluster-ari" not in strategy.stats.eval_summary)


def secure_ari(strategy: Any, grid: Grid, rnd: int, config: ConfigRecord | None) -> float | None:
    """The cluster ARI of the evaluated (trained) clients from a securely summed contingency
    table; None when it cannot be computed (too few clients, the exchange halted)."""
    opts = strategy.secure
    wanted = {int(r["client-id"]) for r in _tally_rows(strategy)}
    clients = strategy.clients
    nodes = sorted(n for n, cid in clients.client_ids.items() if cid in wanted and n not in clients.superseded)
    tally_config = {**dict(config or {}), "server-round": rnd,
                    CLUSTERS_KEY: opts.num_clusters, ADAPTORS_KEY: strategy.num_adaptors}
    try:
        exchange = secure_sum(grid, nodes, ArrayRecord(), tally_config, "tally", opts.settings, rnd,
                              poll=getattr(strategy, "reply_poll", 0.0))
    except ConfigError as exc:
        log(WARNING, "round %d: no secure cluster ARI: %s", rnd, exc)
        return None
    strategy.stats.bytes_up += exchange.bytes_up
    strategy.stats.bytes_down += exchange.bytes_down
    if exchange.halted:
        return None
    table = decode_tally(exchange.total, opts.num_clusters, strategy.num_adaptors)
    return ari_from_table(table)
