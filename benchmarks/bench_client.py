"""Client-side costs in one process: local SGD per round by method, threads and torch.compile,
and the per-message set-up cache.

    python benchmarks/bench_client.py [--tasks digits-label-shift cifar10-label-shift]
        [--threads 1 2] [--compile] [--rounds 12] [--repeats 3] [--markdown out.md]

For every (task, threads, compile) cell, fedavg and floral (C = 4, rho = 0.1) are timed
alternately in this process: ``train_local`` on one client's data (the run config's batch size
and epochs) for ``--rounds`` rounds after ``--warmup`` rounds, median per round, then median over
``--repeats``. ``cifar10-*`` uses ``--synthetic-train`` random images (hub schema, temporary
directory) to get the CIFAR-10 CNN shape without a download. With ``--compile`` the first-round
(compile) time is reported separately. ``get_setup`` cache: time of a cache hit (parse the run
config + look up), which every message pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from floral_flwr.methods.training import train_local  # noqa: E402
from floral_flwr.config import parse_run_config  # noqa: E402
from floral_flwr.methods import build_handle  # noqa: E402
from floral_flwr.tasks import get_task  # noqa: E402


def make(task: str, method: str, data_dir: str | None, clients: int, compile_: bool):
    rc = {"task": task, "method": method, "num-adaptors": 4, "rank": 0.1}
    if data_dir:
        rc["data-dir"] = data_dir
    cfg = parse_run_config(rc)
    t = get_task(cfg.task, num_clients=clients, seed=0, data_dir=data_dir)
    torch.manual_seed(0)
    h = build_handle(cfg, t.build_model)
    h.bind_task(t)
    h.train_forward = torch.compile(h.module) if compile_ else None
    return cfg, t, h, t.client_data(1)


def one_round(cfg, t, h, d, rnd):
    t0 = time.perf_counter()
    train_local(h, d.train_x, d.train_y, t.loss_fn, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                lr=cfg.lr, mixture_lr=cfg.mixture_lr, generator_seed=rnd)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["digits-label-shift", "cifar10-label-shift"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (threads = first)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--synthetic-train", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-client-"))
    lines = [f"`{' '.join(sys.argv)}`", "",
             "| task | threads | compile | fedavg s/round | floral s/round | floral/fedavg | first round (compile) fedavg / floral s |",
             "|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        data_dir = None
        if not task.startswith(("digits", "synthetic")):
            from floral_flwr.tasks.sources import write_fake_dataset

            ds = task.split("-")[0]
            write_fake_dataset(ds, tmp / ds, num_train=args.synthetic_train, num_test=100)
            data_dir = str(tmp)
        cells = [(th, False) for th in args.threads]
        if args.compile:
            cells.append((args.threads[0], True))
        for threads, comp in cells:
            torch.set_num_threads(threads)
            med: dict[str, list[float]] = {"fedavg": [], "floral": []}
            first: dict[str, list[float]] = {"fedavg": [], "floral": []}
            for rep in range(args.repeats):
                for method in (("fedavg", "floral") if rep % 2 == 0 else ("floral", "fedavg")):
                    if comp:
                        torch._dynamo.reset()
                    cfg, t, h, d = make(task, method, data_dir, args.clients, comp)
                    times = [one_round(cfg, t, h, d, r) for r in range(args.warmup + args.rounds)]
                    first[method].append(times[0])
                    med[method].append(statistics.median(times[args.warmup:]))
                print(task, threads, comp, {m: [round(v, 4) for v in x] for m, x in med.items()}, flush=True)
            fa, fl = statistics.median(med["fedavg"]), statistics.median(med["floral"])
            fr = (f"{statistics.median(first['fedavg']):.2f} / {statistics.median(first['floral']):.2f}"
                  if comp else "-")
            lines.append(f"| {task} | {threads} | {comp} | {fa:.4f} | {fl:.4f} | **{fl / fa:.2f}** | {fr} |")

    # get_setup: a cache hit per message
    from flwr.app import Context, RecordDict

    from floral_flwr.client import handlers

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 10},
                  state=RecordDict(), run_config={})
    rc = {"task": "digits-label-shift", "method": "floral"}
    handlers.get_setup(ctx, rc)
    hits = []
    for _ in range(200):
        t0 = time.perf_counter()
        handlers.get_setup(ctx, rc)
        hits.append(time.perf_counter() - t0)
    lines += ["", f"get_setup cache hit (per message): median {1e3 * statistics.median(hits):.3f} ms; "
              f"builds/hits in this process: {handlers.SETUP_STATS}"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
