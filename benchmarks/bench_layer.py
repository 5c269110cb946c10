"""Training-step and merged-inference cost of FLoRAL layers vs the bare model and a naive loop.

Variants, timed side by side in one process (round robin per step, to cancel drift):
  (a) bare model
  (b) Floral-wrapped model (weight folding via parametrizations; Linear "auto" compute)
  (b fold) Floral with linear_compute="fold" (every layer folded), for comparison
  (c) naive reference as in the official code: a forward hook per adapted layer that loops over
      the C adaptors in Python, running two small layers each and adding p_c * output
Training step = zero_grad + forward + cross-entropy + backward + SGD step; batch 64 by default.
Merged inference: eval forward of ``fm.merge()`` vs the bare model (same architecture).

    python benchmarks/bench_layer.py                 # CPU, 2 threads
    python benchmarks/bench_layer.py --device cuda --batch 256
    python benchmarks/bench_layer.py --device cuda --batch 256 --models cnn mlp vgg8 --json out.json

Models: ``cnn`` (the CIFAR-10 CNN), ``mlp`` (784-200-10), ``vgg8`` (the CIFAR-100 VGG-8 of the
tasks, no norm; ``floral_flwr.tasks.models.VGG8``). ``--json`` writes every row's figures
(ms per step of each variant, the ratios) for scripts (``benchmarks/gpu_check.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from floral_flwr.floral import Floral  # noqa: E402
from floral_flwr.floral.adaptors import split_kernel  # noqa: E402
from floral_flwr.tasks.models import MLP, Cifar10CNN  # noqa: E402


def mlp() -> nn.Module:
    return MLP(784, 200, 10)


def vgg8() -> nn.Module:
    from floral_flwr.tasks.models import VGG8

    return VGG8(num_classes=100)


# ------------------------------------------------------------------ naive (official-style) loop

class NaiveFloral(nn.Module):
    """Official-code style: per layer a ModuleList of C (layer_in, layer_out) pairs and a
    forward hook adding ``alpha * sum_c p_c * layer_out_c(layer_in_c(x))`` in a Python loop."""

    def __init__(self, model: nn.Module, ranks: Dict[str, int], num_adaptors: int,
                 alpha: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.alpha = alpha
        self.logits = nn.Parameter(torch.zeros(num_adaptors))
        self.loras = nn.ModuleDict()
        self._p = None
        for name, module in model.named_modules():
            if name not in ranks:
                continue
            r = ranks[name]
            pairs = nn.ModuleList()
            for _ in range(num_adaptors):
                if isinstance(module, nn.Linear):
                    lin = nn.Linear(module.in_features, r, bias=False)
                    lout = nn.Linear(r, module.out_features, bias=module.bias is not None)
                else:
                    k_in, k_out = split_kernel(module.kernel_size, module.in_channels,
                                               module.out_channels, "balanced_2d")
                    s, p, d = module.stride, module.padding, module.dilation
                    lin = nn.Conv2d(module.in_channels, r, k_in, stride=(1, s[1]),
                                    padding=(0, p[1]), dilation=(1, d[1]), bias=False)
                    lout = nn.Conv2d(r, module.out_channels, k_out, stride=(s[0], 1),
                                     padding=(p[0], 0), dilation=(d[0], 1),
                                     bias=module.bias is not None)
                nn.init.zeros_(lout.weight)
                if lout.bias is not None:
                    nn.init.zeros_(lout.bias)
                pairs.append(nn.Sequential(lin, lout))
            self.loras[name.replace(".", "_")] = pairs
            module.register_forward_hook(self._hook(pairs))

    def _hook(self, pairs: nn.ModuleList) -> Callable:
        def hook(module, args, out):
            x = args[0]
            for c, lora in enumerate(pairs):  # the Python loop over adaptors
                out = out + self.alpha * self._p[c] * lora(x)
            return out
        return hook

    def forward(self, x):
        self._p = torch.softmax(self.logits, -1)
        return self.model(x)


# ------------------------------------------------------------------ timing

def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def make_infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def infer() -> None:
        with torch.no_grad():
            model(x)
    return infer


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_round_robin(fns: Dict[str, Callable[[], None]], steps: int, warmup: int,
                     sync: Callable[[], None], inner: int = 1, clock: str = "wall") -> Dict[str, float]:
    """Median seconds per call. ``clock="cpu"`` uses the calling thread's CPU time, which is
    robust to other processes competing for the cores (exact only with 1 intra-op thread: on
    CPU, forward and backward then run entirely on this thread)."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for i in range(steps):
        order = list(fns.items())
        if i % 2:
            order.reverse()  # alternate order too: no variant always runs first
        for name, fn in order:
            t0 = now()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((now() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, make_model: Callable[[], nn.Module], shape, C: int, args,
          steps: int) -> Dict[str, float]:
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(args.batch, *shape, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    bare = make_model().to(dev)
    fm = Floral(make_model(), num_adaptors=C, rank=args.rho).to(dev)
    fm_fold = Floral(make_model(), num_adaptors=C, rank=args.rho, linear_compute="fold").to(dev)
    ranks = {n: r for n, _, r in fm.parameter_report().layers}
    naive = NaiveFloral(make_model(), ranks, C).to(dev)
    # Nonzero adaptors for (b), so nothing is trivially zero (timing does not depend on values).
    with torch.no_grad():
        for f in (fm, fm_fold):
            for a in f.adaptor_modules().values():
                for t in a.parameters():
                    t.normal_(0, 0.01)
    train = time_round_robin({
        "a": make_step(bare, x, y), "b": make_step(fm, x, y),
        "b_fold": make_step(fm_fold, x, y), "c": make_step(naive, x, y),
    }, steps, args.warmup, sync, clock=args.clock)
    merged = fm.merge()
    infer = time_round_robin({"a": make_infer(bare, x), "merged": make_infer(merged, x)},
                             steps, args.warmup, sync, inner=args.infer_inner, clock=args.clock)
    return {"a": train["a"], "b": train["b"], "b_fold": train["b_fold"], "c": train["c"],
            "infer_a": infer["a"], "infer_merged": infer["merged"]}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="timed CNN steps per variant (median)")
    ap.add_argument("--mlp-steps", type=int, default=200, help="timed MLP steps per variant")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this thread's CPU time (forces --threads 1; "
                         "use it on a shared, loaded machine)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--infer-inner", type=int, default=5, help="eval forwards per timed sample")
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--C", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp", "vgg8"])
    ap.add_argument("--vgg-steps", type=int, default=0, help="timed VGG-8 steps (default: --steps)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu":
            ap.error("--clock cpu only measures CPU work; use --clock wall with --device cuda")
        args.threads = 1
    torch.set_num_threads(args.threads)
    models = {"cnn": ("CIFAR-10 CNN", Cifar10CNN, (3, 32, 32)), "mlp": ("MLP 784-200-10", mlp, (1, 28, 28)),
              "vgg8": ("VGG-8", vgg8, (3, 32, 32))}
    steps_of = {"cnn": args.steps, "mlp": args.mlp_steps, "vgg8": args.vgg_steps or args.steps}
    header = (f"device={args.device} ({cpu_name() if args.device == 'cpu' else torch.cuda.get_device_name()}), "
              f"threads={torch.get_num_threads()}, torch {torch.__version__}, batch {args.batch}, "
              f"rho={args.rho}, clock={args.clock}, median of {args.steps} (CNN) / {args.mlp_steps} "
              f"(MLP) steps after {args.warmup} warm-up, round robin, "
              f"load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = ["| model | C | (a) bare ms | (b) FLoRAL ms | (b)/(a) | (b fold)/(a) | (c) naive ms | (c)/(b) | merged/(a) infer |",
            "|---|---|---|---|---|---|---|---|---|"]
    print(header)
    print("\n".join(rows), flush=True)
    records = []
    for key in args.models:
        title, make, shape = models[key]
        for C in args.C:
            r = bench(title, make, shape, C, args, steps_of[key])
            records.append({"model": key, "title": title, "C": C, "batch": args.batch,
                            "bare_ms": 1e3 * r["a"], "floral_ms": 1e3 * r["b"],
                            "floral_fold_ms": 1e3 * r["b_fold"], "naive_ms": 1e3 * r["c"],
                            "floral_over_bare": r["b"] / r["a"], "fold_over_bare": r["b_fold"] / r["a"],
                            "naive_over_floral": r["c"] / r["b"],
                            "merged_over_bare_infer": r["infer_merged"] / r["infer_a"]})
            row = (f"| {title} | {C} | {1e3 * r['a']:.2f} | {1e3 * r['b']:.2f} | {r['b'] / r['a']:.2f} | "
                   f"{r['b_fold'] / r['a']:.2f} | {1e3 * r['c']:.2f} | {r['c'] / r['b']:.2f} | "
                   f"{r['infer_merged'] / r['infer_a']:.3f} |")
            rows.append(row)
            print(row, flush=True)
    footer = f"load average at end {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    print(footer)
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + "\n".join(rows) + "\n\n" + footer + "\n")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "footer": footer, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
