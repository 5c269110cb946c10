"""The FLoRAL strategy on Flower's Message API.

``FloralStrategy`` is a :class:`flwr.serverapp.strategy.FedAvg` whose aggregation is the p(k|c)
rule of :mod:`floral_flwr.strategy.aggregate`. Flower's server optimizers (FedAvgM, FedAdam,
FedYogi, FedAdagrad, FedProx) all call ``super().aggregate_train(...)`` and then step on the
pseudo-gradient, so they compose by multiple inheritance: ``class X(FedAdam, FloralStrategy)``
runs FedAdam's server step on top of the FLoRAL aggregate (see :func:`build_strategy`).

What this class adds over FedAvg:
- every reply is validated (:mod:`.validation`); bad or error replies are counted, logged with
  the node id, and excluded; the round continues with the rest;
- waiting for nodes has a timeout and a clear message instead of an endless loop;
- node -> client-id discovery (a ``query`` message) so that sampling is a deterministic
  function of (seed, round, client ids): a resumed run samples exactly what the uninterrupted
  run would have;
- personalized evaluation of the sampled (by default: all) clients every ``eval_every`` rounds,
  summarised as mean/std/worst-10 %/per-cluster means and the cluster ARI;
- ``start`` accepts ``start_round`` and an ``on_round_end`` hook (results + checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Result,
)
from flwr.common.logger import log

from floral_flwr.strategy.aggregate import FloralAccumulator
from floral_flwr.wire import from_array, to_array
from floral_flwr.strategy.validation import (
    InvalidReply,
    validate_eval_metrics,
    validate_train_reply,
)


class NodeWaitTimeout(RuntimeError):
    """Too few nodes connected within ``node_wait_timeout`` seconds."""


class ClientSetupError(RuntimeError):
    """Every node failed to set up (bad data, bad config on the client side): nothing can train."""


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


def _nbytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


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
        mixtures = [r.get("mixture") for r in rows]
        if all(m for m in mixtures) and len(set(clusters)) > 1:
            from sklearn.metrics import adjusted_rand_score

            assigned = [int(np.argmax(m)) for m in mixtures]
            out["cluster-ari"] = float(adjusted_rand_score(clusters, assigned))
    return out


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


def _reply_order(msg: Message) -> tuple[int, int]:
    """Sort key of a train reply: (reported client id, node id); errors and malformed replies
    last (they are not aggregated anyway)."""
    cid = 1 << 62
    if not msg.has_error():
        try:
            cid = int(msg.content.metric_records["metrics"]["client-id"])
        except (KeyError, TypeError, ValueError):
            pass
    return cid, int(msg.metadata.src_node_id)


class FloralStrategy(FedAvg):
    """FedAvg with the FLoRAL p(k|c) adaptor aggregation, validation and full evaluation.

    Parameters
    ----------
    num_adaptors : int
        C. 0 for models without adaptors (then this is FedAvg with validation).
    metric : str
        The task metric reported by clients ("accuracy" or "mse").
    seed : int
        Seeds the per-round client sampling.
    eval_every : int
        Evaluate every ``eval_every`` rounds (and always in the last round).
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` before giving up with an error.
    The remaining parameters are FedAvg's; FLoRAL's defaults let a run use a single node.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        min_available_nodes: int = 1,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Any = None,
        evaluate_metrics_aggr_fn: Any = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.set_floral_options()

    def set_floral_options(
        self,
        num_adaptors: int = 0,
        metric: str = "accuracy",
        seed: int = 0,
        eval_every: int = 1,
        num_rounds: int = 1,
        node_wait_timeout: float = 120.0,
    ) -> None:
        """FLoRAL-specific options (kept out of ``__init__`` so optimizer mixins can chain it)."""
        self.num_adaptors = int(num_adaptors)
        self.metric = metric
        self.seed = int(seed)
        self.eval_every = int(eval_every)
        self.num_rounds = int(num_rounds)
        self.node_wait_timeout = float(node_wait_timeout)
        # run config aggregation = "sum-only": replies carry n_k*base_k and w_k(c)*adaptor_c^k
        self.sum_only = bool(getattr(self, "sum_only", False))
        self.client_ids: dict[int, int] = {}  # node id -> client id (partition id)
        self.client_sizes: dict[int, float] = {}  # node id -> declared train examples
        # node ids replaced by a newer node with the same client id (a restarted SuperNode gets a
        # new node id; the old one stays "online" in the SuperLink until its heartbeat expires)
        self.superseded: set[int] = set()
        self.holdout_nodes: set[int] = set()  # nodes that never train (run config holdout-clients)
        self._template: dict[str, np.ndarray] | None = None
        self._dtypes: dict[str, np.dtype] | None = None
        self.stats: RoundStats = RoundStats(0)
        self.total_failures = 0
        self.total_rejected = 0

    # ------------------------------------------------------------------ nodes and sampling

    def wait_for_nodes(self, grid: Grid, minimum: int) -> list[int]:
        """Block until ``minimum`` nodes are connected, at most ``node_wait_timeout`` s."""
        deadline = time.monotonic() + self.node_wait_timeout
        last_log = 0.0
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            now = time.monotonic()
            if now > deadline:
                raise NodeWaitTimeout(
                    f"only {len(nodes)} node(s) connected after waiting {self.node_wait_timeout:g} s, "
                    f"but {minimum} are required (run config 'min-available-nodes' / the sample "
                    f"size). Start more SuperNodes, pass --federation-config "
                    f"\"num-supernodes=N\" in simulation, lower 'min-available-nodes', or raise "
                    f"'node-wait-timeout'."
                )
            if now - last_log > 5:
                log(INFO, "Waiting for nodes: %d connected, %d required", len(nodes), minimum)
                last_log = now
            time.sleep(0.2)

    def discover(self, grid: Grid, timeout: float = 120.0) -> None:
        """Ask nodes we do not know yet for their client id and train size (a query message)."""
        nodes = sorted(grid.get_node_ids())
        unknown = [n for n in nodes if n not in self.client_ids]
        if not unknown:
            return
        msgs = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown
        ]
        errors = []
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Node %d failed the discovery query: %s", node, reply.error.reason)
                errors.append(reply.error.reason)
                continue
            try:
                m = reply.content["metrics"]
                cid = int(m["client-id"])
                for old, old_cid in self.client_ids.items():
                    if old_cid == cid and old != node and old not in self.superseded:
                        self.superseded.add(old)
                        log(INFO, "node %d serves client %d now; node %d (restarted or replaced) is dropped",
                            node, cid, old)
                self.client_ids[node] = cid
                self.client_sizes[node] = float(m["num-train-examples"])
                if int(m.get("holdout", 0)):
                    self.holdout_nodes.add(node)
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "Node %d sent a malformed discovery reply (%s): ignored", node, exc)
        if errors and not self.client_ids:
            # no node can run the task: stop before training instead of running empty rounds
            raise ClientSetupError(f"all {len(errors)} node(s) failed to set up the task; first error: {errors[0]}")

    def _ordered(self, nodes: Iterable[int]) -> list[int]:
        # Order by client id so that seeded sampling does not depend on random node ids.
        return sorted(nodes, key=lambda n: (self.client_ids.get(n, 1 << 62), n))

    def sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, salt: int) -> list[int]:
        """Deterministic sample of ``max(int(N * fraction), minimum)`` nodes for this round."""
        nodes = self.wait_for_nodes(grid, max(self.min_available_nodes, minimum))
        self.discover(grid)
        nodes = self._ordered(
            n for n in grid.get_node_ids() if n in self.client_ids and n not in self.superseded
        ) or self._ordered(nodes)
        if salt == 0 and self.holdout_nodes:  # training: held-out clients never take part
            nodes = [n for n in nodes if n not in self.holdout_nodes]
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        if size >= len(nodes):
            return nodes
        rng = np.random.default_rng([self.seed, server_round, salt])
        idx = np.sort(rng.choice(len(nodes), size=size, replace=False))
        return [nodes[i] for i in idx]

    # ------------------------------------------------------------------ train

    def _keep_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        # Flower's server optimizers compute in numpy and can promote float32/int64 entries to
        # float64; clients answer in the model's own dtypes, so pin the first round's dtypes.
        if self._dtypes is None:
            self._dtypes = {k: from_array(a).dtype for k, a in arrays.items()}
            return arrays
        if all(a.dtype == str(self._dtypes.get(k)) for k, a in arrays.items()):
            return arrays
        return ArrayRecord(
            {k: to_array(np.asarray(from_array(a), dtype=self._dtypes.get(k))) for k, a in arrays.items()}
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients deterministically and send them the shared state."""
        self.stats = RoundStats(server_round)
        arrays = self._keep_dtypes(arrays)
        self._template = {k: from_array(a) for k, a in arrays.items()}  # read-only views
        nodes = self.sample(grid, self.fraction_train, self.min_train_nodes, server_round, salt=0)
        log(INFO, "configure_train: sampled %d nodes (out of %d)", len(nodes), len(self.client_ids))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.stats.sampled = len(nodes)
        self._awaiting = set(nodes)  # sampled nodes whose reply has not arrived (yet)
        self.stats.bytes_down = _nbytes(arrays) * len(nodes)
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, then fold the good ones into the p(k|c) accumulator."""
        assert self._template is not None, "configure_train must run before aggregate_train"
        t_start = time.perf_counter()
        acc = FloralAccumulator(self._template, self.num_adaptors)
        losses, weights = [], []
        sampled = set(getattr(self, "_awaiting", ()))
        awaiting = set(sampled)
        seen, errors = 0, []
        # a fixed order (by the client id each reply reports): float32 partial sums depend on
        # the order of the additions, replies arrive in whatever order the engine delivers them,
        # and node ids differ between runs (discovery may also not know a slow node yet)
        ordered = sorted(replies, key=_reply_order)
        for msg in ordered:
            seen += 1
            node = msg.metadata.src_node_id
            awaiting.discard(node)
            if msg.has_error():
                self.stats.failures += 1
                errors.append((node, msg.error.reason))
                continue
            try:
                if self.arrayrecord_key not in msg.content.array_records:
                    raise InvalidReply(f"no ArrayRecord '{self.arrayrecord_key}'")
                if "metrics" not in msg.content.metric_records:
                    raise InvalidReply("no MetricRecord 'metrics'")
                record = msg.content.array_records[self.arrayrecord_key]
                arrays = {k: from_array(a) for k, a in record.items()}
                checked = validate_train_reply(
                    arrays,
                    msg.content.metric_records["metrics"],
                    self._template,
                    self.num_adaptors,
                    max_examples=self.client_sizes.get(node),
                )
            except (InvalidReply, ValueError, TypeError) as exc:
                self.stats.rejected += 1
                log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, exc)
                continue
            acc.add(checked.arrays, checked.num_examples, checked.adaptor_weights, presummed=self.sum_only)
            self.stats.bytes_up += _nbytes(record)
            losses.append(checked.train_loss)
            weights.append(checked.num_examples)
        for node, reason in errors:
            # the SuperLink answers for a node whose heartbeat expired (src = the SuperLink)
            who = str(node) if (node in sampled or not sampled) else f"{sorted(awaiting)} (answered by the SuperLink)"
            log(WARNING, "round %d: node %s failed: %s", server_round, who, reason)
        missing = len(sampled) - seen
        if missing > 0:  # no reply within reply-timeout: a SuperNode died or is too slow
            self.stats.failures += missing
            log(WARNING, "round %d: %d sampled node(s) among %s sent no reply within the reply timeout "
                "(run config 'reply-timeout'): counted as failures", server_round, missing, sorted(awaiting))
        self._awaiting = set()
        self.stats.received = acc.num_replies
        self.total_failures += self.stats.failures
        self.total_rejected += self.stats.rejected
        log(
            INFO,
            "aggregate_train: %d accepted, %d failures, %d rejected",
            acc.num_replies,
            self.stats.failures,
            self.stats.rejected,
        )
        if acc.num_replies == 0:
            log(WARNING, "round %d: no valid replies, the global model is unchanged", server_round)
            self.stats.seconds_aggregate = time.perf_counter() - t_start
            return None, None
        self.stats.train_loss = float(np.average(losses, weights=weights))
        self.stats.adaptor_totals = acc.adaptor_totals.tolist()
        result = acc.result()
        metrics = MetricRecord(
            {"train-loss": self.stats.train_loss, "num-replies": acc.num_replies}
        )
        out = ArrayRecord({k: to_array(v) for k, v in result.items()})
        self.stats.seconds_aggregate = time.perf_counter() - t_start
        return out, metrics

    # ------------------------------------------------------------------ evaluate

    def is_eval_round(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every ``eval_every`` rounds: each sampled client evaluates its personalized model."""
        if not self.is_eval_round(server_round):
            return []
        arrays = self._keep_dtypes(arrays)
        nodes = self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, salt=1)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.stats.bytes_down += _nbytes(arrays) * len(nodes)
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect per-client personalized metrics and summarise them."""
        rows = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.stats.failures += 1
                self.total_failures += 1
                log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, node, msg.error.reason)
                continue
            try:
                if "metrics" not in msg.content.metric_records:
                    raise InvalidReply("no MetricRecord 'metrics'")
                row = validate_eval_metrics(msg.content.metric_records["metrics"], self.metric, self.num_adaptors)
            except (InvalidReply, ValueError, TypeError) as exc:
                self.stats.rejected += 1
                self.total_rejected += 1
                log(WARNING, "round %d: rejected evaluation from node %d: %s", server_round, node, exc)
                continue
            row.setdefault("client-id", self.client_ids.get(node, -1))
            rows.append(row)
        rows.sort(key=lambda r: r["client-id"])
        self.stats.eval_rows = rows
        trained = [r for r in rows if not r.get("holdout")]
        held = [r for r in rows if r.get("holdout")]
        self.stats.eval_summary = summarize_eval(trained or rows, self.metric)
        if held:
            self.stats.eval_summary.update(summarize_holdout(held, self.metric))
        return MetricRecord(self.stats.eval_summary) if rows else None

    # ------------------------------------------------------------------ the loop

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        start_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord, "FloralStrategy"], None] | None = None,
    ) -> Result:
        """Flower's round loop, plus ``start_round`` (resume) and an ``on_round_end`` hook."""
        log(INFO, "Starting %s: rounds %d..%d", type(self).__name__, start_round, num_rounds)
        self.num_rounds = num_rounds
        result = Result()
        result.arrays = initial_arrays
        arrays = initial_arrays
        for rnd in range(start_round, num_rounds + 1):
            t0 = time.monotonic()
            replies = grid.send_and_receive(
                self.configure_train(rnd, arrays, ConfigRecord(dict(train_config or {})), grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = self._keep_dtypes(new_arrays)
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            t1 = time.monotonic()
            self.stats.seconds_train = t1 - t0
            eval_msgs = list(
                self.configure_evaluate(rnd, arrays, ConfigRecord(dict(evaluate_config or {})), grid)
            )
            if eval_msgs:
                eval_metrics = self.aggregate_evaluate(rnd, grid.send_and_receive(eval_msgs, timeout=timeout))
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[rnd] = eval_metrics
            self.stats.seconds_eval = time.monotonic() - t1
            if evaluate_fn is not None:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            if on_round_end is not None:
                on_round_end(rnd, arrays, self)
        return result

    # ------------------------------------------------------------------ checkpointable state

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Server-optimizer state as flat numpy arrays (safe to store with np.savez)."""
        out: dict[str, np.ndarray] = {}
        for name in ("m_t", "v_t"):
            d = getattr(self, name, None)
            if d:
                out.update({f"{name}/{k}": np.asarray(v) for k, v in d.items()})
        mv = getattr(self, "momentum_vector", None)
        if mv is not None:
            out.update({f"momentum_vector/{i:06d}": np.asarray(v) for i, v in enumerate(mv)})
        return out

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`optimizer_state`."""
        for name in ("m_t", "v_t"):
            d = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
            if d:
                setattr(self, name, d)
        mv = sorted((k, v) for k, v in state.items() if k.startswith("momentum_vector/"))
        if mv:
            self.momentum_vector = [v for _, v in mv]


# ---------------------------------------------------------------------- composition

_OPTIMIZERS: dict[str, type | None] = {
    "fedavg": None,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedprox": FedProx,
}


def strategy_class(server_optimizer: str, base: type[FloralStrategy] = FloralStrategy) -> type:
    """``base`` with Flower's ``server_optimizer`` mixed in front of it (cooperative MRO)."""
    if server_optimizer not in _OPTIMIZERS:
        raise ValueError(
            f"server-optimizer {server_optimizer!r} is unknown: allowed {sorted(_OPTIMIZERS)}"
        )
    opt = _OPTIMIZERS[server_optimizer]
    if opt is None:
        return base
    return type(f"{base.__name__}With{opt.__name__}", (opt, base), {})


def build_strategy(
    server_optimizer: str,
    *,
    num_adaptors: int,
    metric: str,
    seed: int,
    eval_every: int,
    num_rounds: int,
    fraction_train: float,
    fraction_evaluate: float,
    min_available_nodes: int,
    node_wait_timeout: float,
    server_lr: float = 1.0,
    server_momentum: float = 0.9,
    proximal_mu: float = 0.01,
    client_lr: float = 0.1,
    base: type[FloralStrategy] = FloralStrategy,
) -> FloralStrategy:
    """Build the FLoRAL strategy, composed with the chosen Flower server optimizer."""
    cls = strategy_class(server_optimizer, base)
    kwargs: dict[str, Any] = dict(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=min_available_nodes,
    )
    if server_optimizer == "fedavgm":
        kwargs.update(server_learning_rate=server_lr, server_momentum=server_momentum)
    elif server_optimizer in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs.update(eta=server_lr, eta_l=client_lr)
    elif server_optimizer == "fedprox":
        kwargs.update(proximal_mu=proximal_mu)
    strategy = cls(**kwargs)
    strategy.set_floral_options(
        num_adaptors=num_adaptors,
        metric=metric,
        seed=seed,
        eval_every=eval_every,
        num_rounds=num_rounds,
        node_wait_timeout=node_wait_timeout,
    )
    return strategy
