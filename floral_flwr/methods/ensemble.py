"""Ensemble and Ensemble-oracle: the FLoRAL paper's full-model mixture baselines.

Definition (Almansoori et al., CPAL 2025, §5 and the official ``model/ensemble.py``): C full copies
of the task model and a private client mixture p = softmax(theta) (the same ``Mixture`` as FLoRAL:
temperature, training-time logit noise, floor); the output is ``sum_c p_c f_c(x)`` (model outputs
mixed, models with p_c < 1e-3 skipped as in the official code). The server aggregates model c with
the same p(k|c) rule as FLoRAL's adaptors: w_k(c) = n_k p_k(c). ``ensemble-oracle`` fixes p
one-hot at the client's true cluster (logits frozen), i.e. clustered FedAvg with known clusters.

Cost: C x the model's parameters, compute and communication (FLoRAL's point of comparison).
- Federated: the C models (model c weighted by n_k p_k(c)).
- Private: ``mixture.logits`` (C,). Holdout clients fit only the C logits.
- What the server learns of p_k: as FLoRAL's (:mod:`.floral`): under ``'secagg'`` only sums over
  clients of n_k p_k(c) and of the weighted model updates; under ``'mean'`` / ``'sum-only'`` each
  reply's ``adaptor-weights`` = n_k p_k; p_k itself in evaluation only with ``report-mixtures``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.floral.mixture import Mixture

from floral_flwr.methods.base import MethodSpec, register
from floral_flwr.methods.multimodel import MultiModel, MultiModelHandle, as_list

SKIP_BELOW = 1e-3


class EnsembleModel(MultiModel):
    def __init__(self, models: list[nn.Module], mixture: Mixture) -> None:
        super().__init__(models)
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.mixture(noise=self.training)
        out = None
        keep = (p.detach() >= SKIP_BELOW).tolist()
        for c, m in enumerate(self.models):
            if not keep[c]:
                continue
            y = p[c] * m(x)
            out = y if out is None else out + y
        if out is None:  # every p_c tiny (only with a pathological floor/temperature)
            out = sum(p[c] * m(x) for c, m in enumerate(self.models))
        return out


class EnsembleHandle(MultiModelHandle):
    @classmethod
    def build(cls, cfg: Any, build_model: Callable[[], nn.Module], oracle: bool = False) -> "EnsembleHandle":
        models = cls.make_models(build_model, cfg.num_adaptors)
        mixture = Mixture(cfg.num_adaptors, None, temperature=cfg.temperature, noise=cfg.mixture_noise,
                          floor=cfg.prob_floor)
        h = cls(EnsembleModel(models, mixture))
        h.oracle = oracle
        return h

    oracle = False

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("mixture.logits", self.module.mixture.logits.detach().clone())])

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"mixture.logits"}:
            raise ValueError(f"expected private key 'mixture.logits', got {sorted(state)[:5]}")
        v = state["mixture.logits"]
        if v.shape != self.module.mixture.logits.shape:
            raise ValueError(f"mixture.logits shape {tuple(v.shape)} != {tuple(self.module.mixture.logits.shape)}")
        with torch.no_grad():
            self.module.mixture.logits.copy_(v)

    def set_oracle(self, cluster: int) -> None:
        self.module.mixture.set_oracle(int(cluster))

    def param_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": self.model_params(), "lr": lr}]
        mix = [p for p in [self.module.mixture.logits] if p.requires_grad]
        if mix and mixture_lr > 0:
            groups.append({"params": mix, "lr": mixture_lr, "weight_decay": 0.0, "momentum": 0.0})
        return groups

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in [self.module.mixture.logits] if p.requires_grad], "lr": mixture_lr}]

    def mixture(self) -> list[float] | None:
        with torch.no_grad():
            return as_list(self.module.mixture(noise=False))


register(MethodSpec(
    "ensemble",
    "C full models mixed at the output with a learned private mixture, aggregated "
    "with p(k|c) (the FLoRAL paper's 'Ensemble' baseline)",
    uses_adaptors=False,
    build=lambda cfg, build_model: EnsembleHandle.build(cfg, build_model, oracle=False),
    federated="the C models (model c weighted by n_k p_k(c))",
    private="the mixture logits (n_k p_k in plaintext under 'mean', masked under 'secagg')",
))
register(MethodSpec(
    "ensemble-oracle",
    "Ensemble with the mixture fixed one-hot at the true cluster (oracle clustered "
    "FedAvg; the paper's 'Ensemble, optimal router')",
    uses_adaptors=False,
    needs_clusters=True,
    build=lambda cfg, build_model: EnsembleHandle.build(cfg, build_model, oracle=True),
    federated="the C models (model c weighted by n_k 1[c = cluster_k])",
    private="the (fixed, one-hot) mixture",
))
