"""FedAvg: one global model (McMahan et al., AISTATS 2017, arXiv 1602.05629).

- Federated: every parameter and buffer of the task model, weighted by n_k.
- Private: nothing (the plain :class:`~floral_flwr.methods.base.ModelHandle`). Each client's
  update is in plaintext under ``'mean'``, only its sum is unmasked under ``'secagg'``.
- Holdout clients: zero-shot = adapted = the global model (nothing personal to fit).
- ``train-base`` = false: averaging what trains on a frozen base is one shared LoRA, so this
  builds :mod:`.fedavg_lora`'s model (the FedIT / FlowerTune baseline).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.methods.base import MethodSpec, ModelHandle, register
from floral_flwr.methods.fedavg_lora import build_shared_lora


def _build(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> ModelHandle:
    if not cfg.train_base:
        return build_shared_lora(cfg, build_model)
    return ModelHandle(build_model())


register(MethodSpec(
    "fedavg",
    "FedAvg (McMahan et al., 2017): one global model",
    uses_adaptors=False,
    build=_build,
    federated="the whole model (weights n_k); with train-base=false one shared LoRA + the head",
    private="nothing",
))
