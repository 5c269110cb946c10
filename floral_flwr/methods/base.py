"""The method interface (:class:`ModelHandle`) and the method registry.

Every method exposes the same small interface, so the client loop, the strategy and the results
code never branch on the method name:

- ``module``: the ``nn.Module`` to call;
- ``shared_state_dict()`` / ``load_shared_state_dict()``: what goes over the wire (keys
  ``base.*`` and, for FLoRAL, ``adaptor.*`` with leading dim C);
- ``private_state_dict()`` / ``load_private_state_dict()``: what never leaves the client;
- ``param_groups(lr, mixture_lr)``: optimizer groups (the mixture gets its own lr);
- ``mixture()``: the eval-mode mixture p (C floats) or None; ``num_adaptors``: C on the wire.

Hooks with defaults that methods override:

- ``train_round(x, y, loss_fn, **kw)``: one round of local training (default: the SGD loop
  :func:`floral_flwr.methods.training.train_local`); ``train_metrics()``: extra reply metrics;
- ``adaptor_weights(n)``: the per-slice aggregation weights w_k(c) sent with a train reply
  (default n * p);
- ``prepare_eval(x_train, y_train, loss_fn, cfg, device)``: what a client does on its train split
  before personalized evaluation (IFCA picks its model, FedAvg-FT fine-tunes a copy);
- ``adapt_groups(lr, mixture_lr)`` / ``adapt(...)``: how a client that never trained fits what
  is personal (``holdout-clients``), with the shared weights frozen;
- ``set_oracle(cluster)``: oracle methods fix the mixture at the true cluster.

The registry: each method module (a peer in this package) calls :func:`register` with its
:class:`MethodSpec` at import time; the package ``floral_flwr.methods`` imports every method
module, so importing it (or anything in it) fills :data:`METHOD_SPECS`. Adding a method = adding
one module and one import line in the package's ``__init__``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.methods.training import sgd_steps, train_local


@dataclass(frozen=True)
class MethodSpec:
    """What a method is: its name, one-line description, and how its handle is built.

    ``build(cfg, build_model)`` runs inside :func:`build_handle`'s seeded RNG scope, so the model
    (and every random initialisation) is identical on every client and the server.
    ``federated`` / ``private`` say in words what goes to the server and what stays local.
    """

    name: str
    description: str
    uses_adaptors: bool
    needs_clusters: bool = False
    build: Callable[[RunConfig, Callable[[], nn.Module]], "ModelHandle"] | None = field(
        default=None, compare=False, repr=False)
    federated: str = ""
    private: str = ""


METHOD_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (called once per method, at its module's import)."""
    if spec.name in METHOD_SPECS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if spec.build is None:
        raise ValueError(f"method {spec.name!r} has no build function")
    METHOD_SPECS[spec.name] = spec
    return spec


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
        return f"{self.kind_name or type(self).__name__}|{shapes}"

    kind_name = ""  # a stable name for ``kind`` where the class was renamed (files stay loadable)


def build_handle(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> ModelHandle:
    """Build the method's model deterministically from ``cfg.seed`` (same on every client)."""
    spec = METHOD_SPECS.get(cfg.method)
    if spec is None or spec.build is None:
        raise ValueError(f"unknown method {cfg.method!r}: allowed {sorted(METHOD_SPECS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return spec.build(cfg, build_model)


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
