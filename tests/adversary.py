"""A battery of malicious replies, built from real ClientApp replies and sent through Flower's
wire format, and the classification of what the server made of each.

Used by ``tests/test_adversarial.py`` (every attack must end ``rejected`` or ``bounded``) and by
``benchmarks/bench_robust.py`` (the tally per category). One honest round is run once per setup
with the real ClientApp on an :class:`~floral_flwr.inline.InlineGrid`; each attack rewrites the
reply of client 0 (arrays, metrics or raw ``.npy`` bytes), round-trips it through protobuf and
hands all replies to the strategy's own ``aggregate_train`` (or discovery / evaluation), so the
server code under test is exactly what a run executes.

Outcomes: ``rejected`` (dropped, the aggregate equals the one without the attacker), ``bounded``
(accepted, finite, and the aggregate stays nearer the honest one than the attacker's arrays),
``crash`` (an exception escaped), ``loss`` (non-finite, or taken over by the attacker's arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from floral_flwr.client import make_client_app
from floral_flwr.config import parse_run_config
from floral_flwr.inline import InlineGrid, _roundtrip
from floral_flwr.methods import build_handle
from floral_flwr.strategy.floral_strategy import FloralStrategy
from floral_flwr.strategy.round_stats import RoundStats
from floral_flwr.tasks import task_info
from floral_flwr.wire import to_array

NUM_CLIENTS = 6
RUN: dict[str, Any] = {"task": "digits-label-shift", "batch-size": 16, "num-adaptors": 4,
                       "min-available-nodes": 1, "persist-client-state": False, "mixture-lr": 2.0,
                       # the plaintext wire (one reply per client), which these attacks replace
                       "aggregation": "mean"}
POISON = 5.0  # every float the attacker sends in a takeover attempt


@dataclass
class Round:
    """One real round: the strategy after configure_train, the sampled nodes, the honest replies."""

    strategy: FloralStrategy
    grid: InlineGrid
    nodes: list[int]
    replies: list[Message]
    initial: ArrayRecord
    hook: dict[str, Callable[[int, Message], Message]] = field(default_factory=dict)

    @property
    def attacker(self) -> int:
        return next(n for n, cid in self.strategy.clients.client_ids.items() if cid == 0)


def honest_round(run: dict[str, Any] | None = None, robust: str = "none", clip_norm: float = 0.0,
                 discovery_hook: Callable[[int, Message], Message] | None = None,
                 num_clients: int = NUM_CLIENTS) -> Round:
    """Run discovery and one training round of the real ClientApp; nothing is aggregated yet."""
    run = {**RUN, **(run or {})}
    cfg = parse_run_config(run)
    hooks: dict[str, Callable[[int, Message], Message]] = {}

    def hook(node: int, reply: Message) -> Message:
        fn = hooks.get(reply.metadata.message_type)
        return fn(node, reply) if fn is not None else reply

    if discovery_hook is not None:
        hooks["query"] = discovery_hook
    grid = InlineGrid(make_client_app(run), num_clients, run_config=run, reply_hook=hook)
    handle = build_handle(cfg, task_info(cfg.task).build_model)
    initial = ArrayRecord({k: to_array(v.detach().numpy()) for k, v in handle.shared_state_dict().items()})
    strategy = FloralStrategy()
    strategy.set_floral_options(num_adaptors=handle.num_adaptors, metric=task_info(cfg.task).metric, seed=0)
    strategy.sum_only = cfg.aggregation == "sum-only"
    if hasattr(strategy, "set_robustness"):  # (absent before the robustness work: the 'before' column)
        from floral_flwr.server import example_caps

        strategy.set_robustness(robust, clip_norm, caps=example_caps(cfg))
    msgs = list(strategy.configure_train(1, initial, ConfigRecord({}), grid))
    nodes = [m.metadata.dst_node_id for m in msgs]
    replies = list(grid.send_and_receive(msgs))
    return Round(strategy, grid, nodes, replies, initial, hooks)


def aggregate(rnd: Round, replies: list[Message]) -> tuple[dict[str, np.ndarray] | None, RoundStats]:
    """The strategy's aggregate_train on ``replies`` (state reset as after configure_train)."""
    s = rnd.strategy
    s.stats = RoundStats(1)
    s._awaiting = set(rnd.nodes)
    arrays, _ = s.aggregate_train(1, replies)
    out = None if arrays is None else {k: np.array(a.numpy(), dtype=np.float64) for k, a in arrays.items()}
    return out, s.stats


# ------------------------------------------------------------------ building tampered replies


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: np.array(a.numpy()) for k, a in reply.content["arrays"].items()}


