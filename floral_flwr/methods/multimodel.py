"""Shared pieces of the multi-model methods (ensemble, IFCA, FedEM): C full models as one stacked
shared state, per-sample losses."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from floral_flwr.methods.base import ModelHandle

MODEL_PREFIX = "adaptor.model."  # leading dim C: the FLoRAL accumulator weights slice c by w_k(c)


def fit_output(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.reshape(y.shape) if out.shape != y.shape and out.numel() == y.numel() else out


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    """Per-sample version of the task loss (cross-entropy or squared error)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return F.cross_entropy(out, y, reduction="none")
    if isinstance(loss_fn, nn.MSELoss):
        d = fit_output(out, y).float() - y.float()
        return d.pow(2).reshape(d.shape[0], -1).mean(1)
    raise ValueError(f"per-sample loss of {type(loss_fn).__name__} is not supported")


class MultiModel(nn.Module):
    """C copies of one architecture; subclasses define how they are combined in ``forward``."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    @property
    def num_models(self) -> int:
        return len(self.models)


class MultiModelHandle(ModelHandle):
    """Shared state = the C models stacked per key: ``adaptor.model.<key>`` with leading dim C."""

    def __init__(self, module: MultiModel) -> None:
        self.num_adaptors = module.num_models
        self._keys = list(module.models[0].state_dict())
        super().__init__(module)

    @staticmethod
    def make_models(build_model: Callable[[], nn.Module], count: int) -> list[nn.Module]:
        # consecutive draws of the caller's seeded RNG: C different initialisations (symmetry
        # breaking), identical on every client and the server
        return [build_model() for _ in range(count)]

    def shared_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        states = [m.state_dict() for m in self.module.models]
        return OrderedDict((MODEL_PREFIX + k, torch.stack([s[k] for s in states])) for k in self._keys)

    def load_shared_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {MODEL_PREFIX + k for k in self._keys}
        if set(state) != expected:
            raise ValueError(
                f"shared state keys differ: missing {sorted(expected - set(state))[:5]}, "
                f"extra {sorted(set(state) - expected)[:5]}"
            )
        C = self.num_adaptors
        for c, m in enumerate(self.module.models):
            sd = {}
            for k in self._keys:
                v = state[MODEL_PREFIX + k]
                if v.shape[0] != C:
                    raise ValueError(f"'{MODEL_PREFIX + k}' has leading dim {v.shape[0]}, expected {C}")
                sd[k] = v[c]
            m.load_state_dict(sd, strict=True)

    def model_params(self, index: int | None = None) -> list[nn.Parameter]:
        mods = self.module.models if index is None else [self.module.models[index]]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    @torch.no_grad()
    def model_losses(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                     device: torch.device | str = "cpu", batch_size: int = 512) -> torch.Tensor:
        """(n, C) per-sample losses of every model on (x, y), eval mode."""
        was = self.module.training
        self.module.eval()
        rows = []
        for start in range(0, int(y.shape[0]), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            rows.append(torch.stack([per_sample_loss(m(xb), yb, loss_fn) for m in self.module.models], 1))
        self.module.train(was)
        return torch.cat(rows, 0)


def as_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().float().cpu()]


__all__ = ["MODEL_PREFIX", "MultiModel", "MultiModelHandle", "per_sample_loss", "fit_output", "as_list", "Any"]
