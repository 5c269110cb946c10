"""One local training step (SGD, cross-entropy) of a plain model vs the same model wrapped by
FLoRAL (C = 4, rho = 0.1), optionally vs the FLoRAL core of another checkout, in one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_core_step.py [--baseline /path/to/old/checkout]
        [--repeats 9] [--markdown out.md]

``--baseline`` is the root of another copy of this repository (e.g. ``git worktree add /tmp/old
<commit>``); its ``floral_flwr.floral.Floral`` is imported under a separate module cache and timed
alongside. For the MLP, ``hand-written`` is the same function in the fewest eager ops we know
(``HandWrittenFloralMLP``): the floor of the per-step overhead. Shapes: the digits MLP
64-200-10 at batch 8 (the default job: small layers, so the step is bound by per-op overhead)
and the CIFAR-10 CNN at batch 64 (compute-bound). Time is the
thread's CPU time (``time.thread_time``), so other processes on a shared machine disturb it less
than wall time; each repetition times every variant in turn and the table reports the minimum
over repetitions.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_core(root: Path):
    """(Floral, models module) of the checkout at ``root``, imported afresh."""
    for name in [k for k in sys.modules if k == "floral_flwr" or k.startswith("floral_flwr.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        floral = importlib.import_module("floral_flwr.floral")
        models = importlib.import_module("floral_flwr.tasks.models")
    finally:
        sys.path.pop(0)
    return floral.Floral, models


class HandWrittenFloralMLP(nn.Module):
    """The same function as ``Floral(MLP, C, rho)`` in the fewest eager ops we know: every
    factor stored in the 2-d layout its matmul wants (A: (C*r, d_in), B: (d_out, C*r)), p
    repeated per rank once per step, no module or parametrization between the ops. It is not
    usable as a product (no per-adaptor state keys, no other layer types); it is the floor the
    library's per-step overhead is measured against."""

    def __init__(self, fm: nn.Module) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(fm.mixture.logits.shape))
        self.layers = nn.ModuleList()
        for layer in (fm.model.fc1, fm.model.fc2):
            bank = dict(layer.parametrizations.weight[0].adaptor.state_items())
            a, b = bank["in"], bank["out"]  # (C, r, d_in), (C, d_out, r)
            c, r, d_in = a.shape
            m = nn.Module()
            m.weight = nn.Parameter(layer.parametrizations.weight.original.detach().clone())
            m.bias = nn.Parameter(layer.parametrizations.bias.original.detach().clone())
            m.a = nn.Parameter(a.detach().reshape(c * r, d_in).clone())
            m.b = nn.Parameter(b.detach().transpose(0, 1).reshape(b.shape[1], c * r).clone())
            m.bias_bank = nn.Parameter(bank["bias"].detach().clone())
            m.register_buffer("columns", torch.arange(c).repeat_interleave(r))
            m.rank = r
            self.layers.append(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.logits, 0)
        per_rank = {}
        h = x.flatten(1)
        for i, m in enumerate(self.layers):
            if m.rank not in per_rank:
                per_rank[m.rank] = p if m.rank == 1 else p.index_select(0, m.columns)
            out = torch.nn.functional.linear(h, m.weight, torch.addmv(m.bias, m.bias_bank.t(), p))
            h = torch.addmm(out, torch.mm(h, m.a.t()) * per_rank[m.rank], m.b.t())
            if i == 0:
                h = torch.relu(h)
        return h


def step_fn(model: nn.Module, groups: list, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(groups, lr=0.1)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="", help="root of another checkout to time alongside")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--markdown", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cores = {}
    if args.baseline:
        cores["baseline"] = load_core(Path(args.baseline))
    cores["floral"] = load_core(ROOT)
    models = cores["floral"][1]
    shapes = {
        "MLP 64-200-10, batch 8": (lambda: models.MLP(64, 200, 10), (8, 1, 8, 8), 400),
        "CIFAR-10 CNN, batch 64": (lambda: models.Cifar10CNN(), (64, 3, 32, 32), 10),
    }
    names = ["plain"] + list(cores) + ["hand-written"]
    lines = ["| shape | " + " | ".join(f"{n} ms/step" for n in names) + " | "
             + " | ".join(f"{n} / plain" for n in names[1:])
             + (" | floral / baseline |" if args.baseline else " |"),
             "|---" * (2 * len(names) + (1 if args.baseline else 0)) + "|"]
    for label, (make, x_shape, n) in shapes.items():
        torch.manual_seed(1)
        x, y = torch.randn(*x_shape), torch.randint(0, 10, (x_shape[0],))
        torch.manual_seed(0)
        plain = make()
        steps = {"plain": step_fn(plain, [{"params": list(plain.parameters())}], x, y)}
        for name, (floral_cls, _) in cores.items():
            torch.manual_seed(0)
            fm = floral_cls(make(), num_adaptors=4, rank=0.1)
            groups = [{"params": fm.shared_parameters()},
                      {"params": fm.mixture_parameters(), "lr": 3.0}]
            steps[name] = step_fn(fm, groups, x, y)
        if label.startswith("MLP"):
            hand = HandWrittenFloralMLP(fm)
            groups = [{"params": [p for n, p in hand.named_parameters() if n != "logits"]},
                      {"params": [hand.logits], "lr": 3.0}]
            with torch.no_grad():  # the floor computes the same function
                torch.testing.assert_close(hand(x), fm(x), rtol=1e-5, atol=1e-6)
            steps["hand-written"] = step_fn(hand, groups, x, y)
        times = {k: [] for k in steps}
        for _ in range(args.repeats):
            for k, f in steps.items():
                for _ in range(max(2, n // 8)):  # warm-up
                    f()
                t = time.thread_time()
                for _ in range(n):
                    f()
                times[k].append((time.thread_time() - t) / n * 1e3)
        best = {k: min(v) for k, v in times.items()}
        row = f"| {label} | " + " | ".join(f"{best[k]:.3f}" if k in best else "-" for k in names)
        row += " | " + " | ".join(f"{best[k] / best['plain']:.2f}" if k in best else "-"
                                  for k in names[1:])
        row += f" | {best['floral'] / best['baseline']:.2f} |" if args.baseline else " |"
        lines.append(row)
        print(row, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
