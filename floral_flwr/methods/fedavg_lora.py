"""One shared LoRA: FedAvg of a single low-rank adaptor on a (frozen) base, the federated
fine-tuning baseline of foundation models (FedIT: Zhang et al., "Towards Building the Federated
GPT: Federated Instruction Tuning", ICASSP 2024, arXiv 2305.05644; Flower's FlowerTune LLM
leaderboard and OpenFedLLM train one LoRA this way). No client personalizes.

- Model: FLoRAL's wrapper with C = 1 on the same layers (the task's ``adaptor_include``), the
  mixture fixed at that one adaptor: ``base(x) + alpha * B A x``, as a LoRA.
- Federated: the adaptor, weighted by n_k (plain FedAvg, the wire's single adaptor slot), and
  the trainable base: everything with ``train-base`` = true, only the task's head with
  ``train-base`` = false (the FedIT setting: the pretrained backbone never moves nor travels).
- Private: nothing.
- ``fedavg`` with ``train-base`` = false builds this same model: with a frozen base, averaging
  what trains *is* one shared LoRA (plus the head).
- Holdout clients: zero-shot = adapted = the global model (nothing personal to fit).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.methods.base import MethodSpec, register
from floral_flwr.methods.floral import FloralHandle, build_floral_model


class SharedLoRAHandle(FloralHandle):
    """FLoRAL's handle with C = 1, the mixture fixed and kept off the private state."""

    def __init__(self, floral) -> None:
        super().__init__(floral)
        self.num_adaptors = 1

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict()  # the fixed one-adaptor mixture is the same everywhere

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"one shared LoRA has no private state, got keys {sorted(state)[:5]}")

    def adaptor_weights(self, n: float) -> list[float]:
        return [float(n)]

    def mixture(self) -> list[float] | None:
        return None  # nothing personal to report (and no clustering to score)

    def adapt_groups(self, lr: float, mixture_lr: float) -> list[dict]:
        return []

    def personalized_module(self) -> nn.Module:
        return self.floral.merge()  # the global model with the LoRA folded in


def build_shared_lora(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> SharedLoRAHandle:
    fm = build_floral_model(cfg, build_model(), num_adaptors=1, mixture_noise=0.0, prob_floor=0.0,
                            entropy_penalty=0.0, per_layer_mixture=False)
    fm.set_oracle(0)
    return SharedLoRAHandle(fm)


register(MethodSpec(
    "fedavg-lora",
    "one shared LoRA averaged by FedAvg (FedIT / FlowerTune LLM baseline), base frozen with "
    "train-base=false",
    uses_adaptors=True,
    build=build_shared_lora,
    federated="the LoRA adaptor (weights n_k) and the trainable base (only the head when "
              "train-base=false)",
    private="nothing",
))