def rebuilt(reply: Message, arrays: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
            drop: tuple[str, ...] = ()) -> Message:
    """The reply with other arrays (numpy arrays or raw ``Array``s) and/or metrics (None
    removes a metric), through Flower's serialization."""
    content = RecordDict()
    if "arrays" not in drop:
        src = arrays if arrays is not None else _arrays(reply)
        content["arrays"] = ArrayRecord({k: v if isinstance(v, Array) else to_array(np.asarray(v))
                                         for k, v in src.items()})
    if "metrics" not in drop:
        m = dict(reply.content["metrics"])
        for k, v in (metrics or {}).items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        content["metrics"] = MetricRecord(m)
    copy = _roundtrip(reply)  # same metadata (ids, reply-to), own objects
    copy.content = content
    return _roundtrip(copy)


def as_error(reply: Message, reason: str = "boom") -> Message:
    """The reply turned into an error reply (what the ClientApp runtime sends after an exception)."""
    copy = _roundtrip(reply)
    copy.__dict__["_content"] = None
    copy.__dict__["_error"] = Error(code=0, reason=reason)
    return _roundtrip(copy)


def poison(reply: Message) -> dict[str, np.ndarray]:
    return {k: (np.full_like(v, POISON) if v.dtype.kind == "f" else v) for k, v in _arrays(reply).items()}


def raw_npy(header: str, payload: bytes) -> Array:
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    body = text + b" " * pad + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + payload
    return Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)


def _first_float(reply: Message) -> str:
    return next(k for k, a in _arrays(reply).items() if a.dtype.kind == "f")


def _with_raw(reply: Message, make: Callable[[np.ndarray], Array]) -> Message:
    arrays: dict[str, Any] = _arrays(reply)
    key = _first_float(reply)
    arrays[key] = make(arrays[key])
    return rebuilt(reply, arrays)


def _npy_claiming(shape: str, payload: bytes) -> Callable[[np.ndarray], Array]:
    return lambda x: raw_npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}", payload)


def _truncated(x: np.ndarray) -> Array:
    a = to_array(x)
    return Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-4])


def _trailing(x: np.ndarray) -> Array:
    a = to_array(x)
    return Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data + b"\0" * 64)


def _set_first(reply: Message, value: float) -> Message:
    arrays = _arrays(reply)
    key = _first_float(reply)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = value
    return rebuilt(reply, arrays)


def _n(reply: Message) -> float:
    return float(reply.content["metrics"]["num-examples"])


def _weights_times(reply: Message, factor: float) -> list[float]:
    return [float(w) * factor for w in reply.content["metrics"]["adaptor-weights"]]


