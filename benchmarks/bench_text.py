"""FLoRAL on the pretrained MiniLM: train-step cost and the WordNet text tasks' results.

    python benchmarks/bench_text.py step [--repeats 7] [--threads 1] [--json out.json]
    python benchmarks/bench_text.py results DATA_DIR [--tasks wordnet-label-shift ...]
        [--methods floral fedavg ...] [--seeds 0 1 2] [--rounds N] [--out benchmarks/results_text]
        [--markdown benchmarks/RESULTS_text.md]

``step``: one SGD step (cross-entropy, batch 32 x 32 tokens of real WordNet definitions when
Debian's wordnet-base is installed, else random ids) of all-MiniLM-L6-v2 with the base frozen and
rank-8 adaptors on the query/value projections of all 6 layers plus a trained linear head:
FLoRAL (C = 4, mixture learned) vs one shared LoRA (C = 1, the FedIT/FlowerTune baseline), timed
side by side in one process, each repetition timing both in turn (thread CPU time, minimum over
repetitions, so that other processes on a shared machine disturb it less). Also: what the
frozen-prefix cache buys: with adaptors on the head only (the text tasks' preset) the step with
the 6 frozen layers recomputed vs read from the cache, and the same with the top layer's
query/value adapted too (5 frozen layers); and tokenization of one client's definitions (what
the per-client data cache saves every round).

``results``: every (task, method, seed) in-process (``floral_flwr.inline.run_inline``, 20
clients, the task's preset unless ``--rounds``), one process for all runs so the frozen-prefix
cache is shared; a JSON line per run in ``--out`` and the table in ``--markdown``: personalized
accuracy (mean over clients), worst 10 %, cluster ARI, bytes per round (up, all clients), seconds
per round; mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

QV = ["*.attention.self.query", "*.attention.self.value"]


def batch_tokens(tokenizer, n: int = 32, length: int = 32) -> torch.Tensor:
    from floral_flwr.tasks.wordnet import DEBIAN_DATA_NOUN, parse_data_noun

    if Path(DEBIAN_DATA_NOUN).is_file():
        texts = [r.text for r in parse_data_noun(DEBIAN_DATA_NOUN)[1000:1000 + n]]
        return tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                         return_tensors="pt")["input_ids"]
    return torch.randint(1000, 20000, (n, length))


def _step_fn(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

    def step() -> float:
        t = time.thread_time()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.thread_time() - t
    return step


def bench_step(repeats: int) -> dict:
    from floral_flwr.floral import Floral
    from floral_flwr.tasks.text_model import PrefixCache, TextClassifier, load_pretrained

    encoder, tok = load_pretrained("minilm")
    x = batch_tokens(tok)
    y = torch.arange(32) % 10

    def wrapped(c: int, include, cache=None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = TextClassifier(load_pretrained("minilm")[0], 10, tok.pad_token_id, prefix_cache=cache)
        fm = Floral(model, num_adaptors=c, rank=8, include=include, mixture_noise=1.0).freeze_base(["head.*"])
        if c == 1:
            fm.set_oracle(0)
        return fm.train()

    top = [f"encoder.encoder.layer.5.attention.self.{n}" for n in ("query", "value")] + ["head"]
    cache = PrefixCache()
    variants = {
        "floral C=4, head only (text preset), prefix recomputed": _step_fn(wrapped(4, ["head"], None), x, y),
        "floral C=4, head only (text preset), prefix cached": _step_fn(wrapped(4, ["head"], cache), x, y),
        "floral C=4, q/v all layers": _step_fn(wrapped(4, QV), x, y),
        "shared LoRA C=1, q/v all layers": _step_fn(wrapped(1, QV), x, y),
        "floral C=4, top layer, prefix recomputed": _step_fn(wrapped(4, top, None), x, y),
        "floral C=4, top layer, prefix cached": _step_fn(wrapped(4, top, cache), x, y),
        "shared LoRA C=1, top layer, prefix cached": _step_fn(wrapped(1, top, cache), x, y),
    }
    for step in variants.values():  # warm-up (and the cache's one miss)
        step()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, step in variants.items():
            times[k].append(step())
    best = {k: min(v) for k, v in times.items()}
    out = {"threads": torch.get_num_threads(), "repeats": repeats, "step_s": best,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "floral_vs_lora_all_layers": best["floral C=4, q/v all layers"] / best["shared LoRA C=1, q/v all layers"],
           "floral_vs_lora_top_cached": (best["floral C=4, top layer, prefix cached"]
                                         / best["shared LoRA C=1, top layer, prefix cached"]),
           "cache_speedup_top": (best["floral C=4, top layer, prefix recomputed"]
                                 / best["floral C=4, top layer, prefix cached"]),
           "cache_speedup_head": (best["floral C=4, head only (text preset), prefix recomputed"]
                                  / best["floral C=4, head only (text preset), prefix cached"])}
    out.update(bench_tokenization(tok))
    return out


def bench_tokenization(tok) -> dict:
    """Tokenizing one client's 120 definitions vs reading its cached tensors."""
    from floral_flwr.tasks.wordnet import DEBIAN_DATA_NOUN, parse_data_noun

    if not Path(DEBIAN_DATA_NOUN).is_file():
        return {}
    texts = [r.text for r in parse_data_noun(DEBIAN_DATA_NOUN)[:120]]
    t = time.perf_counter()
    for _ in range(20):
        tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="np")
    return {"tokenize_client_s": (time.perf_counter() - t) / 20}


