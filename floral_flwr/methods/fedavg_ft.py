"""FedAvg-FT: FedAvg, then local fine-tuning of a copy of the global model before evaluation.

Training is plain FedAvg (McMahan et al., AISTATS 2017). At every evaluation each client
fine-tunes a copy of the received global model on its own train split for ``adapt-steps`` SGD
steps (mini-batches of ``batch-size``, learning rate ``lr``, all layers) and tests that copy
(the protocol of Wang et al. 2019, arXiv 1910.10252, and Yu et al. 2020, arXiv 2002.04758; the
budget follows FedEM's ``--locally_tune_clients``: a few steps, all layers). The tuned copy is
ephemeral: the next message overwrites it with the global model, nothing goes back to the server.
Holdout clients: zero-shot = the global model, adapted = the fine-tuned copy.

- Federated: the whole model, weighted by n_k (plain FedAvg).
- Private: nothing kept between rounds (the fine-tuned copy is rebuilt at every evaluation and
  never sent). Updates as FedAvg's: per client under ``'mean'``, summed under ``'secagg'``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from floral_flwr.methods.base import MethodSpec, ModelHandle, register
from floral_flwr.methods.training import sgd_steps


class FedAvgFTHandle(ModelHandle):
    def prepare_eval(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, cfg: Any,
                     device: torch.device | str = "cpu") -> None:
        self.adapt(x, y, loss_fn, cfg, device)

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": lr}]

    def adapt(self, x, y, loss_fn, cfg, device="cpu", steps=None) -> int:  # type: ignore[override]
        steps = cfg.adapt_steps if steps is None else steps
        if steps <= 0:
            return 0
        return sgd_steps(self, self.adapt_groups(cfg.lr, 0.0), x, y, loss_fn, steps, cfg.batch_size,
                         cfg.seed, device)


register(MethodSpec(
    "fedavg-ft",
    "FedAvg + local fine-tuning before evaluation (McMahan et al. 2017; Wang et al. "
    "2019, arXiv 1910.10252; Yu et al. 2020, arXiv 2002.04758)",
    uses_adaptors=False,
    build=lambda cfg, build_model: FedAvgFTHandle(build_model()),
    federated="the whole model (weights n_k)",
    private="nothing kept: the fine-tuned copy is ephemeral",
))
