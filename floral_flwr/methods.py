"""Methods: what model a client trains, what is federated and what stays private.

Every method exposes the same small interface, :class:`ModelHandle`, so the client loop, the
strategy and the results code never branch on the method name:

- ``module``: the ``nn.Module`` to call;
- ``shared_state_dict()`` / ``load_shared_state_dict()``: what goes over the wire (keys
  ``base.*`` and, for FLoRAL, ``adaptor.*`` with leading dim C);
- ``private_state_dict()`` / ``load_private_state_dict()``: what never leaves the client;
- ``param_groups(lr, mixture_lr)``: optimizer groups (the mixture gets its own lr);
- ``mixture()``: the eval-mode mixture p (C floats) or None; ``num_adaptors``: C on the wire.

Hooks with defaults that the baselines (``floral_flwr.baselines``) override:

- ``train_round(x, y, loss_fn, **kw)``: one round of local training (default: the SGD loop
  :func:`floral_flwr.client.training.train_local`); ``train_metrics()``: extra reply metrics;
- ``adaptor_weights(n)``: the per-slice aggregation weights w_k(c) sent with a train reply
  (default n * p);
- ``prepare_eval(x_train, y_train, loss_fn, cfg, device)``: what a client does on its train split
  before personalized evaluation (IFCA picks its model, FedAvg-FT fine-tunes a copy);
- ``adapt_groups(lr, mixture_lr)`` / ``adapt(...)``: how a client that never trained fits what
  is personal (``holdout-clients``), with the shared weights frozen;
- ``set_oracle(cluster)``: oracle methods fix the mixture at the true cluster.
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
# the baselines register themselves (fedavg-ft, ensemble, ensemble-oracle, ifca, fedem, ditto, feddpa)
from floral_flwr.baselines import BASELINE_SPECS  # noqa: E402

METHOD_SPECS.update({k: MethodSpec(k, **v) for k, v in BASELINE_SPECS.items()})


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

    def personalized_module(self) -> nn.Module:
        """The model this client would deploy (``export-models``): the plain task architecture
        where the method has one per client (FLoRAL merged, Ditto's personal model, IFCA's
        chosen model), else the method's whole module (output-level mixtures: ensemble, FedEM,
        FedDPA's input-dependent weighting)."""
        return self.module

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

    # ---------------------------------------------------------------- hooks (see module doc)

    def train_round(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, **kw: Any) -> Any:
        from floral_flwr.client.training import train_local

        return train_local(self, x, y, loss_fn, **kw)

    def train_metrics(self) -> dict[str, Any]:
        return {}

    def adaptor_weights(self, n: float) -> list[float]:
        p = self.mixture()
        return [float(n) * v for v in p] if p else []

    def set_oracle(self, cluster: int) -> None:
        raise ValueError(f"{type(self).__name__} has no oracle mixture")

    def prepare_eval(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, cfg: RunConfig,
                     device: torch.device | str = "cpu") -> None:
        """Runs on the client's train split right before personalized evaluation."""

    def prepare_zero_shot(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, cfg: RunConfig,
                          device: torch.device | str = "cpu") -> None:
        """A never-trained client, before its zero-shot evaluation (personal part at its init)."""

    def bind_task(self, task: Any) -> None:
        """Called once on the client with the task (e.g. to know classification vs regression)."""

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups of what a never-trained client fits (empty: nothing personal)."""
        return []

    def adapt(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, cfg: RunConfig,
              device: torch.device | str = "cpu", steps: int | None = None) -> int:
        """Fit only what is personal on (x, y) for ``steps`` SGD steps (shared weights frozen:
        they are not in the optimizer). Returns the number of steps taken."""
        steps = cfg.adapt_steps if steps is None else steps
        groups = [g for g in self.adapt_groups(cfg.lr, cfg.mixture_lr) if g["params"]]
        if not groups or steps <= 0:
            return 0
        return sgd_steps(self, groups, x, y, loss_fn, steps, cfg.batch_size, cfg.seed, device)

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
        # 0.0 (not a zero tensor) when off: two kernels and an autograd node less per step
        if self.floral.entropy_penalty == 0:
            return 0.0
        return self.floral.regularization_loss()

    def set_oracle(self, cluster: int) -> None:
        self.floral.set_oracle(int(cluster))

    def personalized_module(self) -> nn.Module:
        return self.floral.merge()  # the plain architecture with this client's mixture folded in

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        if self.local_adaptors:  # the private adaptor (its mixture is fixed)
            params = [p for k, p in self.floral.named_parameters() if "adaptor" in k and p.requires_grad
                      and p not in set(self.floral.mixture_parameters())]
            return [{"params": params, "lr": lr}]
        mix = [p for p in self.floral.mixture_parameters() if p.requires_grad]
        return [{"params": mix, "lr": mixture_lr}]

    def mixture(self) -> list[float] | None:
        with torch.no_grad():
            p = self.floral.probs().detach().float().cpu()
        if p.ndim == 2:  # per-layer mixtures: report the mean over layers
            p = p.mean(0)
        return [float(v) for v in p]


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
    if cfg.method in BASELINE_SPECS:
        from floral_flwr.baselines import build_baseline_handle

        return build_baseline_handle(cfg, build_model)
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
    if spec.needs_clusters and task_clusters and cfg.num_adaptors < task_clusters:
        raise ValueError(
            f"method '{cfg.method}' needs num-adaptors >= the task's {task_clusters} clusters, "
            f"got num-adaptors = {cfg.num_adaptors}"
        )
