"""Synthetic regression tasks: the paper's generator (floral-method.md §3.1).

Generative process (d = 10, adaptor rank r = 1, ``uv_constant`` = 2.0, c(k) = k mod C):

* parameters, torch generator seeded ``seed + 27``:
  ``W ~ N(0,1)/sqrt(d)`` (d x d), ``u_c ~ N(0,1)/sqrt(d)`` (d x r), ``v_c ~ N(0,1)/sqrt(r)``
  (r x d) for c = 0..C-1, ``b ~ N(0,1)/sqrt(d)`` (d), ``W_out ~ N(0,1)/sqrt(d)`` (d x d_out);
* client weights ``W_k = W + uv_constant * u_c(k) v_c(k)``;
* data, torch generator seeded ``seed + 11``:
  ``x ~ N(0, I_d)``, ``h = x W_k + b``;
  linear: ``y = h[:, :3]``; MLP: ``y = ReLU(h) W_out`` (d_out = 1);
  plus ``noise_std * N(0, 1)`` label noise (0 by default, as in the paper);
* samples per client ``round(ratio * #params(model))``: ratio 0.25 for linear (33 -> 8),
  0.5 for MLP (241 -> 120); split 80/20 per client as ``torch.random_split`` does
  (``n_test = floor(0.2 n)``: 7/1 and 96/24), seeded ``seed + 13``.

Variants:

* ``-simple`` (official ``simple=True``): ``W = I``, ``u_c = e_c``, ``v_c = e_c^T`` (so cluster
  c scales coordinate c by ``1 + uv_constant``), ``b = 0``, ``W_out = 1 / sqrt(d)``. Needs C <= d.
* ``synthetic-mlp-bn`` (official ``synthetic_mlp_bn``): model ``Linear(10, 20) -> ReLU ->
  BatchNorm1d(20) -> Linear(20, 1)`` and targets from per-client normalized hidden units
  (official ``normalize_hidden``): ``a = ReLU(h)``, ``y = ((a - mean_k(a)) / std_k(a)) W_out``
  (statistics over the client's own samples, unbiased std); batch size 5 as in its preset.
* ``synthetic-linear-bn`` (not in the paper; our analogue): model ``Linear(10, 3)`` followed by
  ``BatchNorm1d(3)``, targets ``(h - mean_k(h)) / std_k(h)`` on the first 3 coordinates.
  The sample count follows the ratio on the BN model's own parameter count (39 -> 10; MLP-BN
  281 -> 140, as the official code counts the instantiated model).

The parameter and data draws use the same generators, shapes and order as the official
``SyntheticDataset`` (``W``, ``u``, ``v``, ``b``, ``W_out`` from ``seed + 27``; all clients' ``x``
as one ``randn(K, n, d)`` from ``seed + 11``), so for K divisible by C the data match the
official generator value for value; K not divisible by C is allowed here (client k -> k mod C).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .base import (ClientData, Task, fedavg_server_preset, check_int, check_num_clusters, default_preset,
                   normalize_options)
from .models import SimpleNN, count_parameters, linear_model

SYNTHETIC_NAMES = (
    "synthetic-linear", "synthetic-linear-simple", "synthetic-linear-bn",
    "synthetic-mlp", "synthetic-mlp-simple", "synthetic-mlp-bn",
)

_PAPER = {
    # kind: (K, C, rounds, batch, lr, ratio)
    "linear": (10, 2, 2000, 4, 0.1, 0.25),
    "mlp": (20, 4, 2000, 8, 0.03, 0.5),
}


class SyntheticTask(Task):
    """Regression task; ``loss_fn`` MSE, ``metric`` ``"mse"``; y is float32 (N, d_out)."""

    metric = "mse"

    def __init__(self, name: str, num_clients: Any, seed: int, **options: Any) -> None:
        super().__init__()
        parts = name.split("-")
        kind = parts[1]
        variant = parts[2] if len(parts) > 2 else None
        K_paper, C_paper, rounds, batch, lr, ratio = _PAPER[kind]
        if num_clients is None:
            num_clients = K_paper
        opts = normalize_options(options, {
            "num_clusters": C_paper, "samples_per_client": None, "data_to_param_ratio": ratio,
            "uv_constant": 2.0, "noise_std": 0.0, "test_fraction": 0.2, "dim": 10,
            "uv_rank": 1,
        }, name)
        self.name = name
        self.kind, self.variant = kind, variant
        self.seed = check_int("seed", seed)
        self.num_clients = check_int("num_clients", num_clients, 1)
        self.num_clusters = check_num_clusters(opts["num_clusters"], self.num_clients)
        self.d = check_int("dim", opts["dim"], 1)
        self.r = check_int("uv_rank", opts["uv_rank"], 1)
        self.d_out = 3 if kind == "linear" else 1
        if kind == "linear" and self.d < self.d_out:
            raise ValueError(f"dim: synthetic-linear needs dim >= 3, got {self.d}")
        if variant == "simple" and self.num_clusters > self.d:
            raise ValueError(f"num_clusters: the -simple variant uses basis vectors e_c and needs "
                             f"C <= dim={self.d}, got C={self.num_clusters}")
        self.uv_constant = float(opts["uv_constant"])
        self.noise_std = float(opts["noise_std"])
        tf = float(opts["test_fraction"])
        if not 0.0 <= tf < 1.0:
            raise ValueError(f"test_fraction: expected a number in [0, 1), got {tf!r}")
        self.test_fraction = tf
        n_params = count_parameters(self.build_model())
        if opts["samples_per_client"] is None:
            n = int(round(float(opts["data_to_param_ratio"]) * n_params))
        else:
            n = opts["samples_per_client"]
        self.samples_per_client = check_int("samples_per_client", n, 1)
        self.options = opts
        self.loss_fn = nn.MSELoss()
        self.defaults = default_preset(
            rounds=rounds, batch=5 if variant == "bn" else batch, lr=lr, mixture_lr=0.1,
            adaptors=self.num_clusters, clients=K_paper)
        self.defaults["adapt-norm"] = variant == "bn"
        self.extra_defaults = fedavg_server_preset()
        self._generate()

    # -- model
    def build_model(self) -> nn.Module:
        bn = self.variant == "bn"
        if self.kind == "linear":
            return linear_model(self.d, self.d_out, batch_norm=bn)
        return SimpleNN(self.d, 20, 1, batch_norm=bn)

    # -- generator
    def _generate(self) -> None:
        """Same draws, shapes and order as the official ``SyntheticDataset`` (seed + 27 for the
        parameters, seed + 11 for the data, all clients' x in one ``randn(K, n, d)``)."""
        d, r, C, K, n = self.d, self.r, self.num_clusters, self.num_clients, self.samples_per_client
        if self.variant == "simple":
            W = torch.eye(d)
            U = torch.zeros(C, d, r)
            V = torch.zeros(C, r, d)
            for rr in range(r):
                for c in range(C):
                    U[c, c, rr] = 1.0
                    V[c, rr, (c + rr) % d] = 1.0
            b = torch.zeros(d)
            W_out = torch.ones(d, self.d_out) / d ** 0.5
        else:
            g = torch.Generator().manual_seed(self.seed + 27)
            W = torch.randn(d, d, generator=g) / d ** 0.5
            U = torch.randn(C, d, r, generator=g) / d ** 0.5
            V = torch.randn(C, r, d, generator=g) / r ** 0.5
            b = torch.randn(d, generator=g) / d ** 0.5
            W_out = torch.randn(d, self.d_out, generator=g) / d ** 0.5
        self.params = {"W": W, "U": U, "V": V, "b": b, "W_out": W_out}
        cl = torch.arange(K) % C
        Ws = W.unsqueeze(0) + self.uv_constant * (U @ V)[cl]          # (K, d, d), interleaved
        gd = torch.Generator().manual_seed(self.seed + 11)
        xs = torch.randn(K, n, d, generator=gd)
        hs = xs @ Ws + b
        if self.kind == "linear":
            if self.variant == "bn":  # ours: per-client standardized targets
                hs = (hs - hs.mean(1, keepdim=True)) / hs.std(1, keepdim=True).clamp_min(1e-8)
            ys = hs[:, :, : self.d_out]
        else:
            hs = torch.relu(hs)
            if self.variant == "bn":  # official normalize_hidden: after the activation
                hs = (hs - hs.mean(1, keepdim=True)) / hs.std(1, keepdim=True).clamp_min(1e-8)
            ys = hs @ W_out
        if self.noise_std > 0:
            ys = ys + self.noise_std * torch.randn(ys.shape, generator=gd)
        gs = torch.Generator().manual_seed(self.seed + 13)
        n_test = int(np.floor(self.test_fraction * n)) if n > 1 else 0
        self._data: list[ClientData] = []
        for k in range(K):
            perm = torch.randperm(n, generator=gs)
            tr, te = perm[: n - n_test], perm[n - n_test:]
            x, y = xs[k], ys[k]
            self._data.append(ClientData(x[tr].float().contiguous(), y[tr].float().contiguous(),
                                         x[te].float().contiguous(), y[te].float().contiguous()))

    def client_weights(self, cid: int) -> torch.Tensor:
        """The ground-truth W_k of client ``cid`` (for analysis)."""
        c = self.cluster_of(cid)
        p = self.params
        return p["W"] + self.uv_constant * p["U"][c] @ p["V"][c]

    def _make_client_data(self, cid: int) -> ClientData:
        return self._data[cid]
