"""Round time of FLoRAL vs FedAvg through Flower's real simulation engine (Ray), split by phase.

    OMP_NUM_THREADS=1 python benchmarks/bench_round.py \\
        [--task digits-label-shift] [--clients 20] [--rounds 12] [--repeats 3] \\
        [--synthetic-train 0] [--engine sim|inline] [--device cpu|cuda|auto] \\
        [--concurrency 2] [--num-gpus 0.0] [--extra "key=value ..."] [--markdown out.md]

For every repetition, ``method=fedavg`` and ``method=floral`` (C = 4, rho = 0.1) run the same
task, clients and rounds, one after the other in this process (order alternates between
repetitions), through ``flwr.simulation.run_simulation`` with the project's real ServerApp and
ClientApp (``--engine inline``: Flower's protobuf round trip in-process, no Ray). Round 1 (model
and data set-up in the actors) and evaluation rounds are excluded; the table reports medians over
rounds, then the median over repetitions, and floral/fedavg ratios of those medians.

Per training round:

* ``round``: the train phase of the strategy loop (``RoundStats.seconds_train``: configure,
  send/receive through the engine, aggregate);
* ``client``: time inside the ClientApp's train handler (load the shared state, restore the
  private state, local SGD, save it, build the reply), reported by each client in extra reply
  metrics ``bench-*`` (a benchmark-only ClientApp wrapper; the project's replies carry no such
  keys); ``sgd`` is the local SGD alone and ``sgd_cpu`` the training thread's CPU time in it
  (``time.thread_time``: what the steps cost, without the time other processes took the core
  away; the most stable ratio on a shared machine; excludes GPU time). Shown as the per-round
  sum over clients divided by the number of concurrent actors (``--concurrency``);
* ``aggregate``: ``RoundStats.seconds_aggregate`` (decode the replies' arrays, validate, stream
  them into the accumulator, encode the new global state);
* ``transport``: the rest, ``round - client - aggregate``: Flower's message serialization, the
  SuperLink/engine hand-off and Ray scheduling (plus load imbalance between the actors).

Also reported: ``serde``: one protobuf round trip of a train instruction + reply of this model,
measured in this process (what the transport must at least pay per client), and ``setups``: the
number of (process, setup object) pairs the clients reported, i.e. how often a ClientApp process
built its model and data (1 per actor process when the per-process cache hits across rounds).

``--synthetic-train N`` (image tasks: ``cifar10-*``, ``cifar100*``, ``mnist-*``) writes N random
images in the hub schema (``write_fake_dataset``) to a temporary ``data-dir``: the CIFAR-10 CNN /
VGG-8 shapes without a download. ``--device cuda`` with ``--num-gpus 1/k`` runs k concurrent
ClientApps on one GPU (samples/s and peak GPU memory per client are then reported: ``torch.cuda.max_memory_allocated``
during one train handler, the peak reset before each; with ``--engine inline`` the clients run
one after another in this process on one cached model, so it is one client's footprint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fedavg", "floral")


# ---------------------------------------------------------------------------- client side


def _train_local_sites() -> tuple[Any, list[Any]]:
    """(the local training loop, every loaded module that calls it through a global name).

    The loop lives in ``floral_flwr.methods.training`` (earlier: ``floral_flwr.client.training``)
    and method modules import it by name, so timing it means swapping it in each of them."""
    import importlib

    original = None
    for name in ("floral_flwr.methods.training", "floral_flwr.client.training"):
        try:
            original = importlib.import_module(name).train_local
            break
        except (ImportError, AttributeError):
            continue
    if original is None:
        raise ImportError("train_local is in neither floral_flwr.methods.training nor floral_flwr.client.training")
    sites = [m for n, m in list(sys.modules.items())
             if n.startswith("floral_flwr") and m is not None and getattr(m, "train_local", None) is original]
    return original, sites


def timed_client_app(cfg: dict[str, Any]):
    """The project's ClientApp, wrapped: train replies carry ``bench-*`` timing metrics."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from floral_flwr.client import make_client_app

    inner = make_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from floral_flwr.client import handlers

        sgd = {"s": 0.0, "cpu": 0.0}
        original, sites = _train_local_sites()

        def timed_train_local(*a: Any, **kw: Any):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return original(*a, **kw)
            finally:
                if kw.get("device") is not None and str(kw["device"]).startswith("cuda"):
                    torch.cuda.synchronize()
                sgd["s"] += time.perf_counter() - t
                sgd["cpu"] += time.thread_time() - c

        for site in sites:
            site.train_local = timed_train_local
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # peak of this handler alone: in-process (inline) clients share one process
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            reply = inner(msg, context)
            dt = time.perf_counter() - t0
        finally:
            for site in sites:
                site.train_local = original
        if not reply.has_error():
            setup = next(iter(handlers._SETUPS.values()), None)
            m = reply.content["metrics"]
            m["bench-handler-s"] = dt
            m["bench-sgd-s"] = sgd["s"]
            m["bench-sgd-cpu-s"] = sgd["cpu"]
            m["bench-pid"] = os.getpid()
            m["bench-setup-id"] = id(setup) % (1 << 31)
            m["bench-threads"] = torch.get_num_threads()
            if setup is not None and setup.device.type == "cuda":
                m["bench-gpu-mem-mb"] = torch.cuda.max_memory_allocated(setup.device) / 2**20
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


