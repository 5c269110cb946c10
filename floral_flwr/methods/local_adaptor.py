"""Local adaptor: a federated base plus one private low-rank adaptor per client.

Definition (the FLoRAL paper's "Local Adaptor" baseline, official ``floral_locallora``): FLoRAL's
wrapper with C = 1 and the adaptor bank kept on the client (never aggregated), so only the base is
federated. Personalization = one private low-rank edit per client, with no sharing between
similar clients.

- Federated: the base, weighted by n_k (FedAvg).
- Private: the adaptor bank (``adaptor.*``) and its (fixed) one-adaptor mixture; never in a reply,
  in any ``aggregation`` mode (the base update: per client under ``'mean'``, summed under
  ``'secagg'``).
- Holdout clients fit their private adaptor (shared base frozen).
- ``train-base`` = false: the base is frozen and never sent; only the task's head is federated.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.floral import Floral
from floral_flwr.methods.base import MethodSpec, register
from floral_flwr.methods.floral import FloralHandle, build_floral_model


def _is_local(key: str) -> bool:
    return key.startswith("adaptor.")


class LocalAdaptorHandle(FloralHandle):
    """FLoRAL's handle with the adaptor banks moved from the shared to the private state."""

    kind_name = "FloralHandle"  # its private-state files were written under this name: they still load

    def __init__(self, floral: Floral) -> None:
        super().__init__(floral)
        self.num_adaptors = 0  # nothing adaptor-shaped on the wire

    def shared_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v) for k, v in self.floral.shared_state_dict().items() if not _is_local(k))

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        full = {k: v for k, v in self.floral.shared_state_dict().items() if _is_local(k)}
        extra = [k for k in state if _is_local(k)]
        if extra:
            raise ValueError(f"local adaptors must not come from the server: {extra[:5]}")
        full.update(state)
        self.floral.load_shared_state_dict(full)

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict(self.floral.private_state_dict())
        out.update((k, v) for k, v in self.floral.shared_state_dict().items() if _is_local(k))
        return OrderedDict((k, v.detach().clone()) for k, v in out.items())

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        local = {k: v for k, v in state.items() if _is_local(k)}
        state = {k: v for k, v in state.items() if not _is_local(k)}
        if local:
            shared = dict(self.floral.shared_state_dict())
            shared.update(local)
            self.floral.load_shared_state_dict(shared)
        self.floral.load_private_state_dict(state)

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict[str, Any]]:
        # the private adaptor (its mixture is fixed)
        mixture = set(self.floral.mixture_parameters())
        params = [p for k, p in self.floral.named_parameters() if "adaptor" in k and p.requires_grad
                  and p not in mixture]
        return [{"params": params, "lr": lr}]


def _build(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> LocalAdaptorHandle:
    floral = build_floral_model(cfg, build_model())  # num_adaptors = 1 for this method
    floral.set_oracle(0)
    return LocalAdaptorHandle(floral)


register(MethodSpec(
    "local-adaptor",
    "federated base + one private low-rank adaptor per client, never aggregated",
    uses_adaptors=True,
    build=_build,
    federated="base (weights n_k)",
    private="the adaptor bank and its fixed mixture",
))
