"""Trace one in-process run round by round, to see *which* weights blow up when a run diverges.

Wraps the in-process federation (:class:`floral_flwr.inline.InlineGrid`): for every training
round it records, from the messages themselves (after the protobuf round trip, as the clients and
the server see them), the L2 norm and max |value| of every global array the server sends, the
number of replies and of error replies, and the example-weighted train loss of the replies.
One CSV row per (round, array); a second CSV with one row per round.

    python benchmarks/diagnose_divergence.py --task fmnist-label-shift-reduced \
        --method floral-oracle --seed 5 --rounds 950 --clients 300 \
        --set data-dir=/work/data/fmnist aggregation=mean --out /tmp/diverge

It is a diagnosis tool, not a benchmark: the run is the same one ``python -m floral_flwr.compare``
runs (same config, same seeds), so a divergence seen in a sweep reproduces here.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse_set(items: list[str]) -> dict[str, Any]:
    from floral_flwr.compare_tune import _parse_value as parse_value  # the runner's own --set parser

    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = parse_value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from flwr.app import Message

    from floral_flwr import wire
    from floral_flwr.client import make_client_app
    from floral_flwr.inline import InlineGrid
    from floral_flwr.server import run_server

    cfg: dict[str, Any] = {"task": args.task, "method": args.method, "seed": args.seed, **_parse_set(args.set)}
    if cfg.get("aggregation") != "mean":
        # under secagg the server only ever sees masked sums: nothing per reply to trace
        ap.error("give --set aggregation=mean (the trace reads every plain reply)")
    if args.rounds:
        cfg["num-server-rounds"] = args.rounds
    cfg["eval-every"] = args.rounds or 10**9
    args.out.mkdir(parents=True, exist_ok=True)
    cfg.update({"output-dir": tempfile.mkdtemp(prefix="diverge-"), "run-name": "run"})

    arrays_f = (args.out / "arrays.csv").open("w", newline="")
    rounds_f = (args.out / "rounds.csv").open("w", newline="")
    arrays_w = csv.writer(arrays_f)
    rounds_w = csv.writer(rounds_f)
    arrays_w.writerow(["round", "record", "array", "l2", "max_abs", "finite"])
    rounds_w.writerow(["round", "replies", "errors", "train_loss", "max_client_loss", "max_reply_l2",
                       "median_update_l2", "max_update_l2"])
    state = {"round": 0, "t0": time.monotonic()}

    def norms(unpacked) -> dict[tuple[str, str], tuple[float, float, bool]]:
        out = {}
        for rname, rec in unpacked.array_records.items():
            for key, arr in rec.items():
                v = np.asarray(wire.from_array(arr), dtype=np.float64)
                fin = bool(np.isfinite(v).all())
                out[(rname, key)] = (float(np.linalg.norm(v)) if v.size else 0.0,
                                     float(np.abs(v).max()) if v.size else 0.0, fin)
        return out

    def update_norm(sent, got) -> float:
        """||reply - sent|| over the arrays both carry: the client's whole local update (every
        client is sent the same global arrays, so the first train message stands for all)."""
        total = 0.0
        for rname, rec in got.array_records.items():
            if rname not in sent.array_records:
                continue
            for key, arr in rec.items():
                if key in sent[rname]:
                    a = np.asarray(wire.from_array(arr), dtype=np.float64)
                    b = np.asarray(wire.from_array(sent[rname][key]), dtype=np.float64)
                    if a.shape == b.shape:
                        total += float(((a - b) ** 2).sum())
        return math.sqrt(total)

    class TracingGrid(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            train = [m for m in messages if m.metadata.message_type == "train" and m.has_content()
                     and m.content.array_records]
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if not train:
                return replies
            state["round"] += 1
            r = state["round"]
            sent = wire.unpack_content(train[0].content)  # every client gets the same arrays
            for (rname, key), (l2, mx, fin) in norms(sent).items():
                arrays_w.writerow([r, rname, key, f"{l2:.6g}", f"{mx:.6g}", int(fin)])
            errors, loss_sum, n_sum, max_l2, max_loss = 0, 0.0, 0, 0.0, 0.0
            updates: list[float] = []
            for rep in replies:
                if rep.has_error():
                    errors += 1
                    continue
                for mrec in rep.content.metric_records.values():
                    n = int(mrec.get("num-examples", 0) or 0)
                    loss = mrec.get("train-loss")
                    if loss is not None and n:
                        loss_sum += float(loss) * n
                        n_sum += n
                        max_loss = max(max_loss, float(loss))
                got = wire.unpack_content(rep.content)  # once per reply, for both measures
                for (_, _), (l2, _, _) in norms(got).items():
                    max_l2 = max(max_l2, l2)
                updates.append(update_norm(sent, got))
            rounds_w.writerow([r, len(replies), errors, f"{loss_sum / n_sum:.6g}" if n_sum else "nan",
                               f"{max_loss:.6g}", f"{max_l2:.6g}",
                               f"{float(np.median(updates)):.6g}" if updates else "nan",
                               f"{max(updates):.6g}" if updates else "nan"])
            if r % 50 == 0:
                arrays_f.flush()
                rounds_f.flush()
                el = time.monotonic() - state["t0"]
                total = args.rounds or r
                print(f"[diagnose] round {r}/{total}  {el / r:.2f} s/round  ETA {(total - r) * el / r / 60:.1f} min",
                      flush=True)
            return replies

    grid = TracingGrid(make_client_app(cfg), args.clients)
    try:
        summary = run_server(grid, dict(cfg))
    finally:
        arrays_f.close()
        rounds_f.close()
    print({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not math.isnan(float(v))})
    print(f"[diagnose] wrote {args.out / 'arrays.csv'} and {args.out / 'rounds.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
