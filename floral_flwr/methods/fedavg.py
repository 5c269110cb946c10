"""FedAvg: one global model (McMahan et al., AISTATS 2017, arXiv 1602.05629).

- Federated: every parameter and buffer of the task model, weighted by n_k.
- Private: nothing (the plain :class:`~floral_flwr.methods.base.ModelHandle`). Each client's
  update is in plaintext under ``'mean'``, only its sum is unmasked under ``'secagg'``.
- Holdout clients: zero-shot = adapted = the global model (nothing personal to fit).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from floral_flwr.config import RunConfig
from floral_flwr.methods.base import MethodSpec, ModelHandle, register


def _build(cfg: RunConfig, build_model: Callable[[], nn.Module]) -> ModelHandle:
    return ModelHandle(build_model())


register(MethodSpec(
    "fedavg",
    "FedAvg (McMahan et al., 2017): one global model",
    uses_adaptors=False,
    build=_build,
    federated="the whole model (weights n_k)",
    private="nothing",
))
