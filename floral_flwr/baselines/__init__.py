"""Baselines selectable with ``method=``, each a small module over the shared machinery.

Every baseline is a :class:`floral_flwr.methods.ModelHandle` subclass: the ClientApp, the
strategy (the p(k|c) accumulator), checkpoints, results and the private-state store (context.state
+ state-dir) are the same for all methods. A method that needs C full models represents them as
one shared state whose keys start with ``adaptor.model.`` and whose tensors have leading dimension
C (slice c = model c), so the FLoRAL accumulator aggregates model c with the per-slice weights
w_k(c) each client sends:

============== ===================================================== ==============================
method         definition (module)                                   aggregation (w_k(c))
============== ===================================================== ==============================
fedavg-ft      FedAvg, then every client fine-tunes a copy of the    n_k (FedAvg)
               global model for ``adapt-steps`` SGD steps on its
               train split before evaluation (:mod:`.fedavg_ft`)
ensemble       C full models mixed at the output, sum_c p_c f_c(x),  n_k p_k(c)  (p(k|c), as FLoRAL)
               learned private client mixture p (:mod:`.ensemble`)
ensemble-      the same with p fixed one-hot at the true cluster      n_k 1[c = cluster_k]
oracle         (oracle clustered FedAvg)
ifca           C full models; each round a client picks the model     n_k 1[c = argmin_j F_k(theta_j)]
               with the lowest train loss, trains only it and sends   (per-cluster n_k-weighted mean;
               its id (:mod:`.ifca`)                                  unchosen models unchanged)
fedem          M full components, private mixture pi_k fitted by one  n_k for every component
               EM step per round on the local train split; each       (per-component FedEM rule over
               component trained on its q-weighted loss (:mod:`.fedem`) the sampled replies)
ditto          global model (FedAvg) + private personal model with     n_k (FedAvg of the global model)
               prox lambda/2 ||v - w_t||^2 to the round-start global;
               evaluation uses the personal model (:mod:`.ditto`)
feddpa         base + global low-rank adaptor (federated) + local      n_k (FedAvg of base + global
               adaptor (private), instance-wise weighting of the two  adaptor)
               at inference (:mod:`.feddpa`)
============== ===================================================== ==============================
"""

from __future__ import annotations

from typing import Any, Callable

# name -> MethodSpec fields (methods.py turns these into MethodSpec; no import cycle)
BASELINE_SPECS: dict[str, dict[str, Any]] = {
    "fedavg-ft": dict(
        description="FedAvg + local fine-tuning before evaluation (McMahan et al. 2017; Wang et al. "
        "2019, arXiv 1910.10252; Yu et al. 2020, arXiv 2002.04758)",
        uses_adaptors=False,
    ),
    "ensemble": dict(
        description="C full models mixed at the output with a learned private mixture, aggregated "
        "with p(k|c) (the FLoRAL paper's 'Ensemble' baseline)",
        uses_adaptors=False,
    ),
    "ensemble-oracle": dict(
        description="Ensemble with the mixture fixed one-hot at the true cluster (oracle clustered "
        "FedAvg; the paper's 'Ensemble, optimal router')",
        uses_adaptors=False,
        needs_clusters=True,
    ),
    "ifca": dict(
        description="IFCA (Ghosh et al., NeurIPS 2020, arXiv 2006.04088): C models, each client "
        "trains the one with the lowest train loss; per-cluster mean",
        uses_adaptors=False,
    ),
    "fedem": dict(
        description="FedEM (Marfoq et al., NeurIPS 2021, arXiv 2108.10252): mixture of M components "
        "with private EM mixture weights",
        uses_adaptors=False,
    ),
    "ditto": dict(
        description="Ditto (Li et al., ICML 2021, arXiv 2012.04221): FedAvg global model + private "
        "personal model with a proximal term; evaluates the personal model",
        uses_adaptors=False,
    ),
    "feddpa": dict(
        description="FedDPA (Yang et al., NeurIPS 2024, arXiv 2403.19211): global + local low-rank "
        "adaptor, instance-wise dynamic weighting at inference",
        uses_adaptors=True,
    ),
}


def build_baseline_handle(cfg: Any, build_model: Callable[[], Any]) -> Any:
    """The baseline's ModelHandle, built deterministically from ``cfg.seed``."""
    import torch

    name = cfg.method
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if name == "fedavg-ft":
            from .fedavg_ft import FedAvgFTHandle

            return FedAvgFTHandle(build_model())
        if name in ("ensemble", "ensemble-oracle"):
            from .ensemble import EnsembleHandle

            return EnsembleHandle.build(cfg, build_model, oracle=name == "ensemble-oracle")
        if name == "ifca":
            from .ifca import IFCAHandle

            return IFCAHandle.build(cfg, build_model)
        if name == "fedem":
            from .fedem import FedEMHandle

            return FedEMHandle.build(cfg, build_model)
        if name == "ditto":
            from .ditto import DittoHandle

            return DittoHandle.build(cfg, build_model)
        if name == "feddpa":
            from .feddpa import FedDPAHandle

            return FedDPAHandle.build(cfg, build_model)
    raise ValueError(f"unknown baseline {name!r}: allowed {sorted(BASELINE_SPECS)}")