# name -> (category, reply -> tampered reply). The attacker is client 0; every attack keeps the
# reply otherwise as the real ClientApp wrote it.
TRAIN_ATTACKS: dict[str, tuple[str, Callable[[Message], Message]]] = {
    # weight takeover: the attacker's arrays with a weight it chose
    "num-examples 1e9": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": 1e9,
                                                                       "adaptor-weights": _weights_times(r, 1e9 / _n(r))})),
    "num-examples 1e6": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": 1e6,
                                                                       "adaptor-weights": _weights_times(r, 1e6 / _n(r))})),
    "num-examples x2": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": 2 * _n(r),
                                                                      "adaptor-weights": _weights_times(r, 2)})),
    "num-examples omitted": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": None})),
    "num-examples NaN": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": float("nan")})),
    "num-examples Inf": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": float("inf")})),
    "num-examples 3e38": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": 3e38})),
    "num-examples -5": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": -5})),
    "num-examples 0": ("takeover", lambda r: rebuilt(r, poison(r), {"num-examples": 0})),
    "adaptor weights x1e9": ("takeover", lambda r: rebuilt(r, poison(r), {"adaptor-weights": _weights_times(r, 1e9)})),
    "adaptor weights > n": ("takeover", lambda r: rebuilt(r, poison(r), {"adaptor-weights": [_n(r)] * 4})),
    "claims another client id": ("takeover", lambda r: rebuilt(r, poison(r), {"client-id": 1})),
    # values: finite but extreme (accepted under robust=none; the sums must not overflow)
    "values 3e38": ("overflow", lambda r: rebuilt(r, {k: (np.full_like(v, 3e38) if v.dtype.kind == "f" else v)
                                                      for k, v in _arrays(r).items()})),
    "values -3e38": ("overflow", lambda r: rebuilt(r, {k: (np.full_like(v, -3e38) if v.dtype.kind == "f" else v)
                                                       for k, v in _arrays(r).items()})),
    "values 1e20": ("overflow", lambda r: rebuilt(r, {k: (np.full_like(v, 1e20) if v.dtype.kind == "f" else v)
                                                      for k, v in _arrays(r).items()})),
    "one value NaN": ("overflow", lambda r: _set_first(r, float("nan"))),
    "one value Inf": ("overflow", lambda r: _set_first(r, float("inf"))),
    # crash: malformed wire data and fields
    ".npy claims 2**33 floats": ("crash", lambda r: _with_raw(r, _npy_claiming("(8589934592,)", b"\0" * 16))),
    ".npy claims 2**70 floats": ("crash", lambda r: _with_raw(r, _npy_claiming("(2**35, 2**35)", b"\0" * 16))),
    ".npy negative dim": ("crash", lambda r: _with_raw(r, _npy_claiming("(-1,)", b"\0" * 16))),
    ".npy object dtype": ("crash", lambda r: _with_raw(r, lambda x: raw_npy(
        "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", b"\0" * 16))),
    ".npy code in header": ("crash", lambda r: _with_raw(r, lambda x: raw_npy("__import__('os').getpid()", b""))),
    ".npy truncated": ("crash", lambda r: _with_raw(r, _truncated)),
    ".npy trailing bytes": ("crash", lambda r: _with_raw(r, _trailing)),
    ".npy bad magic": ("crash", lambda r: _with_raw(r, lambda x: Array(dtype="float32", shape=x.shape,
                                                                       stype="numpy.ndarray", data=b"junk" * 8))),
    "stype pickle": ("crash", lambda r: _with_raw(r, lambda x: Array(dtype="float32", shape=x.shape, stype="pickle",
                                                                     data=to_array(x).data))),
    "wrong shape": ("crash", lambda r: _with_raw(r, lambda x: to_array(np.zeros(x.shape + (2,), x.dtype)))),
    "wrong dtype": ("crash", lambda r: _with_raw(r, lambda x: to_array(x.astype(np.float64)))),
    "0-d where a matrix is": ("crash", lambda r: _with_raw(r, lambda x: to_array(np.float32(1.0)))),
    "extra array": ("crash", lambda r: rebuilt(r, {**_arrays(r), "base.injected": np.ones(3, np.float32)})),
    "missing array": ("crash", lambda r: rebuilt(r, dict(list(_arrays(r).items())[1:]))),
    "private array (mixture.logits)": ("crash", lambda r: rebuilt(r, {**_arrays(r), "mixture.logits": np.zeros(4, np.float32)})),
    "no arrays record": ("crash", lambda r: rebuilt(r, drop=("arrays",))),
    "no metrics record": ("crash", lambda r: rebuilt(r, drop=("metrics",))),
    "client-id Inf": ("crash", lambda r: rebuilt(r, metrics={"client-id": float("inf")})),
    "client-id NaN": ("crash", lambda r: rebuilt(r, metrics={"client-id": float("nan")})),
    "client-id 1e300": ("crash", lambda r: rebuilt(r, metrics={"client-id": 1e300})),
    "client-id -1": ("crash", lambda r: rebuilt(r, metrics={"client-id": -1})),
    "client-id 2**62": ("crash", lambda r: rebuilt(r, metrics={"client-id": 2**62})),
    "client-id list": ("crash", lambda r: rebuilt(r, metrics={"client-id": [0]})),
    "train-loss list": ("crash", lambda r: rebuilt(r, metrics={"train-loss": [0.1, 0.2]})),
    "train-loss NaN": ("crash", lambda r: rebuilt(r, metrics={"train-loss": float("nan")})),
    "adaptor-weights short": ("crash", lambda r: rebuilt(r, metrics={"adaptor-weights": [1.0]})),
    "adaptor-weights NaN": ("crash", lambda r: rebuilt(r, metrics={"adaptor-weights": [float("nan")] * 4})),
    "adaptor-weights negative": ("crash", lambda r: rebuilt(r, metrics={"adaptor-weights": [-1.0, 1.0, 1.0, 1.0]})),
    "adaptor-weights all zero": ("crash", lambda r: rebuilt(r, metrics={"adaptor-weights": [0.0] * 4})),
    "adaptor-weights missing": ("crash", lambda r: rebuilt(r, metrics={"adaptor-weights": None})),
    "error reply": ("crash", lambda r: as_error(r)),
}


