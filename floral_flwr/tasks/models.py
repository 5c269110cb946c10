"""Model factories of the task suite (plain torch layers only).

Shapes and parameter counts follow the official FLoRAL code (see
``shared/reference/floral-method.md`` §2 and §5.3):

==================  =====================================================  ==========
factory             layers                                                 parameters
==================  =====================================================  ==========
``linear_model``    ``nn.Linear(10, 3)``                                   33
``SimpleNN``        10 -> 20 ReLU -> 1                                     241
``MLP(784,200,10)`` Flatten, 784 -> 200 ReLU -> 10 (``MnistNN``)           159,010
``MLP(64,200,10)``  Flatten, 64 -> 200 ReLU -> 10 (digits)                 15,010
``Cifar10CNN``      conv5x5 3->32, MP2, conv3x3 32->64, MP3, 1024->64->10  87,178
``VGG8``            5 conv3x3 (16,32,64,128,512) + MP2 each,               1,264,388
                    FC 512-512-512-100 with dropout (8 weight layers)
==================  =====================================================  ==========

Every image model starts with the layers it needs to accept ``(N, C, H, W)`` float tensors (the
MLPs flatten first), so ``ClientData.train_x`` can be fed directly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = [
    "MLP",
    "SimpleNN",
    "Cifar10CNN",
    "VGG8",
    "linear_model",
    "count_parameters",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what the paper ties synthetic sample sizes to)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def linear_model(in_features: int = 10, out_features: int = 3, batch_norm: bool = False) -> nn.Module:
    """``nn.Linear(10, 3)`` (synthetic-linear); with ``batch_norm`` a ``BatchNorm1d`` on its output."""
    if not batch_norm:
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features))


class SimpleNN(nn.Module):
    """The official ``SimpleNN``: Linear(10, 20) -> ReLU -> [BatchNorm1d(20)] -> Linear(20, 1)
    (the official ``featurizer = Sequential(Linear, init_func(), init_norm(hidden))``: the norm
    comes after the activation)."""

    def __init__(self, in_features: int = 10, hidden: int = 20, out_features: int = 1,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(self.act(self.fc1(x))))


class MLP(nn.Module):
    """Flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, out) (``MnistNN`` for 784-200-10)."""

    def __init__(self, in_features: int = 784, hidden: int = 200, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(x))))


class Cifar10CNN(nn.Module):
    """The official ``Cifar10CNN``: 32x32x3 -> conv5x5(32) 28 -> MP2 14 -> conv3x3(64) 12 -> MP3 4
    -> flatten 64*4*4 = 1024 -> FC 64 -> FC classes (87,178 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.pool2 = nn.MaxPool2d(3)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act(self.conv1(x)))
        x = self.pool2(self.act(self.conv2(x)))
        x = self.act(self.fc1(self.flatten(x)))
        return self.fc2(x)


def _norm_layer(norm: Optional[str], channels: int, groups: int) -> nn.Module:
    if norm is None or norm == "none":
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"norm: unknown value {norm!r}; allowed: None, 'none', 'bn', 'gn'")


class VGG8(nn.Module):
    """VGG-8 of the official CIFAR-100 task (``floral/model/vgg8.py``, from liehe/PRFL): five 3x3
    convs (16, 32, 64, 128, 512; padding 1), each followed by [norm] + ReLU + MaxPool2d(2)
    (32 -> 1 spatial), then Dropout, FC 512-512, ReLU, Dropout, FC 512-512, ReLU, FC 512-classes.
    Conv weights ~ N(0, 2 / (k*k*out_channels)), conv biases 0, as in the official init.
    ``norm``: None (paper, no BN), ``"bn"`` (BatchNorm2d, the official ``batch_norm=True``) or
    ``"gn"`` (GroupNorm with ``gn_groups`` groups) after each conv, for norm-adaptor runs."""

    CHANNELS = (16, 32, 64, 128, 512)

    def __init__(self, num_classes: int = 100, in_channels: int = 3, norm: Optional[str] = None,
                 dropout: float = 0.5, gn_groups: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in self.CHANNELS:
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                       _norm_layer(norm, c_out, gn_groups), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))
