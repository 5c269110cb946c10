"""Local training and evaluation loops (plain PyTorch; no Flower types; imports no method).

Data are in-memory tensors (``ClientData``), so batches are index slices of one shuffled
permutation per epoch: no DataLoader workers or collation per step, which dominates the cost of
the small federated models here. The permutation comes from a generator seeded by
(run seed, round, client id): a client's round is reproducible, which is what makes a resumed
run end with the same model as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn


class ModelHandle(Protocol):
    """What the loops need of a method's handle (:class:`floral_flwr.methods.base.ModelHandle`
    satisfies it); a protocol here so that this module imports no method."""

    module: nn.Module

    def param_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]: ...

    def regularization_loss(self) -> torch.Tensor | float: ...


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int


def seed_for(seed: int, server_round: int, client_id: int) -> int:
    """A 63-bit seed that differs per (run seed, round, client)."""
    x = (seed * 1_000_003 + server_round) * 998_244_353 + client_id
    return (x * 0x9E3779B97F4A7C15) % (1 << 63)


def seed_torch(seed: int) -> None:
    """``torch.manual_seed`` for the devices in use.

    ``torch.manual_seed`` also seeds CUDA, and while CUDA is not initialised that call is queued
    together with a captured Python stack trace (~1-2 ms, paid per client and round on a CPU
    client). The CPU generator gets exactly the same seed; CUDA devices are seeded as well once
    CUDA is initialised (a client that trains on a GPU moved its model there at set-up)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class LossTracker:
    """Example-weighted mean of the training loss over a round, with the divergence check that
    every method's local loop needs (a NaN/Inf mean stops the client instead of sending garbage)."""

    def __init__(self) -> None:
        self.total, self.count, self.steps = 0.0, 0, 0

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self.total += float(loss.detach()) * batch_size
        self.count += batch_size
        self.steps += 1

    def result(self, num_examples: int) -> TrainResult:
        mean = self.total / max(self.count, 1)
        if not math.isfinite(mean):
            raise FloatingPointError(f"local training diverged: mean loss {mean}")
        return TrainResult(mean, num_examples, self.steps)


def step_with_clip(opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """``opt.step()``, after scaling the gradient of everything ``opt`` trains down to an L2
    norm of at most ``grad_clip`` (0 = no bound). Run config ``grad-clip``: plain SGD at the
    paper's lr 0.1 on a few rows per client can blow up after hundreds of calm rounds (the
    loss doubles each round while the weights barely move, then NaN); a bound on the step
    stops that growth and leaves every step below it unchanged."""
    if grad_clip > 0:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def proximal_term(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], mu: float) -> torch.Tensor | float:
    """FedProx / Ditto: (mu / 2) * sum ||w - anchor||^2 over (weight, anchor) pairs."""
    return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in pairs)


def minibatches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, x_batch, y_batch)`` over ``epochs`` shuffled passes.

    Every method's local loop draws its batches here, so that one seeded ``generator`` decides
    the permutation of each epoch and then the augmentation of each batch, in that order:
    this is what makes a client's round reproducible (and a resumed run exact).
    """
    n = int(y.shape[0])
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb = x[idx]
            if augment is not None:  # e.g. CIFAR random crop/flip
                xb = augment(xb, generator)
            yield idx, xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


def _metric_sum(metric: str, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    if metric == "accuracy":
        return float((outputs.argmax(dim=-1) == targets).sum())
    if metric == "mse":
        diff = outputs.reshape(targets.shape).float() - targets.float()
        per_sample = diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
        return float(per_sample.sum())
    raise ValueError(f"unknown metric {metric!r}: allowed 'accuracy', 'mse'")


def train_local(
    handle: ModelHandle,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    mixture_lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    proximal_mu: float = 0.0,
    generator_seed: int = 0,
    device: torch.device | str = "cpu",
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> TrainResult:
    """SGD on the client's data. The optimizer is rebuilt every round, as in the paper's code.

    ``proximal_mu`` > 0 adds FedProx's (mu / 2) * ||w - w_round_start||^2 on shared weights;
    ``grad_clip`` > 0 bounds each step's gradient norm (:func:`step_with_clip`).
    """
    model = handle.module
    model.train()
    opt = torch.optim.SGD(
        handle.param_groups(lr, mixture_lr), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    anchors = None
    if proximal_mu > 0:
        anchors = [(p, p.detach().clone()) for g in handle.param_groups(lr, 0.0)[:1] for p in g["params"]]
    gen = torch.Generator().manual_seed(generator_seed)
    n = int(y.shape[0])
    tracker = LossTracker()
    # run-config 'compile' / 'mixed-precision' (set once per process by the client setup)
    forward = getattr(handle, "train_forward", None)
    if forward is None:
        forward = model
    amp_dtype = getattr(handle, "autocast_dtype", None)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
                if amp_dtype is not None else contextlib.nullcontext())
    for _, xb, yb in minibatches(x, y, epochs=epochs, batch_size=batch_size, generator=gen,
                                 augment=augment, device=device):
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = forward(xb)
            loss = loss_fn(out.reshape(yb.shape) if out.shape != yb.shape and out.numel() == yb.numel() else out, yb)
        objective = loss + handle.regularization_loss()
        if anchors is not None:
            objective = objective + proximal_term(anchors, proximal_mu)
        objective.backward()
        step_with_clip(opt, grad_clip)
        tracker.add(loss, int(yb.shape[0]))
    return tracker.result(n)


@torch.no_grad()
def evaluate_local(
    handle: ModelHandle,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    metric: str,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> tuple[float, float, int]:
    """(mean loss, mean metric, num examples) of the personalized model on (x, y)."""
    model = handle.module
    model.eval()
    n = int(y.shape[0])
    loss_sum, metric_sum = 0.0, 0.0
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        out = model(xb)
        out_l = out.reshape(yb.shape) if out.shape != yb.shape and out.numel() == yb.numel() else out
        loss_sum += float(loss_fn(out_l, yb)) * int(yb.shape[0])
        metric_sum += _metric_sum(metric, out, yb)
    return loss_sum / max(n, 1), metric_sum / max(n, 1), n


def sgd_steps(handle: ModelHandle, groups: list[dict[str, Any]], x: torch.Tensor, y: torch.Tensor,
              loss_fn: nn.Module, steps: int, batch_size: int, seed: int,
              device: torch.device | str = "cpu") -> int:
    """``steps`` plain SGD steps on ``groups`` over shuffled mini-batches of (x, y)."""
    model = handle.module
    model.train()
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"])
    gen = torch.Generator().manual_seed(int(seed) + 7)
    n = int(y.shape[0])
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if done >= steps:
                break
            idx = perm[start:start + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            out = out.reshape(yb.shape) if out.shape != yb.shape and out.numel() == yb.numel() else out
            (loss_fn(out, yb) + handle.regularization_loss()).backward()
            opt.step()
            done += 1
    return done
