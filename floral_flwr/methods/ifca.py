"""IFCA: Iterative Federated Clustering Algorithm (Ghosh, Chung, Yin, Ramchandran, NeurIPS 2020,
arXiv 2006.04088), model-averaging variant (Option II).

- The server sends all C cluster models (stacked ``adaptor.model.*``, leading dim C).
- Client, each round: evaluate every model's loss on the **local training split** (eval mode),
  pick j = argmin_j F_k(theta_j) (ties -> lowest index, as ``np.argmin``), run the usual local SGD
  on model j only, and reply with its id (metric ``cluster-id``) and w_k = n_k * onehot(j).
- Server: model j <- n_k-weighted mean of the replies that chose j (the FEMNIST code's sample
  weighting; the MNIST code's unweighted mean is the same with equal n_k); a model nobody chose
  keeps its parameters (the accumulator keeps zero-weight slices). Flower's stateful server
  optimizers would keep moving unchosen models, so ``ifca`` refuses them (config check).
- Evaluation: the model with the lowest loss on the client's *train* split (never test labels).
- Private state: ``ifca.cluster`` (the last choice, -1 = none yet), kept for reports/resume.
- What the server learns of the choice: under ``'secagg'`` (default) nothing per client: the
  weights n_k onehot(j) and the weighted update of model j are masked, only sums over clients are
  unmasked (so the server learns how many examples chose each model), and ``cluster-id`` is not
  sent. Under ``'mean'`` / ``'sum-only'`` the choice is in plaintext (``cluster-id`` and the
  weights); ``'mean'`` evaluation replies carry the evaluation-time choice
  (``assigned-adaptor``), and the one-hot "mixture" only with ``report-mixtures``.
- Holdout clients: zero-shot = the uniform average of the C models' outputs; adapted = the
  lowest-train-loss model (no gradient step: choosing is IFCA's personalization).
- The reply carries all C models (only slice j is used): uplink is C x the model; a sum-only
  deployment would send the C-slot vector anyway (baselines.md §1, SecAgg note).
- Initialisation: C independent random inits (the paper's choice; no restarts).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.methods.base import MethodSpec, register
from floral_flwr.methods.multimodel import MultiModel, MultiModelHandle
from floral_flwr.methods.training import train_local


class IFCAModel(MultiModel):
    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__(models)
        self.active = -1  # -1: uniform average of all models (zero-shot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active >= 0:
            return self.models[self.active](x)
        return sum(m(x) for m in self.models) / len(self.models)


class IFCAHandle(MultiModelHandle):
    @classmethod
    def build(cls, cfg: Any, build_model: Callable[[], nn.Module]) -> "IFCAHandle":
        return cls(IFCAModel(cls.make_models(build_model, cfg.num_adaptors)))

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("ifca.cluster", torch.tensor(self.module.active, dtype=torch.int64))])

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"ifca.cluster"}:
            raise ValueError(f"expected private key 'ifca.cluster', got {sorted(state)[:5]}")
        c = int(state["ifca.cluster"])
        if not -1 <= c < self.num_adaptors:
            raise ValueError(f"ifca.cluster = {c} out of range")
        self.module.active = c

    def choose(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, device: Any = "cpu") -> int:
        """argmin_j of the mean train loss of model j (ties -> lowest j)."""
        losses = self.model_losses(x, y, loss_fn, device).mean(0)
        j = int(torch.argmin(losses))
        self.module.active = j
        self.last_losses = [float(v) for v in losses]
        return j

    def train_round(self, x, y, loss_fn, **kw):  # type: ignore[override]
        self.choose(x, y, loss_fn, kw.get("device", "cpu"))
        return train_local(self, x, y, loss_fn, **kw)

    def param_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        j = self.module.active
        return [{"params": self.model_params(None if j < 0 else j), "lr": lr}]

    def train_metrics(self) -> dict[str, Any]:
        return {"cluster-id": int(self.module.active)}

    def personalized_module(self) -> nn.Module:
        j = self.module.active  # the chosen cluster model; before any choice, the whole average
        return self.module.models[j] if j >= 0 else self.module

    def mixture(self) -> list[float] | None:
        j = self.module.active
        if j < 0:
            return [1.0 / self.num_adaptors] * self.num_adaptors
        return [1.0 if c == j else 0.0 for c in range(self.num_adaptors)]

    def prepare_eval(self, x, y, loss_fn, cfg, device="cpu") -> None:  # type: ignore[override]
        self.choose(x, y, loss_fn, device)

    def adapt(self, x, y, loss_fn, cfg, device="cpu", steps=None) -> int:  # type: ignore[override]
        self.choose(x, y, loss_fn, device)
        return 0


register(MethodSpec(
    "ifca",
    "IFCA (Ghosh et al., NeurIPS 2020, arXiv 2006.04088): C models, each client "
    "trains the one with the lowest train loss; per-cluster mean",
    uses_adaptors=False,
    build=IFCAHandle.build,
    federated="the C models (model j: mean of the replies that chose j, weights n_k)",
    private="the last cluster choice (ifca.cluster); visible in 'mean' replies, masked under 'secagg'",
))
