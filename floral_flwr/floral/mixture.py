"""The client-private mixture (the official code's ``Router``): logits -> probabilities p.

``p = softmax((theta + xi) / T)`` with ``xi = mixture_noise * U[0, 1)`` in training mode only
(uniform, as in the official code despite its name ``noise_std``), optionally clamped from below
by ``prob_floor`` *without renormalisation* (the official ``probs.clamp(min=0.01)`` quirk: every
adaptor keeps contributing at least ``floor``, and sum(p) may exceed 1).

The mixture is not input dependent: p is computed once per forward pass of the wrapped model and
read by every adapted layer (see :class:`MixtureContext`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class Mixture(nn.Module):
    """Holds the logits ``(C,)`` (shared by all layers) or ``(L, C)`` (one row per layer)."""

    def __init__(
        self,
        num_adaptors: int,
        num_layers: Optional[int] = None,
        temperature: float = 1.0,
        noise: float = 0.0,
        floor: float = 0.0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        shape = (num_adaptors,) if num_layers is None else (num_layers, num_adaptors)
        # Zeros = uniform mixture, as in the official code.
        self.logits = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.num_adaptors = num_adaptors
        self.temperature = float(temperature)
        self.noise = float(noise)
        self.floor = float(floor)
        self.oracle: Optional[int] = None

    def forward(self, noise: bool = False) -> Tensor:
        """Mixture probabilities; ``noise=True`` adds the training-time logit noise."""
        if self.oracle is not None:
            # Exact one-hot (the official diagonal init gives softmax of [-100, 0, ...] and then
            # the 0.01 floor; we keep the oracle exactly one-hot: it is an upper-bound reference).
            p = torch.zeros_like(self.logits)
            p[..., self.oracle] = 1.0
            return p
        theta = self.logits
        if noise and self.noise > 0:
            theta = torch.add(theta, torch.rand_like(theta), alpha=self.noise)  # one kernel
        if self.temperature != 1.0:
            theta = theta / self.temperature
        p = torch.softmax(theta, dim=-1)
        if self.floor > 0:
            p = p.clamp(min=self.floor)
        return p

    def entropy(self) -> Tensor:
        """H(softmax(theta / T)) in nats (noise-free, before the floor); mean over layers."""
        if self.oracle is not None:
            return self.logits.new_zeros(())
        p = torch.softmax(self.logits / self.temperature, dim=-1)
        return torch.special.entr(p).sum(-1).mean()

    def set_oracle(self, cluster: int) -> None:
        """Fix p to one-hot at ``cluster`` and freeze the logits."""
        with torch.no_grad():
            self.logits.fill_(-100.0)  # the official diagonal init, for anyone reading logits
            self.logits[..., cluster] = 0.0
        self.logits.requires_grad_(False)
        self.oracle = int(cluster)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.logits.shape)}, temperature={self.temperature}, "
                f"noise={self.noise}, floor={self.floor}, oracle={self.oracle}")


class MixtureContext:
    """Plain object shared by all parametrizations of one :class:`Floral` model.

    ``Floral.forward`` stores the per-forward p in ``self.p`` (so noise is sampled once per
    forward, not once per layer); if a layer is run outside ``Floral.forward`` (e.g.
    ``fm.model(x)``) the noise-free p is computed from the mixture. ``merge`` uses a context
    with a fixed ``p`` and no mixture.
    """

    def __init__(self, mixture: Optional[Mixture], p: Optional[Tensor] = None) -> None:
        self.mixture = mixture
        self.p = p
        self._columns: dict = {}  # (r, device) -> [0]*r + [1]*r + ... + [C-1]*r

    @property
    def p(self) -> Optional[Tensor]:
        return self._p

    @p.setter
    def p(self, value: Optional[Tensor]) -> None:
        self._p = value
        self._repeated: dict = {}  # (layer index, r) -> p repeated r times; valid for this p

    def probs(self, index: int) -> Tensor:
        p = self.p
        if p is None:
            assert self.mixture is not None
            p = self.mixture(noise=False)
        return p[index] if p.dim() == 2 else p

    def probs_repeated(self, index: int, r: int) -> Tensor:
        """``(p_1 x r, ..., p_C x r)``: (C*r,), the scale of the columns of ``[B_1 | ... | B_C]``.

        Built once per forward pass for all layers of rank r, with one ``index_select`` (one
        autograd node; ``repeat_interleave`` makes four): small layers are bound by node count."""
        if r == 1:
            return self.probs(index)
        key = (index if self._p is not None and self._p.dim() == 2 else 0, r)
        out = self._repeated.get(key) if self._p is not None else None
        if out is None:
            p = self.probs(index)
            columns = self._columns.get((r, p.device))
            if columns is None:
                columns = torch.arange(p.shape[0], device=p.device).repeat_interleave(r)
                self._columns[(r, p.device)] = columns
            out = p.index_select(0, columns)
            if self._p is not None:
                self._repeated[key] = out
        return out

