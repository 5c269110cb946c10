"""Methods: what model a client trains, what is federated and what stays private.

Every method exposes the same small interface, :class:`ModelHandle`, so the client loop, the
strategy and the results code never branch on the method name:

- ``module``: the ``nn.Module`` to call;
- ``shared_state_dict()`` / ``load_shared_state_dict()``: what goes over the wire (keys
  ``base.*`` and, for FLoRAL, ``adaptor.*`` with leading dim C);
- ``private_state_dict()`` / ``load_private_state_dict()``: what never leaves the client;
- ``param_groups(lr, mixture_lr)``: optimizer groups (the mixture gets its own lr);
- ``mixture()``: the eval-mode mixture p (C floats) or None; ``num_adaptors``: C on the wire.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.floral import Floral


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    uses_adaptors: bool
    needs_clusters: bool = False


METHOD_SPECS: dict[str, MethodSpec] = {
    "floral": MethodSpec(
        "floral",
        "FLoRAL (Almansoori et al., CPAL 2025): shared base + C low-rank adaptors, private mixture",
        uses_adaptors=True,
    ),
    "floral-oracle": MethodSpec(
        "floral-oracle",
        "FLoRAL with the mixture fixed one-hot at the client's true cluster (upper reference)",
        uses_adaptors=True,
        needs_clusters=True,
    ),
    "local-adaptor": MethodSpec(
        "local-adaptor",
        "federated base + one private low-rank adaptor per client, never aggregated",
        uses_adaptors=True,
    ),
    "fedavg": MethodSpec("fedavg", "FedAvg (McMahan et al., 2017): one global model", uses_adaptors=False),
}


class ModelHandle:
    """A plain model: everything shared, nothing private (FedAvg)."""

    num_adaptors = 0

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._initial_private = self.private_state_dict()

    def shared_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict(("base." + k, v) for k, v in self.module.state_dict().items())

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.module.state_dict())
        got = {k[len("base."):] for k in state if k.startswith("base.")}
        if expected != got or len(got) != len(state):
            raise ValueError(
                f"shared state keys differ: missing {sorted(expected - got)[:5]}, "
                f"extra {sorted(set(state) - {'base.' + k for k in expected})[:5]}"
            )
        self.module.load_state_dict({k[len("base."):]: v for k, v in state.items()}, strict=True)

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict()

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"this method has no private state, got keys {sorted(state)[:5]}")

    def reset_private(self) -> None:
        self.load_private_state_dict(self._initial_private)

    def param_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": lr}]

    def regularization_loss(self) -> torch.Tensor | float:
        return 0.0

    def mixture(self) -> list[float] | None:
        return None

    def kind(self) -> str:
        """Identifies method + shapes, so a private-state file of another model is refused."""
        shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in self.private_state_dict().items())
        return f"{type(self).__name__}|{shapes}"


class FloralHandle(ModelHandle):
    """FLoRAL: adaptors federated with p(k|c), mixture private. ``local_adaptors`` keeps the
    adaptor banks private too (the "local adaptor" baseline)."""

    def __init__(self, floral: Floral, local_adaptors: bool = False) -> None:
        self.floral = floral
        self.local_adaptors = local_adaptors
        self.num_adaptors = 0 if local_adaptors else floral.num_adaptors
        super().__init__(floral)

    def _is_local(self, key: str) -> bool:
        return self.local_adaptors and key.startswith("adaptor.")

    def shared_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v) for k, v in self.floral.shared_state_dict().items() if not self._is_local(k))

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.local_adaptors:
            full = {k: v for k, v in self.floral.shared_state_dict().items() if self._is_local(k)}
            extra = [k for k in state if self._is_local(k)]
            if extra:
                raise ValueError(f"local adaptors must not come from the server: {extra[:5]}")
            full.update(state)
            state = full
        self.floral.load_shared_state_dict(state)

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict(self.floral.private_state_dict())
        if self.local_adaptors:
            out.update((k, v) for k, v in self.floral.shared_state_dict().items() if self._is_local(k))
        return OrderedDict((k, v.detach().clone()) for k, v in out.items())

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.local_adaptors:
            local = {k: v for k, v in state.items() if self._is_local(k)}
            state = {k: v for k, v in state.items() if not self._is_local(k)}
            if local:
                shared = dict(self.floral.shared_state_dict())
                shared.update(local)
                self.floral.load_shared_state_dict(shared)
        self.floral.load_private_state_dict(state)

    def param_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        mix = [p for p in self.floral.mixture_parameters() if p.requires_grad]
        shared = [p for p in self.floral.shared_parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": shared, "lr": lr}]
        if mix and mixture_lr > 0:
            groups.append({"params": mix, "lr": mixture_lr, "weight_decay": 0.0, "momentum": 0.0})
        return groups

    def regularization_loss(self) -> torch.Tensor | float:
        return self.floral.regularization_loss()

    def mixture(self) -> list[float] | None:
        with torch.no_grad():
            p = self.floral.probs().detach().float().cpu()
        if p.ndim == 2:  # per-layer mixtures: report the mean over layers
            p = p.mean(0)
        return [float(v) for v in p]


def floral_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Floral(...) keyword arguments from the run config."""
    return dict(
        num_adaptors=1 if cfg.method == "local-adaptor" else cfg.num_adaptors,
        rank=cfg.rank,
        alpha=cfg.alpha,
        conv_method=cfg.conv_method,
        adaptive_bias=cfg.adaptive_bias,
        adapt_norm=cfg.adapt_norm,
        temperature=cfg.temperature,
        mixture_noise=cfg.mixture_noise,
        prob_floor=cfg.prob_floor,
        entropy_penalty=cfg.entropy_penalty,
        per_layer_mixture=cfg.per_layer_mixture,
    )


def build_handle(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> ModelHandle:
    """Build the method's model deterministically from ``cfg.seed`` (same on every client)."""
    spec = METHOD_SPECS[cfg.method]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model()
        if not spec.uses_adaptors:
            return ModelHandle(model)
        floral = Floral(model, **floral_kwargs(cfg))
    if cfg.method == "local-adaptor":
        floral.set_oracle(0)
        return FloralHandle(floral, local_adaptors=True)
    return FloralHandle(floral)


def check_method_task(cfg: RunConfig, task_clusters: int | None) -> None:
    """A method that needs ground-truth clusters cannot run on a task without them."""
    spec = METHOD_SPECS[cfg.method]
    if spec.needs_clusters and not task_clusters:
        raise ValueError(
            f"method '{cfg.method}' needs ground-truth clusters, but task '{cfg.task}' has none: "
            f"use a task with known clusters or method 'floral'"
        )
    if cfg.method == "floral-oracle" and task_clusters and cfg.num_adaptors < task_clusters:
        raise ValueError(
            f"method 'floral-oracle' needs num-adaptors >= the task's {task_clusters} clusters, "
            f"got num-adaptors = {cfg.num_adaptors}"
        )