def classify(rnd: Round, tampered: Message, reference: dict[str, np.ndarray] | None,
             honest: dict[str, np.ndarray], target: dict[str, np.ndarray] | None) -> tuple[str, str]:
    """(outcome, detail) of aggregating the honest replies with the attacker's replaced."""
    replies = [tampered if r.metadata.src_node_id == rnd.attacker else r for r in rnd.replies]
    try:
        out, stats = aggregate(rnd, replies)
    except Exception as exc:  # noqa: BLE001 - any escape is the finding
        return "crash", f"{type(exc).__name__}: {str(exc)[:120]}"
    if out is None:
        return "loss", "no aggregate (nothing accepted)"
    if any(not np.isfinite(v).all() for v in out.values()):
        return "loss", "non-finite aggregate"
    if stats.rejected + stats.failures >= 1 and reference is not None and all(
            np.allclose(out[k], reference[k], rtol=1e-5, atol=1e-6) for k in out):
        return "rejected", ""
    d_honest = _distance(out, honest)
    d_target = _distance(out, target) if target is not None else float("inf")
    if d_target < d_honest:
        return "loss", f"taken over (distance to the attacker's arrays {d_target:.3g} < to the honest {d_honest:.3g})"
    return "bounded", f"accepted; distance to the honest aggregate {d_honest:.3g}"


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum((a[k] - np.asarray(b[k], np.float64)) ** 2))
                             for k in a if np.asarray(a[k]).dtype.kind == "f")))


def run_train_battery(rnd: Round) -> list[tuple[str, str, str, str]]:
    """(category, attack, outcome, detail) for every train-reply attack."""
    honest, _ = aggregate(rnd, rnd.replies)
    without = [r for r in rnd.replies if r.metadata.src_node_id != rnd.attacker]
    reference, _ = aggregate(rnd, without)
    original = next(r for r in rnd.replies if r.metadata.src_node_id == rnd.attacker)
    out = []
    for name, (category, attack) in TRAIN_ATTACKS.items():
        tampered = attack(original)
        target = None
        if not tampered.has_error() and "arrays" in tampered.content.array_records:
            try:
                target = {k: np.array(a.numpy(), dtype=np.float64) for k, a in tampered.content["arrays"].items()}
            except Exception:  # noqa: BLE001 - malformed on purpose
                target = None
            if target is not None and set(target) != set(honest):
                target = None
        outcome, detail = classify(rnd, tampered, reference, honest, target)
        out.append((category, name, outcome, detail))
    return out


# ------------------------------------------------------------------ discovery and evaluation


def _discovery_tamper(changes: dict[str, Any]) -> Callable[[int, Message], Message]:
    def hook(node: int, reply: Message) -> Message:
        if reply.has_error() or int(reply.content["metrics"]["client-id"]) != 0:
            return reply
        return rebuilt(reply, metrics=changes, drop=("arrays",))
    return hook


DISCOVERY_ATTACKS: dict[str, dict[str, Any]] = {
    "declares 1e9 train examples": {"num-train-examples": 1e9},
    "declares Inf train examples": {"num-train-examples": float("inf")},
    "declares NaN train examples": {"num-train-examples": float("nan")},
    "discovery client-id Inf": {"client-id": float("inf")},
    "discovery client-id 1e300": {"client-id": 1e300},
    "discovery client-id -3": {"client-id": -3},
    "discovery client-id out of range": {"client-id": 99},
    "claims another partition count": {"num-partitions": 1000},
    "holdout flag 7": {"holdout": 7},
}


def with_discovery(rnd: Round, hook: Callable[[int, Message], Message] | None, run: dict[str, Any] | None = None,
                   robust: str = "none", clip_norm: float = 0.0) -> Round:
    """A fresh strategy whose discovery went through ``hook``, with ``rnd``'s honest train
    replies (node ids are the same on every InlineGrid of that size)."""
    run = {**RUN, **(run or {})}
    cfg = parse_run_config(run)
    grid = InlineGrid(make_client_app(run), len(rnd.grid.contexts), run_config=run, reply_hook=hook)
    strategy = FloralStrategy()
    strategy.set_floral_options(num_adaptors=rnd.strategy.num_adaptors, metric=rnd.strategy.metric, seed=0)
    strategy.sum_only = cfg.aggregation == "sum-only"
    if hasattr(strategy, "set_robustness"):
        from floral_flwr.server import example_caps

        strategy.set_robustness(robust, clip_norm, caps=example_caps(cfg))
    msgs = list(strategy.configure_train(1, rnd.initial, ConfigRecord({}), grid))  # discovery only
    return Round(strategy, grid, [m.metadata.dst_node_id for m in msgs], rnd.replies, rnd.initial)