# ---------------------------------------------------------------------------- server side


class Collector:
    """Spies on the strategy (driver process) to collect per-round stats and client metrics."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self._clients: dict[int, list[dict[str, float]]] = {}

    def install(self):
        from floral_flwr.results import RunRecorder
        from floral_flwr.strategy.floral_strategy import FloralStrategy

        orig_agg = FloralStrategy.aggregate_train
        orig_rec = RunRecorder.record_round
        col = self

        def aggregate_train(strategy, server_round, replies):
            replies = list(replies)
            rows = []
            for msg in replies:
                if msg.has_error() or "metrics" not in msg.content.metric_records:
                    continue
                m = msg.content.metric_records["metrics"]
                rows.append({k: float(v) for k, v in m.items() if k.startswith("bench-")}
                            | {"num-examples": float(m["num-examples"])})
            col._clients[server_round] = rows
            return orig_agg(strategy, server_round, replies)

        def record_round(recorder, stats, num_adaptors):
            col.rounds.append({
                "round": stats.server_round, "train_s": stats.seconds_train,
                "eval_s": stats.seconds_eval, "agg_s": stats.seconds_aggregate,
                "eval": bool(stats.eval_rows), "received": stats.received,
                "bytes_up": stats.bytes_up, "clients": col._clients.get(stats.server_round, []),
            })
            return orig_rec(recorder, stats, num_adaptors)

        FloralStrategy.aggregate_train = aggregate_train
        RunRecorder.record_round = record_round

        def restore():
            FloralStrategy.aggregate_train = orig_agg
            RunRecorder.record_round = orig_rec

        return restore


def run_once(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    from floral_flwr.server import make_server_app

    col = Collector()
    restore = col.install()
    try:
        if args.engine == "inline":
            from floral_flwr.inline import InlineGrid
            from floral_flwr.server import run_server

            grid = InlineGrid(timed_client_app(cfg), args.clients)
            run_server(grid, dict(cfg))
        else:
            from flwr.simulation import run_simulation

            backend = {
                "client_resources": {"num_cpus": 1, "num_gpus": float(args.num_gpus)},
                "init_args": {"num_cpus": int(args.concurrency), "num_gpus": 1 if args.num_gpus > 0 else 0},
            }
            run_simulation(make_server_app(cfg), timed_client_app(cfg), num_supernodes=args.clients,
                           backend_config=backend)
    finally:
        restore()
    return col.rounds


def summarize(rounds: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    """Medians over the training rounds (round 1 and evaluation rounds excluded)."""
    use = [r for r in rounds if r["round"] > 1 and not r["eval"] and r["clients"]]
    if not use:
        use = [r for r in rounds if r["clients"]][1:] or rounds
    med = statistics.median

    def client_share(r, key):
        return sum(c.get(key, 0.0) for c in r["clients"]) / max(1, min(concurrency, len(r["clients"])))

    out = {
        "round": med(r["train_s"] for r in use),
        "client": med(client_share(r, "bench-handler-s") for r in use),
        "sgd": med(client_share(r, "bench-sgd-s") for r in use),
        # CPU time of the training thread: what the step costs, without the time other
        # processes (Ray, the server, other tenants) took the core away
        "sgd_cpu": med(client_share(r, "bench-sgd-cpu-s") for r in use),
        "aggregate": med(r["agg_s"] for r in use),
    }
    out["transport"] = med(
        r["train_s"] - client_share(r, "bench-handler-s") - r["agg_s"] for r in use
    )
    out["samples_per_s"] = med(sum(c["num-examples"] for c in r["clients"]) / r["train_s"] for r in use)
    out["bytes_up_per_client"] = med(r["bytes_up"] / max(1, r["received"]) for r in use)
    setups = {(int(c["bench-pid"]), int(c["bench-setup-id"])) for r in rounds for c in r["clients"]}
    out["setups"] = len(setups)
    out["processes"] = len({p for p, _ in setups})
    out["threads"] = med(c.get("bench-threads", 0) for r in use for c in r["clients"])
    gpu = [c["bench-gpu-mem-mb"] for r in use for c in r["clients"] if "bench-gpu-mem-mb" in c]
    if gpu:
        out["gpu_mem_mb"] = max(gpu)
    out["n_rounds"] = len(use)
    return out


# ---------------------------------------------------------------------------- serde


def serde_ms(cfg: dict[str, Any], repeats: int = 15) -> float:
    """One protobuf round trip of a train instruction and its reply (arrays of this model)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from floral_flwr.config import parse_run_config
    from floral_flwr.inline import InlineGrid, _roundtrip
    from floral_flwr.methods import build_handle
    from floral_flwr.tasks import task_info

    rc = parse_run_config(cfg)
    handle = build_handle(rc, task_info(rc.task, seed=rc.seed).build_model)
    arrays = ArrayRecord({k: Array(v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy())
                          for k, v in handle.shared_state_dict().items()})
    InlineGrid(ClientApp(), 0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = "0" * 32
        got = _roundtrip(msg)
        rec = ArrayRecord({k: Array(a.numpy()) for k, a in got.content["arrays"].items()})
        reply = Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 1})}), reply_to=got)
        back = _roundtrip(reply)
        _ = {k: a.numpy() for k, a in back.content["arrays"].items()}
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def parse_extra(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in shlex.split(text):
        k, _, v = item.partition("=")
        out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="digits-label-shift")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", choices=("sim", "inline"), default="sim")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", type=int, default=2, help="Ray CPUs = concurrent ClientApps")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="client-resources num_gpus (e.g. 0.125)")
    ap.add_argument("--synthetic-train", type=int, default=0, help="image tasks: random images")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--extra", default="", help="more run-config overrides, 'k=v k2=v2'")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-round-"))
    base: dict[str, Any] = {
        "task": args.task, "num-server-rounds": args.rounds, "eval-every": 10**6,
        "fraction-train": 1.0, "fraction-evaluate": 0.25, "min-available-nodes": args.clients,
        "num-adaptors": 4, "rank": 0.1, "device": args.device, "output-dir": str(work),
        # the model's cost, one train message per client: the plaintext mode (secure
        # aggregation's cost: benchmarks/bench_secagg.py)
        "aggregation": "mean",
    }
    if args.batch_size:
        base["batch-size"] = args.batch_size
    if args.synthetic_train:
        from floral_flwr.tasks.sources import write_fake_dataset

        dataset = args.task.split("-")[0]
        data = work / "data" / dataset
        write_fake_dataset(dataset, data, num_train=args.synthetic_train,
                           num_test=max(10 * args.clients, args.synthetic_train // 10))
        base["data-dir"] = str(work / "data")
    base.update(parse_extra(args.extra))

    print(f"machine: {machine()}; load average {os.getloadavg()}", flush=True)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    serde = {m: serde_ms({**base, "method": m}) for m in METHODS}
    for rep in range(args.repeats):
        order = METHODS if rep % 2 == 0 else METHODS[::-1]
        for method in order:
            cfg = {**base, "method": method, "run-name": f"{method}-{rep}"}
            t0 = time.perf_counter()
            rounds = run_once(cfg, args)
            s = summarize(rounds, args.concurrency if args.engine == "sim" else 1)
            results[method].append(s)
            print(f"rep {rep + 1} {method:7s} total {time.perf_counter() - t0:6.1f}s | " +
                  " ".join(f"{k} {v:.4g}" for k, v in s.items()), flush=True)

    keys = ("round", "client", "sgd", "sgd_cpu", "aggregate", "transport")
    med = {m: {k: statistics.median(r[k] for r in results[m]) for k in results[m][0]} for m in METHODS}
    ratio_per_rep = [results["floral"][i]["round"] / results["fedavg"][i]["round"] for i in range(args.repeats)]
    lines = [
        f"`{' '.join(sys.argv)}`  ",
        f"engine {args.engine}, {args.clients} clients, {args.rounds} rounds, {args.repeats} repetitions, "
        f"device {args.device}, concurrency {args.concurrency}; task {args.task}"
        + (f" with {args.synthetic_train} synthetic train images" if args.synthetic_train else ""),
        "",
        "| seconds per round (median) | " + " | ".join(keys) + " | samples/s |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{med[m][k]:.4f}" for k in keys) +
                     f" | {med[m]['samples_per_s']:.0f} |")
    lines.append("| **floral / fedavg** | " + " | ".join(
        (f"**{med['floral'][k] / med['fedavg'][k]:.3f}**" if med["fedavg"][k] > 0 else "-") for k in keys) +
        f" | {med['floral']['samples_per_s'] / med['fedavg']['samples_per_s']:.3f} |")
    lines += [
        "",
        f"per-repetition round ratio floral/fedavg: {', '.join(f'{r:.3f}' for r in ratio_per_rep)} "
        f"(median {statistics.median(ratio_per_rep):.3f})  ",
        "serde (protobuf round trip, instruction + reply, ms): "
        + ", ".join(f"{m} {serde[m]:.2f}" for m in METHODS)
        + "; bytes up per client: " + ", ".join(f"{m} {med[m]['bytes_up_per_client'] / 1e3:.1f} kB" for m in METHODS)
        + "  ",
        "ClientApp processes / model+data set-ups over each whole run: "
        + ", ".join(f"{m} {med[m]['processes']:.0f}/{med[m]['setups']:.0f}" for m in METHODS)
        + f"; torch threads in the ClientApp: {med['floral']['threads']:.0f}",
    ]
    if "gpu_mem_mb" in med["floral"]:
        lines.append("peak GPU memory per client (MiB): " +
                     ", ".join(f"{m} {med[m]['gpu_mem_mb']:.0f}" for m in METHODS))
    text = "\n".join(lines)
    print(text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