def run_results(args) -> list[dict]:
    from floral_flwr.inline import run_inline

    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                cfg = {"task": task, "method": method, "seed": seed, "data-dir": args.data_dir,
                       "output-dir": str(out / "runs"), "run-name": f"{task}-{method}-s{seed}",
                       "eval-every": args.eval_every, "num-threads": args.threads,
                       "persist-client-state": False}
                if args.rounds:
                    cfg["num-server-rounds"] = args.rounds
                t = time.perf_counter()
                summary, _ = run_inline(cfg, args.clients)
                f = summary.get("final", {})
                rounds = _round_seconds(out / "runs" / cfg["run-name"] / "rounds.csv")
                row = {"task": task, "method": method, "seed": seed, "accuracy": f.get("accuracy-mean"),
                       "worst10": f.get("accuracy-worst10"), "ari": f.get("cluster-ari"),
                       "bytes_up_per_round": summary.get("bytes-up-per-round"),
                       "s_per_round": summary.get("mean-round-s"), "wall_s": time.perf_counter() - t,
                       "rounds": summary.get("rounds"), "first_round_s": rounds[0],
                       "steady_s_per_round": statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]}
                rows.append(row)
                with open(out / "runs.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print("RESULT", json.dumps(row), flush=True)
    return rows


def _round_seconds(path: Path) -> list[float]:
    """Seconds of every round of a run (its rounds.csv). Round 1 holds the clients' set-up and,
    in the first run of a seed, the frozen-prefix computation of the training definitions (the
    first evaluation that of the test definitions), so the table reports the median of rounds
    2..N."""
    import csv

    with open(path) as fh:
        return [float(r["round-s"]) for r in csv.DictReader(fh)]


NAMES = {"floral": "FLoRAL", "fedavg": "shared LoRA (`fedavg`, train-base=false)",
         "local-adaptor": "local adaptor", "feddpa": "FedDPA (frozen backbone)",
         "floral-oracle": "FLoRAL-oracle"}


def _mean_std(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"


def results_table(rows: list[dict]) -> str:
    lines = ["| task | method | seeds | accuracy | worst 10 % | cluster ARI | per seed: accuracy (ARI) | "
             "KB up / round (all clients) | s / round (median, rounds 2..N) |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r["task"], r["method"]) not in keys:
            keys.append((r["task"], r["method"]))
    for task, method in keys:
        rs = sorted((r for r in rows if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
        learned = method == "floral"  # the oracle's mixture is fixed: its ARI is 1 by construction
        per = ", ".join(f"{r['accuracy']:.3f}" + (f" ({r['ari']:.2f})" if learned else "") for r in rs)
        kb = statistics.mean(r["bytes_up_per_round"] for r in rs) / 1e3
        sec = statistics.mean(r.get("steady_s_per_round", r["s_per_round"]) for r in rs)
        lines.append(f"| {task} | {NAMES.get(method, method)} | {len(rs)} | {_mean_std([r['accuracy'] for r in rs])} | "
                     f"{_mean_std([r['worst10'] for r in rs])} | "
                     f"{_mean_std([r['ari'] for r in rs]) if learned else '–'} | {per} | {kb:.0f} | {sec:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--json", default=None)
    r = sub.add_parser("results")
    r.add_argument("data_dir")
    r.add_argument("--tasks", nargs="+", default=["wordnet-label-shift", "wordnet-concept-shift"])
    r.add_argument("--methods", nargs="+", default=["floral", "fedavg", "local-adaptor", "feddpa", "floral-oracle"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--rounds", type=int, default=0)
    r.add_argument("--clients", type=int, default=20)
    r.add_argument("--eval-every", type=int, default=10)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default=str(ROOT / "benchmarks" / "results_text"))
    r.add_argument("--markdown", default=None)
    r.add_argument("--table-only", action="store_true", help="rebuild the table from --out/runs.jsonl")
    a = ap.parse_args(argv)
    if a.cmd == "step":
        torch.set_num_threads(a.threads)
        res = bench_step(a.repeats)
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if a.table_only:
        rows = [json.loads(line) for line in open(Path(a.out) / "runs.jsonl")]
    else:
        rows = run_results(a)
    table = results_table(rows)
    print(table)
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
