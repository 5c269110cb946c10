"""Server aggregation cost: 100 replies of a ~10 M-parameter FLoRAL model vs a numpy lower bound.

    OMP_NUM_THREADS=1 python benchmarks/bench_aggregate.py [--replies 100]
        [--distinct 8] [--repeats 3] [--markdown out.md]

Model (FLoRAL-shaped shared state, float32): 8 dense layers 1024x1024 (+ bias) as ``base.*`` and
C = 4 adaptors of rank 51 (rho = 0.1) per layer as ``adaptor.*`` (leading dim C): 11.7 M values.
``--distinct`` different replies are generated and cycled (100 distinct 47 MB replies would need
4.7 GB), each with its own n_k and mixture p_k.

Measured in this process, interleaved, median of ``--repeats`` (all over the same replies):

* ``floral``: what :meth:`FloralStrategy.aggregate_train` does per reply after Flower has decoded
  the arrays: :func:`validate_train_reply` (keys, shapes, dtypes, ``isfinite`` over every array,
  example count, adaptor weights) + :meth:`FloralAccumulator.add`, then ``result()``;
* ``accumulate``: the same without validation (``add`` + ``result``);
* ``lower bound f32`` / ``f64``: the plainest numpy weighted sum of the same rule, one
  preallocated accumulator per key, ``acc += x * weight`` (per-slice weights for adaptors),
  then one division: float32 accumulation (fewest bytes moved) and float64;
* ``flower decode``: ``Array.numpy()`` of every array of every reply (Flower's deserialization,
  paid before any strategy code; context only);
* ``strategy``: the real ``aggregate_train`` on 100 Flower ``Message`` replies (decode +
  validation + accumulation), only for ``--replies`` <= ``--distinct`` * 100 (messages are built
  once and reused).

Peak memory of the streaming accumulator (``tracemalloc``): the ``floral`` path allocates one
float64 running sum per key plus one float64 scratch of the largest tensor, independent of the
number of replies; the table reports the traced peak for 10 and for 100 replies.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from floral_flwr.strategy.aggregate import FloralAccumulator, is_adaptor_key  # noqa: E402
from floral_flwr.strategy.validation import validate_train_reply  # noqa: E402

C = 4


def make_state(seed: int, layers: int = 8, d: int = 1024, rank: int = 51) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(layers):
        out[f"base.l{i}.weight"] = rng.standard_normal((d, d), dtype=np.float32)
        out[f"base.l{i}.bias"] = rng.standard_normal(d, dtype=np.float32)
        out[f"adaptor.l{i}.in"] = rng.standard_normal((C, rank, d), dtype=np.float32)
        out[f"adaptor.l{i}.out"] = rng.standard_normal((C, d, rank), dtype=np.float32)
        out[f"adaptor.l{i}.bias"] = rng.standard_normal((C, d), dtype=np.float32)
    return out


def make_replies(distinct: int) -> list[tuple[dict[str, np.ndarray], float, list[float]]]:
    rng = np.random.default_rng(123)
    replies = []
    for k in range(distinct):
        n = float(rng.integers(20, 200))
        p = rng.dirichlet(np.ones(C))
        replies.append((make_state(1000 + k), n, (n * p).tolist()))
    return replies


def run_floral(template, replies, count, validate=True, cls=FloralAccumulator):
    acc = cls(template, C)
    for i in range(count):
        arrays, n, w = replies[i % len(replies)]
        if validate:
            checked = validate_train_reply(arrays, {"num-examples": n, "train-loss": 1.0,
                                                    "adaptor-weights": w}, template, C)
            acc.add(checked.arrays, checked.num_examples, checked.adaptor_weights, small=checked.small)
        else:
            acc.add(arrays, n, w, small=True)  # the accumulation alone (validation proves small)
    return acc.result()


def run_lower_bound(template, replies, count, dtype):
    sums = {k: np.zeros(v.shape, dtype) for k, v in template.items()}
    base_w, ad_w = 0.0, np.zeros(C)
    for i in range(count):
        arrays, n, w = replies[i % len(replies)]
        wv = np.asarray(w, dtype)
        for k, x in arrays.items():
            if is_adaptor_key(k):
                sums[k] += x * wv.reshape((-1,) + (1,) * (x.ndim - 1))
            else:
                sums[k] += x * dtype(n)
        base_w += n
        ad_w += w
    out = {}
    for k, s in sums.items():
        if is_adaptor_key(k):
            out[k] = (s / ad_w.reshape((-1,) + (1,) * (s.ndim - 1))).astype(np.float32)
        else:
            out[k] = (s / base_w).astype(np.float32)
    return out


def naive_reference(template, replies, count):
    """The rule written out per client and per slice in float64 (for correctness only)."""
    out = {}
    for k in template:
        if is_adaptor_key(k):
            num = sum(np.stack([replies[i % len(replies)][2][c] * replies[i % len(replies)][0][k][c].astype(np.float64)
                                for c in range(C)]) for i in range(count))
            den = sum(np.asarray(replies[i % len(replies)][2]) for i in range(count))
            out[k] = num / den.reshape((-1,) + (1,) * (num.ndim - 1))
        else:
            num = sum(replies[i % len(replies)][1] * replies[i % len(replies)][0][k].astype(np.float64)
                      for i in range(count))
            out[k] = num / sum(replies[i % len(replies)][1] for i in range(count))
    return out


def build_messages(template, replies):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from floral_flwr.inline import InlineGrid
    from flwr.clientapp import ClientApp
    from flwr.app import MessageType

    InlineGrid(ClientApp(), 0)  # sets Flower's task identity for building messages
    msgs = []
    for i, (arrays, n, w) in enumerate(replies):
        instr = Message(RecordDict({}), dst_node_id=100 + i, message_type=MessageType.TRAIN)
        instr.metadata.__dict__["_message_id"] = f"{i:032x}"
        rec = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        content = RecordDict({"arrays": rec, "metrics": MetricRecord(
            {"num-examples": n, "train-loss": 1.0, "adaptor-weights": w, "client-id": i})})
        msgs.append(Message(content, reply_to=instr))
    return msgs


def time_it(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def traced_peak(fn) -> float:
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replies", type=int, default=100)
    ap.add_argument("--distinct", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-strategy", action="store_true", help="skip the Flower-message path")
    ap.add_argument("--markdown", type=str, default="")
    ap.add_argument("--baseline-accumulator", type=str, default="",
                    help="path of another aggregate.py (e.g. the previous version) to time alongside")
    args = ap.parse_args()

    template = make_state(0)
    replies = make_replies(args.distinct)
    nparams = sum(v.size for v in template.values())
    print(f"model: {nparams / 1e6:.2f} M float32 values ({nparams * 4 / 2**20:.0f} MiB per reply), "
          f"{args.replies} replies ({args.distinct} distinct, cycled)", flush=True)

    # correctness first: the accumulator equals the per-client, per-slice float64 reference
    small = 20  # more than one float32 block (8 replies)
    got = run_floral(template, replies, small)
    ref = naive_reference(template, replies, small)
    # float32 rounding of the result: |error| <= ~6e-8 * max|ref| per key
    err = max(float(np.max(np.abs(got[k] - ref[k])) / np.max(np.abs(ref[k]))) for k in ref)
    print(f"max error / max|value| vs float64 per-slice reference ({small} replies): {err:.2e}", flush=True)
    assert err < 1e-6, err

    strategy = None
    msgs = None
    if not args.no_strategy:
        from floral_flwr.strategy.optimizers import build_strategy

        strategy = build_strategy("fedavg", num_adaptors=C, metric="accuracy", seed=0, eval_every=1,
                                  num_rounds=1, fraction_train=1.0, fraction_evaluate=1.0,
                                  min_available_nodes=1, node_wait_timeout=1)
        msgs = build_messages(template, replies)
        # what discovery records: each node's client id and the server's cap on its weight
        strategy.clients.client_ids = {100 + i: i for i in range(len(msgs))}
        strategy.clients.client_sizes = {100 + i: 1e9 for i in range(len(msgs))}

    def strategy_round():
        strategy._template = template
        from floral_flwr.strategy.round_stats import RoundStats
        strategy.stats = RoundStats(1)
        out, _ = strategy.aggregate_train(1, (msgs[i % len(msgs)] for i in range(args.replies)))
        assert strategy.stats.received == args.replies, strategy.stats
        return out

    def decode_only():
        for i in range(args.replies):
            for a in msgs[i % len(msgs)].content["arrays"].values():
                a.numpy()

    cases = {
        "floral (validate + accumulate)": lambda: run_floral(template, replies, args.replies),
        "accumulate only": lambda: run_floral(template, replies, args.replies, validate=False),
        "lower bound f32 (acc += w*x)": lambda: run_lower_bound(template, replies, args.replies, np.float32),
        "lower bound f64 (acc += w*x)": lambda: run_lower_bound(template, replies, args.replies, np.float64),
    }
    if args.baseline_accumulator:
        import importlib.util

        spec = importlib.util.spec_from_file_location("baseline_aggregate", args.baseline_accumulator)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cases["baseline accumulator (validate + accumulate)"] = lambda: run_floral(
            template, replies, args.replies, cls=mod.FloralAccumulator)
    if msgs is not None:
        cases["strategy.aggregate_train (Messages)"] = strategy_round
        cases["flower decode (Array.numpy)"] = decode_only
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(time_it(fn))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lb32 = med["lower bound f32 (acc += w*x)"]
    lb64 = med["lower bound f64 (acc += w*x)"]

    peaks = {n: traced_peak(lambda n=n: run_floral(template, replies, n)) for n in (10, args.replies)}

    lines = [
        f"Aggregation of {args.replies} replies, {nparams / 1e6:.2f} M-parameter FLoRAL state (C={C}), "
        f"median of {args.repeats} (s); ratios vs the numpy lower bounds measured in the same run:",
        "",
        "| path | median s | per reply ms | / lower bound f32 | / lower bound f64 |",
        "|---|---|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.3f} | {1e3 * v / args.replies:.1f} | {v / lb32:.2f} | {v / lb64:.2f} |")
    lines += [
        "",
        f"tracemalloc peak of the floral path: {peaks[10]:.0f} MiB for 10 replies, "
        f"{peaks[args.replies]:.0f} MiB for {args.replies} replies "
        f"(float64 total + float32 block partial per key = {nparams * 12 / 2**20:.0f} MiB, "
        f"+ one float32 scratch buffer + result)",
        f"max relative error vs the float64 per-client reference: {err:.1e}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
