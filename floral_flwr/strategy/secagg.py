"""Secure aggregation with Flower's own SecAgg+, driven from our Message-API ServerApp.

Flower 1.41/1.42 offer secure aggregation only as the legacy pair
``flwr.server.workflow.SecAggPlusWorkflow`` (server) + ``flwr.client.mod.secaggplus_mod``
(client). The workflow wants a ``LegacyContext`` holding a legacy ``Strategy`` (it calls
``configure_fit`` / ``aggregate_fit``) and runs on any ``Grid``, so :func:`secure_sum` builds one
for a single exchange: :class:`_Bridge` hands the workflow our already sampled train (or tally)
requests as ``FitIns`` and receives the unmasked result in ``aggregate_fit``. No cryptography is
ours: key agreement, secret sharing, masking and unmasking are Flower's.

One exchange = Flower's four stages (setup, share keys, collect masked vectors, unmask), i.e. four
messages per client instead of one. Every client sends ``num_examples = 1`` to the workflow, so
Flower's weighted mean is the plain mean over the clients that completed the protocol, and
``mean * count`` is the plain **sum** of their vectors; our own weights (n_k and w_k(c) = n_k
p_k(c)) travel inside the masked vector (:mod:`.masked_sum`). The server learns that sum, the
plaintext metrics of ``fitres.metrics`` (client id, n_k, train loss) and which clients took
part; never a single client's vector.

Dropouts are what SecAgg+ allows: a client that fails or does not answer in a stage is left out;
the masks of clients that dropped after sharing their keys are reconstructed from the shares of
their neighbours, as long as every client keeps ``threshold`` live neighbours; otherwise the
workflow halts and the round leaves the global model unchanged.

Tested with Flower 1.41.x and 1.42.x (the workflow, the mod and the legacy record layout they
share are internal to those versions): :func:`.masked_sum.check_flower_version` refuses any other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from floral_flwr.strategy.exchange import exchange
from floral_flwr.config import ConfigError, RunConfig
from floral_flwr.strategy.masked_sum import (
    KEYS_KEY,
    MODULUS,
    PURPOSE_KEY,
    Precision,
    check_flower_version,
    precision,
)

# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SecAggSettings:
    """The public parameters of the protocol (run config ``secagg-*``)."""

    clip: float = 8.0
    num_shares: int = 0  # 0 = automatic
    threshold: float = 0.6  # fraction of a client's shares needed to rebuild its secrets
    timeout: float | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "SecAggSettings":
        return cls(cfg.secagg_clip, cfg.secagg_num_shares, cfg.secagg_threshold, cfg.reply_timeout)


# The automatic neighbourhood: each client pairs its mask with 4 others. Flower's Shamir sharing
# and key agreement run in Python and cost linearly in k per client and per round
# (benchmarks/RESULTS_secagg.md); a larger k resists more colluding neighbours and more dropouts.
AUTO_SHARES = 5


def protocol_sizes(num_sampled: int, settings: SecAggSettings) -> tuple[int, int]:
    """(k, t): the size of each client's neighbourhood (shares, itself included) and the number
    of shares that rebuild a secret. Raises :class:`ConfigError` when the sample is too small."""
    if num_sampled < 2:
        raise ConfigError(
            f"run config 'aggregation' = 'secagg' needs at least 2 clients per round (a secure sum "
            f"of one client is that client's update), but this round samples {num_sampled}: start "
            f"more nodes, raise 'fraction-train' / 'min-available-nodes', or set aggregation 'mean'"
        )
    if settings.num_shares == 0:
        k = min(num_sampled, AUTO_SHARES)
    elif settings.num_shares > num_sampled:
        raise ConfigError(
            f"run config 'secagg-num-shares' = {settings.num_shares} exceeds the {num_sampled} "
            f"clients sampled per round: allowed 0 (automatic) or an odd integer in [3, {num_sampled}]"
        )
    else:
        k = settings.num_shares
    if k < num_sampled and k % 2 == 0:
        k += 1  # Flower's neighbourhoods are symmetric: an odd size (never above N here)
    # t > k/2 (secagg-threshold > 0.5): a server cannot collect both secrets of one client
    t = max(2, math.ceil(settings.threshold * k))
    t = min(t, k if k == num_sampled else k - 1)  # Flower: threshold < num_shares when k < N
    return k, t


# --------------------------------------------------------------------------- the exchange


@dataclass
class SecureSum:
    """What one secure exchange gave the server."""

    sampled: list[int]
    total: np.ndarray | None = None  # the sum of the contributors' vectors (None: halted)
    contributors: list[int] = field(default_factory=list)
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)  # plaintext fitres.metrics
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (node, stage, reason)
    silent: dict[str, list[int]] = field(default_factory=dict)  # stage -> nodes that never answered
    precision: Precision | None = None
    scale: float = 1.0  # the public weight scale s of a train exchange
    shares: int = 0
    threshold: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds_total: float = 0.0
    seconds_waiting: float = 0.0  # inside send_and_receive (client work, transport)

    @property
    def halted(self) -> bool:
        return self.total is None


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays and the bytes/strings of config records (the masked
    vectors and key shares SecAgg+ sends); metric values count 8 bytes each."""
    n = 0
    for rec in content.array_records.values():
        n += sum(len(a.data) for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            n += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in items)
    for rec in content.metric_records.values():
        n += 8 * sum(len(v) if isinstance(v, list) else 1 for v in rec.values())
    return n