def run_discovery_battery(base: Round) -> list[tuple[str, str, str, str]]:
    """Each tampered discovery reply, then client 0 claims the weight it declared with the
    attacker's arrays: the server must not crash, and client 0 must carry no more than its
    partition's weight (or be left out)."""
    out = []
    original = next(r for r in base.replies if int(r.content["metrics"]["client-id"]) == 0)
    true_n = _n(original)
    for name, changes in DISCOVERY_ATTACKS.items():
        try:
            rnd = with_discovery(base, _discovery_tamper(changes))
        except Exception as exc:  # noqa: BLE001
            out.append(("discovery", name, "crash", f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        clients = rnd.strategy.clients
        node0 = original.metadata.src_node_id
        cap = clients.client_sizes.get(node0)
        claim = changes.get("num-train-examples", true_n)
        claim = claim if isinstance(claim, float) and np.isfinite(claim) else 1e9
        tampered = rebuilt(original, poison(original), {"num-examples": claim,
                                                        "adaptor-weights": _weights_times(original, claim / true_n)})
        try:
            honest, _ = aggregate(rnd, rnd.replies)
            reference, _ = aggregate(rnd, [r for r in rnd.replies if r.metadata.src_node_id != node0])
        except Exception as exc:  # noqa: BLE001
            out.append(("discovery", name, "crash", f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        target = {k: np.array(a.numpy(), dtype=np.float64) for k, a in tampered.content["arrays"].items()}
        outcome, detail = _classify_for(rnd, node0, tampered, reference, honest, target)
        if outcome == "bounded" and cap is not None and cap > true_n:
            outcome, detail = "loss", f"cap {cap:g} above the partition size {true_n:g}"
        out.append(("discovery", name, outcome, detail or f"cap {cap}"))
    return out


def _classify_for(rnd: Round, attacker: int, tampered: Message, reference, honest, target) -> tuple[str, str]:
    replies = [tampered if r.metadata.src_node_id == attacker else r for r in rnd.replies]
    try:
        out, stats = aggregate(rnd, replies)
    except Exception as exc:  # noqa: BLE001
        return "crash", f"{type(exc).__name__}: {str(exc)[:120]}"
    if out is None or any(not np.isfinite(v).all() for v in out.values()):
        return "loss", "no or non-finite aggregate"
    if stats.rejected >= 1 and all(np.allclose(out[k], reference[k], rtol=1e-5, atol=1e-6) for k in out):
        return "rejected", ""
    if _distance(out, target) < _distance(out, honest):
        return "loss", "taken over"
    return "bounded", ""


EVAL_ATTACKS: dict[str, dict[str, Any]] = {
    "accuracy 1e30": {"accuracy": 1e30},
    "accuracy -1": {"accuracy": -1.0},
    "accuracy NaN": {"accuracy": float("nan")},
    "loss -1": {"loss": -1.0},
    "eval num-examples Inf": {"num-examples": float("inf")},
    "eval client-id Inf": {"client-id": float("inf")},
    "mixture out of [0, 1]": {"mixture": [2.0, -1.0, 0.0, 0.0]},
    "mixture wrong length": {"mixture": [1.0]},
    "true-cluster 1e300": {"true-cluster": 1e300},
    "holdout flag NaN": {"holdout": float("nan")},
}


def run_eval_battery(rnd: Round) -> list[tuple[str, str, str, str]]:
    """Tampered evaluation replies: rejected (the summary is the one without them) or crash."""
    from floral_flwr.strategy.evaluation import collect_eval_rows, summarize_round

    s = rnd.strategy
    s.stats = RoundStats(1)
    msgs = list(s.configure_evaluate(s.num_rounds, rnd.initial, ConfigRecord({}), rnd.grid))
    honest = list(rnd.grid.send_and_receive(msgs))
    attacker = next(r for r in honest if int(r.content["metrics"]["client-id"]) == 0)
    rest = [r for r in honest if r is not attacker]
    ids = s.clients.client_ids
    ref = summarize_round(collect_eval_rows(rest, 1, s.metric, s.num_adaptors, ids).rows, s.metric)
    out = []
    for name, changes in EVAL_ATTACKS.items():
        tampered = rebuilt(attacker, metrics=changes, drop=("arrays",))
        try:
            got = collect_eval_rows(rest + [tampered], 1, s.metric, s.num_adaptors, ids)
            summary = summarize_round(got.rows, s.metric)
        except Exception as exc:  # noqa: BLE001
            out.append(("evaluation", name, "crash", f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        same = summary.keys() == ref.keys() and all(np.isclose(summary[k], ref[k]) for k in ref)
        finite = all(np.isfinite(v) for v in summary.values())
        out.append(("evaluation", name, "rejected" if same else ("bounded" if finite else "loss"), ""))
    return out
