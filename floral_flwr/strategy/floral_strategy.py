# size: the round loop of one strategy class (train exchange, plaintext or SecAgg+, evaluation folded or separate, stop rules); each step is delegated, the sequence stays readable here.
"""The FLoRAL strategy on Flower's Message API: one server round, start to end.

``FloralStrategy`` is a :class:`flwr.serverapp.strategy.FedAvg` whose aggregation is the p(k|c)
rule of :mod:`.aggregate`; this module holds the class and its round loop, and each step of a
round delegates to a short module of its own:

- :mod:`.nodes`: waiting for nodes (with a timeout), node -> client-id discovery, seeded sampling;
- :mod:`.replies`: train replies in a fixed order, each validated (:mod:`.validation`) and folded
  into the accumulator, failures and rejects counted and logged with the node id;
- :mod:`.evaluation`: personalized evaluation replies -> rows -> summaries (mean/std/worst-10 %,
  per-cluster means, cluster ARI, holdout clients);
- :mod:`.optimizer_state`: the server optimizer's moments for the checkpoint, and the dtype pin;
- :mod:`.round_stats`: the per-round bookkeeping the results recorder reads;
- :mod:`.optimizers`: composition with Flower's server optimizers and ``build_strategy``;
- :mod:`.secure_rounds`: under ``aggregation='secagg'`` (``self.secure`` set), the train step is
  one SecAgg+ exchange whose unmasked sum becomes the aggregate (:mod:`.secagg`,
  :mod:`.masked_sum`), and the cluster ARI comes from a securely summed contingency table.

A run stops loudly (:class:`~floral_flwr.rundir.RunFailed`, one message naming the round and the
first cause) when a round accepts no reply, and a global state with NaN/Inf is never adopted
(:class:`~floral_flwr.rundir.NonFiniteState`). An adaptor (ensemble/IFCA model) slice that no
accepted reply used this round is not moved by the server optimizer, and its moments are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from floral_flwr.rundir import NonFiniteState, RunFailed
from floral_flwr.strategy.bounds import ExampleCaps
from floral_flwr.strategy.eval_fold import PendingEval, fold_into, split_folded_replies
from floral_flwr.strategy.evaluation import collect_eval_rows, summarize_round
from floral_flwr.strategy.exchange import DEFAULT_POLL, exchange
from floral_flwr.strategy.nodes import ClientDirectory, sample_nodes, wait_for_nodes
from floral_flwr.strategy.optimizer_state import (DtypePin, counters_from_aggregate, hold_unused_slices, integer_entries,
                                                  load_optimizer_state, non_finite_keys, optimizer_state,
                                                  snapshot_moments)
from floral_flwr.strategy.robust import make_accumulator
from floral_flwr.strategy.replies import fold_train_replies, record_nbytes, report_unanswered
from floral_flwr.strategy.round_stats import RoundStats
from floral_flwr.strategy.secure_rounds import (
    SecureOptions,
    aggregate_secure,
    secure_ari,
    secure_train_exchange,
    wants_secure_ari,
)
from floral_flwr.wire import from_array, to_array

TRAIN_SALT, EVALUATE_SALT = 0, 1  # separate seeded samples for the train and evaluate phases


class FloralStrategy(FedAvg):
    """FedAvg with the FLoRAL p(k|c) adaptor aggregation, validation and full evaluation.

    One round (:meth:`start` runs them, from ``start_round`` on when resuming):

    1. configure (:meth:`configure_train`): wait for nodes, discover their client ids, sample a
       deterministic function of (seed, round, client ids), send the global state;
    2. aggregate (:meth:`aggregate_train`): validate every reply, fold the good ones into the
       p(k|c) accumulator in client-id order, count and log failures and rejects; Flower's
       server optimizer, when mixed in (:mod:`.optimizers`), steps on top of this aggregate;
    3. evaluate (:meth:`configure_evaluate` / :meth:`aggregate_evaluate`), every
       ``eval_every`` rounds and in the last: every sampled (by default: all) client evaluates
       its personalized model, summarised into ``stats.eval_summary``;
    4. checkpoint: the ``on_round_end`` hook gets (round, global state, strategy); the
       strategy's ``stats`` and :meth:`optimizer_state` are what it saves.

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
        # run config aggregation = "secagg": set by the ServerApp (floral_flwr.server)
        self.secure: SecureOptions | None = getattr(self, "secure", None)
        self._pending_secure = None  # the secure exchange of the round being aggregated
        self._first_round = 1
        self.clients = ClientDirectory()
        self.robust, self.clip_norm, self.trim_fraction = "none", 0.0, 0.2
        self._first_cause = ""
        self._keep_dtypes = DtypePin()
        self._plain_counters: dict[str, Any] | None = None  # integer entries of the last aggregate
        self.reply_timeout = 3600.0  # start() sets the run's; it also bounds the discovery query
        self._template: dict[str, np.ndarray] | None = None
        self.stats: RoundStats = RoundStats(0)
        self.total_failures = 0
        self.total_rejected = 0
        # run config "reply-poll": s between reply pulls (0 = Flower's send_and_receive), see .exchange
        self.reply_poll = float(getattr(self, "reply_poll", DEFAULT_POLL))
        # an evaluation round's evaluation rides on the next round's train messages (see .eval_fold)
        self.fold_evaluation = bool(getattr(self, "fold_evaluation", True))

    def set_robustness(self, robust: str = "none", clip_norm: float = 0.0, trim_fraction: float = 0.2,
                       caps: ExampleCaps | None = None) -> None:
        """The robust aggregation mode (:mod:`.robust`) and the server's caps on reply weights
        (:mod:`.bounds`); call before the first round."""
        self.robust, self.clip_norm, self.trim_fraction = robust, float(clip_norm), float(trim_fraction)
        if caps is not None:
            self.clients.caps = caps

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
        self.reply_timeout = float(timeout)
        self._first_round = start_round
        result = Result()
        result.arrays = initial_arrays
        arrays = initial_arrays
        pending: PendingEval | None = None  # an evaluation riding on the next round's messages
        for rnd in range(start_round, num_rounds + 1):
            t0 = time.monotonic()
            moments = snapshot_moments(self)  # before the exchange: the slices no reply used keep them
            replies = self._train_exchange(rnd, arrays, grid, train_config, timeout, pending)
            if pending is not None:  # round rnd-1 is complete now: record it before aggregating
                replies = self._finish_evaluation(pending, replies, result, evaluate_fn, on_round_end)
                pending = None
            arrays = self._aggregate_round(rnd, arrays, moments, replies, result)
            t1 = time.monotonic()
            self.stats.seconds_train = t1 - t0
            if self.folds_evaluation and rnd < num_rounds and self.is_eval_round(rnd):
                pending = self._plan_evaluation(rnd, arrays, grid, evaluate_config)
                continue
            self._evaluate_round(rnd, arrays, grid, evaluate_config, timeout, result)
            self.stats.seconds_eval = time.monotonic() - t1
            self._end_round(rnd, arrays, result, evaluate_fn, on_round_end)
        return result

    @property
    def folds_evaluation(self) -> bool:
        """Evaluation rides in the next round's train messages: run config fold-evaluation, and
        plaintext aggregation only (under secagg the train messages are SecAgg+ stage messages)."""
        return self.fold_evaluation and self.secure is None

    def _end_round(self, rnd: int, arrays: ArrayRecord, result: Result,
                   evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
                   on_round_end: Callable[[int, ArrayRecord, "FloralStrategy"], None] | None) -> None:
        if evaluate_fn is not None:
            res = evaluate_fn(rnd, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        if on_round_end is not None:
            on_round_end(rnd, arrays, self)

    def _train_exchange(self, rnd: int, arrays: ArrayRecord, grid: Grid, train_config: ConfigRecord | None,
                        timeout: float, pending: PendingEval | None) -> list[Message]:
        """Send round ``rnd``'s train messages (with ``pending``'s evaluation folded in) and
        collect the replies. Under secagg the round is one SecAgg+ exchange on the grid whose sum
        :meth:`aggregate_train` decodes (:mod:`.secure_rounds`): no plaintext reply comes back."""
        if self.secure is not None:
            self._pending_secure = secure_train_exchange(self, rnd, arrays, grid, train_config,
                                                         first_round=rnd == self._first_round)
            return []
        msgs = list(self.configure_train(rnd, arrays, ConfigRecord(dict(train_config or {})), grid))
        if pending is not None:
            msgs = fold_into(pending, msgs, self.arrayrecord_key, self.configrecord_key)
        return exchange(grid, msgs, timeout, self.reply_poll)

    def _aggregate_round(self, rnd: int, arrays: ArrayRecord, moments: dict[str, Any] | None, replies: list[Message],
                         result: Result) -> ArrayRecord:
        """Aggregate the train replies into the new global state (``moments``: the server
        optimizer's before the round). Raises RunFailed when no reply was accepted and
        NonFiniteState when the new state (after the server optimizer) is not finite."""
        new_arrays, train_metrics = self.aggregate_train(rnd, replies)
        if new_arrays is None:
            raise RunFailed(self._nothing_accepted(rnd))
        new_arrays = hold_unused_slices(self, moments, arrays, new_arrays, self.stats.adaptor_totals)
        new_arrays = counters_from_aggregate(self, new_arrays, self._plain_counters)
        bad = non_finite_keys(new_arrays)
        if bad:
            raise NonFiniteState(f"round {rnd}: the new global state has NaN/Inf in {bad[:5]}: not adopted "
                                 f"(the checkpoint of round {rnd - 1} is kept)")
        arrays = self._keep_dtypes(new_arrays)
        result.arrays = arrays
        if train_metrics is not None:
            result.train_metrics_clientapp[rnd] = train_metrics
        return arrays

    def _nothing_accepted(self, rnd: int) -> str:
        s = self.stats
        cause = self._first_cause or "no sampled node replied"
        return (f"round {rnd} accepted no reply ({s.sampled} sampled, {s.failures} failed, {s.rejected} "
                f"rejected); first cause: {cause}. Nothing was trained this round, so the run stops; "
                f"the checkpoint of round {rnd - 1} is kept: fix the cause, then resume=true")

    # ------------------------------------------------------------------ evaluation folded in

    def _plan_evaluation(self, rnd: int, arrays: ArrayRecord, grid: Grid,
                         evaluate_config: ConfigRecord | None) -> PendingEval:
        """Sample round ``rnd``'s evaluation now (where it is sampled when sent at once); it is
        sent with round ``rnd + 1``'s train messages, which carry the same global state."""
        arrays = self._keep_dtypes(arrays)
        nodes = self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, rnd, salt=EVALUATE_SALT)
        return PendingEval(rnd, arrays, self.stats, set(nodes), ConfigRecord(dict(evaluate_config or {})))

    def _finish_evaluation(
        self, pending: PendingEval, replies: list[Message], result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        on_round_end: Callable[[int, ArrayRecord, "FloralStrategy"], None] | None,
    ) -> list[Message]:
        """Take round ``pending.round``'s evaluation out of this exchange's replies, record that
        round (before this round's aggregation moves the server optimizer), return the train replies."""
        train, evaluated = split_folded_replies(replies, pending)
        current, self.stats = self.stats, pending.stats
        try:
            eval_metrics = self.aggregate_evaluate(pending.round, evaluated)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[pending.round] = eval_metrics
            self._end_round(pending.round, pending.arrays, result, evaluate_fn, on_round_end)
        finally:
            self.stats = current
        return train

    def _evaluate_round(self, rnd: int, arrays: ArrayRecord, grid: Grid, evaluate_config: ConfigRecord | None,
                        timeout: float, result: Result) -> None:
        """Personalized evaluation on the clients, when this is an evaluation round."""
        config = ConfigRecord(dict(evaluate_config or {}))
        eval_msgs = list(self.configure_evaluate(rnd, arrays, config, grid))
        if eval_msgs:
            eval_metrics = self.aggregate_evaluate(rnd, exchange(grid, eval_msgs, timeout, self.reply_poll))
            if eval_metrics is not None and wants_secure_ari(self):
                ari = secure_ari(self, grid, rnd, config)
                if ari is not None:
                    self.stats.eval_summary["cluster-ari"] = eval_metrics["cluster-ari"] = ari
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics

    # ------------------------------------------------------------------ configure

    def sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, salt: int) -> list[int]:
        """Deterministic sample of ``max(int(N * fraction), minimum)`` nodes for this round."""
        connected = wait_for_nodes(grid, max(self.min_available_nodes, minimum), self.node_wait_timeout)
        # one node list per sample: each get_node_ids is a request to the SuperLink
        self.clients.discover(grid, timeout=self.reply_timeout, poll=self.reply_poll, nodes=connected)
        nodes = self.clients.candidates(grid, connected, training=salt == TRAIN_SALT, fresh=False)
        return sample_nodes(nodes, fraction, minimum, self.seed, server_round, salt)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients deterministically and send them the shared state."""
        self.stats = RoundStats(server_round)
        arrays = self._keep_dtypes(arrays)
        self._template = {k: from_array(a) for k, a in arrays.items()}  # read-only views
        nodes = self.sample(grid, self.fraction_train, self.min_train_nodes, server_round, salt=TRAIN_SALT)
        log(INFO, "configure_train: sampled %d nodes (out of %d)", len(nodes), len(self.clients.client_ids))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.stats.sampled = len(nodes)
        self._awaiting = set(nodes)  # sampled nodes whose reply has not arrived (yet)
        self.stats.bytes_down = record_nbytes(arrays) * len(nodes)
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    # ------------------------------------------------------------------ aggregate

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, then fold the good ones into the p(k|c) accumulator (under
        secagg: decode the exchange's sum instead; Flower's optimizers wrap either)."""
        self._plain_counters = None  # the aggregate's counters, before a server optimizer steps on them
        if self._pending_secure is not None:
            exchange, self._pending_secure = self._pending_secure, None
            out, metrics = aggregate_secure(self, server_round, exchange)
            self._plain_counters = integer_entries(out) if out is not None else None
            return out, metrics
        assert self._template is not None, "configure_train must run before aggregate_train"
        t_start = time.perf_counter()
        acc = make_accumulator(self._template, self.num_adaptors, self.robust, self.clip_norm, self.trim_fraction)
        sampled = set(getattr(self, "_awaiting", ()))
        folded = fold_train_replies(
            replies, acc, server_round=server_round, arrayrecord_key=self.arrayrecord_key,
            template=self._template, num_adaptors=self.num_adaptors,
            client_sizes=self.clients.client_sizes, presummed=self.sum_only,
            client_ids=self.clients.client_ids,
        )
        self._first_cause = (f"node {folded.errors[0][0]} failed: {folded.errors[0][1]}" if folded.errors
                             else folded.first_rejection and f"rejected {folded.first_rejection}")
        missing = report_unanswered(server_round, folded, sampled)
        self._awaiting = set()
        self._count_train_replies(acc.num_replies, len(folded.errors) + missing, folded.rejected)
        self.stats.bytes_up += folded.bytes_up
        if acc.num_replies == 0:
            log(WARNING, "round %d: no valid replies, the global model is unchanged", server_round)
            self.stats.seconds_aggregate = time.perf_counter() - t_start
            return None, None
        self.stats.train_loss = float(np.average(folded.losses, weights=folded.weights))
        self.stats.adaptor_totals = acc.adaptor_totals.tolist()
        aggregate = acc.result()
        bad = non_finite_keys(aggregate)
        if bad:  # cannot come from finite inputs; checked before Flower's optimizers step on it
            raise NonFiniteState(f"round {server_round}: the aggregate has NaN/Inf in {bad[:5]}: not adopted")
        out = ArrayRecord({k: to_array(v) for k, v in aggregate.items()})
        self._plain_counters = integer_entries(out)
        metrics = MetricRecord({"train-loss": self.stats.train_loss, "num-replies": acc.num_replies})
        self.stats.seconds_aggregate = time.perf_counter() - t_start
        return out, metrics

    def _count_train_replies(self, accepted: int, failures: int, rejected: int) -> None:
        self.stats.failures += failures
        self.stats.rejected += rejected
        self.stats.received = accepted
        self.total_failures += self.stats.failures
        self.total_rejected += self.stats.rejected
        log(INFO, "aggregate_train: %d accepted, %d failures, %d rejected",
            accepted, self.stats.failures, self.stats.rejected)

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
        nodes = self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round,
                            salt=EVALUATE_SALT)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.stats.bytes_down += record_nbytes(arrays) * len(nodes)
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect per-client personalized metrics and summarise them."""
        collected = collect_eval_rows(replies, server_round, self.metric, self.num_adaptors,
                                      self.clients.client_ids)
        self.stats.failures += collected.failures
        self.total_failures += collected.failures
        self.stats.rejected += collected.rejected
        self.total_rejected += collected.rejected
        self.stats.eval_rows = collected.rows
        self.stats.eval_summary = summarize_round(collected.rows, self.metric)
        return MetricRecord(self.stats.eval_summary) if collected.rows else None

    # ------------------------------------------------------------------ checkpoint

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Server-optimizer state as flat numpy arrays (safe to store with np.savez)."""
        return optimizer_state(self)

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`optimizer_state`."""
        load_optimizer_state(self, state)
