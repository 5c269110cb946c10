"""Ditto: Fair and Robust Federated Learning Through Personalization (Li, Hu, Beirami, Smith,
ICML 2021, arXiv 2012.04221).

Per client k: min_v F_k(v) + (lambda/2) ||v - w*||^2 with w* the FedAvg global model.

- Shared (wire keys ``base.*``): the global model w, trained by plain local SGD (FedProx's term
  when ``server-optimizer='fedprox'``) and aggregated by FedAvg (n_k-weighted mean, uniform
  sampling: Flower's convention; the official code samples prop. to n_k and averages uniformly).
- Private (``personal.*``): the personal model v_k, a full model, kept in the private-state store;
  never in a reply, in any ``aggregation`` mode. The server sees each client's trained global
  model under ``'mean'`` / ``'sum-only'`` (plain FedAvg), only the sum under ``'secagg'``.
  A client with no stored v_k starts it from the global model it just received (so a
  never-sampled client's v_k is the current global model, not the round-1 init).
- Client round (the official ``trainers_MTL/ditto.py`` order): for each mini-batch b, one personal
  step v <- v - lr (grad F_k(v; b) + lambda (v - w_t)) with w_t the **round-start** global model
  (a frozen copy, not the drifting local w), then one global step on the same b. Same lr.
- **Evaluation uses the personal model v_k** (``module.forward`` is v's forward); the official
  FLoRAL code's Ditto evaluates the global model instead, which is a bug we do not reproduce.
- ``ditto-lambda`` = lambda (default 1, the official scripts' value).
- Holdout clients: zero-shot = v = w (the global model); adapted = ``adapt-steps`` personal steps
  with the prox term to w (w frozen).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.methods.base import MethodSpec, ModelHandle, register
from floral_flwr.methods.multimodel import fit_output
from floral_flwr.methods.training import LossTracker, minibatches, proximal_term, step_with_clip


class DittoModel(nn.Module):
    def __init__(self, global_model: nn.Module) -> None:
        super().__init__()
        self.global_model = global_model
        self.personal = copy.deepcopy(global_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.personal(x)  # evaluation (and everything personal) uses v_k


class DittoHandle(ModelHandle):
    @classmethod
    def build(cls, cfg: Any, build_model: Callable[[], nn.Module]) -> "DittoHandle":
        h = cls(DittoModel(build_model()))
        h.lam = float(cfg.ditto_lambda)
        return h

    lam = 1.0
    _fresh = True

    # -- shared: the global model, as FedAvg's base.* keys
    def shared_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict(("base." + k, v) for k, v in self.module.global_model.state_dict().items())

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.module.global_model.state_dict())
        got = {k[len("base."):] for k in state if k.startswith("base.")}
        if expected != got or len(got) != len(state):
            raise ValueError(f"shared state keys differ: missing {sorted(expected - got)[:5]}")
        self.module.global_model.load_state_dict({k[5:]: v for k, v in state.items()}, strict=True)

    # -- private: the personal model
    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict(("personal." + k, v.detach().clone()) for k, v in self.module.personal.state_dict().items())

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"personal." + k for k in self.module.personal.state_dict()}
        if set(state) != expected:
            raise ValueError(f"private keys differ: {sorted(set(state) ^ expected)[:5]}")
        self.module.personal.load_state_dict({k[len("personal."):]: v for k, v in state.items()}, strict=True)
        self._fresh = False

    def personalized_module(self) -> nn.Module:
        return self.module.personal  # v_k, what Ditto evaluates

    def reset_private(self) -> None:
        self._fresh = True  # v_k := the received global model on first use

    def ensure_personal(self) -> None:
        if self._fresh:
            self.module.personal.load_state_dict(self.module.global_model.state_dict())
            self._fresh = False

    def regularization_loss(self) -> torch.Tensor | float:
        """(lambda/2) ||v - w||^2 against the current (frozen) global model: used by ``adapt``."""
        pairs = zip(self.module.personal.parameters(), self.module.global_model.parameters())
        return 0.5 * self.lam * sum((v - w.detach()).pow(2).sum() for v, w in pairs)

    def param_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.module.global_model.parameters() if p.requires_grad], "lr": lr}]

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.module.personal.parameters() if p.requires_grad], "lr": lr}]

    def prepare_eval(self, x, y, loss_fn, cfg, device="cpu") -> None:  # type: ignore[override]
        self.ensure_personal()

    def prepare_zero_shot(self, x, y, loss_fn, cfg, device="cpu") -> None:  # type: ignore[override]
        self.ensure_personal()

    def adapt(self, x, y, loss_fn, cfg, device="cpu", steps=None) -> int:  # type: ignore[override]
        self.ensure_personal()
        return super().adapt(x, y, loss_fn, cfg, device, steps)

    def train_round(self, x, y, loss_fn, *, epochs, batch_size, lr, mixture_lr=0.0, momentum=0.0,  # type: ignore[override]
                    weight_decay=0.0, grad_clip=0.0, proximal_mu=0.0, generator_seed=0, device="cpu",
                    augment=None):
        self.ensure_personal()
        g, v = self.module.global_model, self.module.personal
        g.train()
        v.train()
        anchor = [w.detach().clone() for w in g.parameters()]  # w_t, the round-start global model
        gp = [p for p in g.parameters() if p.requires_grad]
        vp = [p for p in v.parameters() if p.requires_grad]
        opt_g = torch.optim.SGD(gp, lr=lr, momentum=momentum, weight_decay=weight_decay)
        opt_v = torch.optim.SGD(vp, lr=lr, momentum=momentum, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(generator_seed)
        n = int(y.shape[0])
        tracker = LossTracker()
        for _, xb, yb in minibatches(x, y, epochs=epochs, batch_size=batch_size, generator=gen,
                                     augment=augment, device=device):
            # personal step, prox to the round-start global model
            opt_v.zero_grad(set_to_none=True)
            lv = loss_fn(fit_output(v(xb), yb), yb)
            (lv + proximal_term(zip(v.parameters(), anchor), self.lam)).backward()
            step_with_clip(opt_v, grad_clip)
            # global step (plain local SGD; FedProx term when configured)
            opt_g.zero_grad(set_to_none=True)
            lg = loss_fn(fit_output(g(xb), yb), yb)
            obj = lg
            if proximal_mu > 0:
                obj = obj + proximal_term(zip(g.parameters(), anchor), proximal_mu)
            obj.backward()
            step_with_clip(opt_g, grad_clip)
            tracker.add(lg, int(yb.shape[0]))
        return tracker.result(n)


register(MethodSpec(
    "ditto",
    "Ditto (Li et al., ICML 2021, arXiv 2012.04221): FedAvg global model + private "
    "personal model with a proximal term; evaluates the personal model",
    uses_adaptors=False,
    build=DittoHandle.build,
    federated="the global model (weights n_k)",
    private="the personal model",
))
