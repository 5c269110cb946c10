"""FLoRAL and FLoRAL-oracle.

Definition (Almansoori, Horváth, Takáč, "Collaborative and Efficient Personalization with
Mixtures of Adaptors", CPAL 2025): a shared base model plus, on chosen layers, C low-rank
adaptors; each client owns a mixture vector (C logits, p = softmax), and a layer computes
``base(x) + alpha * sum_c p_c * adaptor_c(x)`` (:mod:`floral_flwr.floral`, plain PyTorch).

- Federated: the base, weighted by n_k (FedAvg); adaptor c, weighted by n_k * p_k(c) (the
  paper's p(k|c) rule, :mod:`floral_flwr.strategy.aggregate`).
- Private: the mixture logits (``mixture.logits``), never sent.
- What the server learns of p_k: under ``aggregation='secagg'`` (the default) nothing per client:
  the weights w_k(c) = n_k p_k(c) and the weighted adaptor updates are inside the SecAgg+ mask
  and only their sums over clients are unmasked (docs/privacy.md). Under ``'mean'`` and
  ``'sum-only'`` every train reply carries ``adaptor-weights`` = n_k p_k in plaintext (p_k is
  recovered exactly) and, in ``'mean'``, the trained adaptors; ``'mean'`` evaluation replies also
  carry argmax_c p_k(c). Evaluation replies carry p_k itself only with ``report-mixtures``.
- ``floral-oracle``: the mixture fixed one-hot at the client's true cluster (logits frozen), the
  upper reference of the paper's tables (its weights n_k 1[c = cluster_k] reveal the true cluster
  in ``'mean'``; masked under ``'secagg'``).
- Holdout clients fit only their C logits (``adapt``).
- ``train-base`` = false (a pretrained backbone): the base is frozen and never sent; only the
  adaptors and the task's head (``head_patterns``) train and travel.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.floral import Floral
from floral_flwr.methods.base import MethodSpec, ModelHandle, register


class FloralHandle(ModelHandle):
    """FLoRAL: adaptors federated with p(k|c), mixture private."""

    def __init__(self, floral: Floral) -> None:
        self.floral = floral
        self.num_adaptors = floral.num_adaptors
        super().__init__(floral)

    def shared_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict(self.floral.shared_state_dict().items())

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.floral.load_shared_state_dict(state)

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict(self.floral.private_state_dict())
        return OrderedDict((k, v.detach().clone()) for k, v in out.items())

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
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
        mix = [p for p in self.floral.mixture_parameters() if p.requires_grad]
        return [{"params": mix, "lr": mixture_lr}]

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
        adaptor_init=cfg.adaptor_init,
        precondition=cfg.precondition,
        adapt_norm=cfg.adapt_norm,
        temperature=cfg.temperature,
        mixture_noise=cfg.mixture_noise,
        prob_floor=cfg.prob_floor,
        entropy_penalty=cfg.entropy_penalty,
        per_layer_mixture=cfg.per_layer_mixture,
    )


def adaptor_targets(model: nn.Module) -> dict[str, Any]:
    """``include``/``exclude`` for ``Floral`` from the task model: a model may name the layers its
    adaptors go on (``model.adaptor_include`` / ``model.adaptor_exclude``: fnmatch patterns on
    module names, e.g. the query/value projections of a transformer's top layers and its head);
    without them every supported layer is adapted."""
    return {k: getattr(model, f"adaptor_{k}") for k in ("include", "exclude")
            if getattr(model, f"adaptor_{k}", None) is not None}


def head_patterns(model: nn.Module) -> tuple[str, ...]:
    """State-key patterns of the base parameters that still train (and travel) when the base is
    frozen (``train-base`` = false): the model's ``head_patterns`` attribute (a text classifier's
    head), else the parameters of its last ``nn.Linear`` (the classifier of the image models)."""
    own = getattr(model, "head_patterns", None)
    if own is not None:
        return tuple(own)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (f"{linears[-1]}.*",) if linears else ()


def build_floral_model(cfg: RunConfig, model: nn.Module, **overrides: Any) -> Floral:
    """``Floral`` around the task model with the run config's settings (``overrides`` win), on
    the layers the model names, with the base frozen except its head when ``train-base`` is
    false: what FLoRAL, the local adaptor, FedDPA and the shared LoRA all build."""
    heads = head_patterns(model)
    fm = Floral(model, **{**floral_kwargs(cfg), **adaptor_targets(model), **overrides})
    if not cfg.train_base:
        fm.freeze_base(trainable=heads)
    return fm


def _build_floral(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> FloralHandle:
    return FloralHandle(build_floral_model(cfg, build_model()))


register(MethodSpec(
    "floral",
    "FLoRAL (Almansoori et al., CPAL 2025): shared base + C low-rank adaptors, private mixture",
    uses_adaptors=True,
    build=_build_floral,
    federated="base (weights n_k) and the C adaptors (weights n_k p_k(c))",
    private="the mixture logits (n_k p_k in plaintext under 'mean', masked under 'secagg')",
))
register(MethodSpec(
    "floral-oracle",
    "FLoRAL with the mixture fixed one-hot at the client's true cluster (upper reference)",
    uses_adaptors=True,
    needs_clusters=True,
    build=_build_floral,  # the client fixes the mixture at its cluster (set_oracle) at set-up
    federated="base (weights n_k) and the C adaptors (weights n_k 1[c = cluster_k])",
    private="the (fixed, one-hot) mixture",
))
