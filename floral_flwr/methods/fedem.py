"""FedEM: Federated Multi-Task Learning under a Mixture of Distributions (Marfoq, Neglia, Bellet,
Kameni, Vidal, NeurIPS 2021, arXiv 2108.10252).

Each client's data are a mixture of M shared components: p_k(y|x) = sum_m pi_km p_theta_m(y|x),
with p_theta_m(y|x) = exp(-l(h_m(x), y)) (cross-entropy; squared error for regression tasks, i.e.
a Gaussian likelihood up to a constant). M = ``num-adaptors``.

Client round (one EM iteration, as the official ``MixtureClient.step``):
1. E-step on the whole local train split, eval mode: per-sample losses l_im of every component,
   q_i(m) = softmax_m(log pi_m - l_im) with the previous pi;
2. pi_m <- mean_i q_i(m) (private, never sent; floored at 1e-8 so a component can revive);
3. M-step for the components: ``local-epochs`` of SGD over shuffled mini-batches on
   sum_{i in batch} sum_m q_i(m) l_im / |batch| (the official code's normalisation by batch size,
   so component m's effective step is proportional to pi_m); FedProx's term when configured.
Reply: all M components (stacked ``adaptor.model.*``) and w_k(m) = n_k for every m.

What the server learns of pi_k (private, ``fedem.pi``): the weights say nothing about it
(n_k for every m). Under ``'mean'`` / ``'sum-only'`` each client's M trained components are in
plaintext, and component m moved with a step proportional to pi_km, so the sizes of a client's
updates reveal pi_k approximately; under ``'secagg'`` (default) only sums over clients are
unmasked. Evaluation replies carry pi_k only with ``report-mixtures``.

Aggregation rule implemented: theta_m <- sum_k n_k theta_m^k / sum_k n_k over the **replies of the
sampled clients** (the paper's rule with participation; the official ``CentralizedAggregator.mix``
instead averages over all clients with stale copies for non-sampled ones, which only differs when
``fraction-train`` < 1).

Prediction: classification p(y|x) = sum_m pi_m softmax(h_m(x)) (the module returns its log, so the
task's cross-entropy is the mixture NLL); regression: sum_m pi_m h_m(x) (the mixture mean).
Holdout clients: zero-shot = uniform pi; adapted = ``adapt-steps`` EM iterations on pi with the
components frozen (the official ``update_test_clients`` does one).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from floral_flwr.methods.base import MethodSpec, register
from floral_flwr.methods.training import LossTracker, minibatches, proximal_term, step_with_clip

from floral_flwr.methods.multimodel import MultiModel, MultiModelHandle, as_list, per_sample_loss

PI_FLOOR = 1e-8


class FedEMModel(MultiModel):
    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__(models)
        self.register_buffer("pi", torch.full((len(models),), 1.0 / len(models)))
        self.classification = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.models]
        if self.classification:
            logp = torch.stack([torch.log_softmax(o, -1) for o in outs], 0)  # (M, B, K)
            w = torch.log(self.pi.clamp_min(PI_FLOOR)).reshape(-1, *([1] * (logp.ndim - 1)))
            return torch.logsumexp(logp + w, 0)
        return sum(self.pi[m] * o for m, o in enumerate(outs))


class FedEMHandle(MultiModelHandle):
    @classmethod
    def build(cls, cfg: Any, build_model: Callable[[], nn.Module]) -> "FedEMHandle":
        return cls(FedEMModel(cls.make_models(build_model, cfg.num_adaptors)))

    def bind_task(self, task: Any) -> None:
        self.module.classification = isinstance(task.loss_fn, nn.CrossEntropyLoss)

    def private_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("fedem.pi", self.module.pi.detach().clone())])

    def load_private_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"fedem.pi"}:
            raise ValueError(f"expected private key 'fedem.pi', got {sorted(state)[:5]}")
        v = state["fedem.pi"]
        if v.shape != self.module.pi.shape:
            raise ValueError(f"fedem.pi shape {tuple(v.shape)} != {tuple(self.module.pi.shape)}")
        self.module.pi.copy_(v)

    def mixture(self) -> list[float] | None:
        return as_list(self.module.pi)

    def adaptor_weights(self, n: float) -> list[float]:
        return [float(n)] * self.num_adaptors  # per-component n_k-weighted mean (FedEM's rule)

    @torch.no_grad()
    def e_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, device: Any = "cpu") -> torch.Tensor:
        """q (n, M) from the current pi; updates pi <- mean q. Returns q."""
        losses = self.model_losses(x, y, loss_fn, device)  # (n, M)
        logq = torch.log(self.module.pi.clamp_min(PI_FLOOR)).unsqueeze(0) - losses
        q = torch.softmax(logq, dim=1)
        pi = q.mean(0).clamp_min(PI_FLOOR)
        self.module.pi.copy_(pi / pi.sum())
        return q

    def train_round(self, x, y, loss_fn, *, epochs, batch_size, lr, mixture_lr=0.0, momentum=0.0,  # type: ignore[override]
                    weight_decay=0.0, grad_clip=0.0, proximal_mu=0.0, generator_seed=0, device="cpu",
                    augment=None):
        q = self.e_step(x, y, loss_fn, device).to(device)
        models = self.module.models
        params = self.model_params()
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        anchors = [(p, p.detach().clone()) for p in params] if proximal_mu > 0 else None
        self.module.train()
        gen = torch.Generator().manual_seed(generator_seed)
        n = int(y.shape[0])
        tracker = LossTracker()
        for idx, xb, yb in minibatches(x, y, epochs=epochs, batch_size=batch_size, generator=gen,
                                       augment=augment, device=device):
            qb = q[idx.to(q.device)]
            opt.zero_grad(set_to_none=True)
            losses = torch.stack([per_sample_loss(m(xb), yb, loss_fn) for m in models], 1)  # (B, M)
            loss = (qb * losses).sum() / yb.shape[0]
            obj = loss
            if anchors is not None:
                obj = obj + proximal_term(anchors, proximal_mu)
            obj.backward()
            step_with_clip(opt, grad_clip)
            tracker.add(loss, int(yb.shape[0]))
        return tracker.result(n)

    def adapt(self, x, y, loss_fn, cfg, device="cpu", steps=None) -> int:  # type: ignore[override]
        steps = cfg.adapt_steps if steps is None else steps
        for _ in range(steps):
            self.e_step(x, y, loss_fn, device)
        return steps


register(MethodSpec(
    "fedem",
    "FedEM (Marfoq et al., NeurIPS 2021, arXiv 2108.10252): mixture of M components "
    "with private EM mixture weights",
    uses_adaptors=False,
    build=FedEMHandle.build,
    federated="the M components (per-component FedEM weights)",
    private="the EM mixture weights pi_k (never in a reply unless report-mixtures)",
))