DEFAULT_STAGE_TIMEOUT = 3600.0  # s, when Flower's workflow gives no timeout for a stage


class _MeteredGrid(Grid):
    """The real grid, counting bytes and time of every SecAgg+ stage and keeping who failed.

    Each stage's messages go out through :func:`floral_flwr.strategy.exchange.exchange` with
    ``poll`` s between pulls (run config ``reply-poll``) instead of ``send_and_receive``'s fixed
    3 s; ``poll = 0`` (and an in-process grid) keeps Flower's own call."""

    def __init__(self, grid: Grid, out: SecureSum, poll: float = 0.0) -> None:
        self._grid = grid
        self._out = out
        self._poll = float(poll)

    def set_run(self, run_id: int) -> None:  # pragma: no cover - never called by the workflow
        self._grid.set_run(run_id)

    @property
    def run(self) -> Any:  # pragma: no cover
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = "?"
        if messages and RECORD_KEY_CONFIGS in messages[0].content.config_records:
            stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
        self._out.bytes_down += sum(content_nbytes(m.content) for m in messages)
        t0 = time.perf_counter()
        replies = exchange(self._grid, messages, DEFAULT_STAGE_TIMEOUT if timeout is None else float(timeout),
                           self._poll)
        self._out.seconds_waiting += time.perf_counter() - t0
        answered = set()
        for r in replies:
            node = int(r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                self._out.errors.append((node, stage, str(r.error.reason)))
            else:
                self._out.bytes_up += content_nbytes(r.content)
        silent = sorted({int(m.metadata.dst_node_id) for m in messages} - answered)
        if silent:
            self._out.silent[stage] = silent
        return replies


class _Bridge(Strategy):
    """The legacy strategy the workflow calls: our FitIns out, the unmasked mean in."""

    def __init__(self, fitins: list[tuple[GridClientProxy, FitIns]], out: SecureSum) -> None:
        self._fitins = fitins
        self._out = out

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:  # pragma: no cover
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return list(self._fitins)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        if results:
            vectors = parameters_to_ndarrays(results[0][1].parameters)  # the same for every result
            # every client weighs 1, so Flower's weighted mean times the count is the sum
            self._out.total = np.asarray(vectors[0], dtype=np.float64) * len(results)
            self._out.contributors = sorted(int(p.node_id) for p, _ in results)
            self._out.metrics = {int(p.node_id): dict(r.metrics) for p, r in results}
        return None, {}

    def configure_evaluate(self, *args: Any) -> list:  # pragma: no cover
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict]:  # pragma: no cover
        return None, {}

    def evaluate(self, *args: Any) -> None:  # pragma: no cover
        return None


def secure_sum(
    grid: Grid,
    nodes: list[int],
    arrays: ArrayRecord,
    config: ConfigRecord | dict[str, Any],
    purpose: str,
    settings: SecAggSettings,
    server_round: int,
    poll: float = 0.0,
) -> SecureSum:
    """Run one SecAgg+ exchange with ``nodes``: each gets ``arrays`` and ``config`` (as FitIns) and
    answers with the vector to be summed. Returns the sum and what the exchange cost."""
    check_flower_version()
    out = SecureSum(sampled=sorted(nodes))
    k, t = protocol_sizes(len(nodes), settings)
    out.shares, out.threshold = k, t
    out.precision = prec = precision(settings.clip, len(nodes))
    params = Parameters(tensors=[a.data for a in arrays.values()], tensor_type="numpy.ndarray")
    fit_config = {**dict(config), PURPOSE_KEY: purpose, KEYS_KEY: "\n".join(arrays.keys())}
    fitins = [(GridClientProxy(n, grid, 0), FitIns(params, fit_config)) for n in out.sampled]
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=_Bridge(fitins, out))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # our FitIns carry the state
    workflow = SecAggPlusWorkflow(
        num_shares=1.0 if k == len(nodes) else k,  # 1.0: every sampled client (Flower's fraction form)
        reconstruction_threshold=t,
        max_weight=1.0,
        clipping_range=prec.clip,
        quantization_range=prec.levels,
        modulus_range=MODULUS,
        timeout=settings.timeout,
    )
    t0 = time.perf_counter()
    try:
        workflow(_MeteredGrid(grid, out, poll), context)
    except (ValueError, TypeError, KeyError) as exc:  # e.g. a malformed masked vector
        log(WARNING, "round %d: secure aggregation (%s) failed: %s", server_round, purpose, exc)
        out.total = None
    out.seconds_total = time.perf_counter() - t0
    if out.total is not None and not np.all(np.isfinite(out.total)):
        log(WARNING, "round %d: secure sum (%s) is not finite: discarded", server_round, purpose)
        out.total = None
    for node, stage, reason in out.errors:
        log(WARNING, "round %d: node %d left secure aggregation (%s) at stage '%s': %s",
            server_round, node, purpose, stage, reason)
    for stage, silent in out.silent.items():
        log(WARNING, "round %d: node(s) %s sent no reply at secure-aggregation stage '%s' (%s)",
            server_round, silent, stage, purpose)
    if out.total is None:
        log(WARNING, "round %d: secure aggregation (%s) halted: fewer than %d live neighbours per "
            "client (run config 'secagg-threshold' = %g)", server_round, purpose, t, settings.threshold)
    return out
