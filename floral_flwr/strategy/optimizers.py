"""FloralStrategy composed with one of Flower's server optimizers, and the builder of a run's strategy.

Flower's server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx) all call
``super().aggregate_train(...)`` and then step on the pseudo-gradient, so they compose by
multiple inheritance: ``class X(FedAdam, FloralStrategy)`` runs FedAdam's server step on top of
the FLoRAL aggregate. :func:`strategy_class` builds that class, :func:`build_strategy` an
instance with the run config's options.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi

from floral_flwr.strategy.floral_strategy import FloralStrategy

_OPTIMIZERS: dict[str, type | None] = {
    "fedavg": None,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedprox": FedProx,
}


def strategy_class(server_optimizer: str, base: type[FloralStrategy] = FloralStrategy) -> type:
    """``base`` with Flower's ``server_optimizer`` mixed in front of it (cooperative MRO)."""
    if server_optimizer not in _OPTIMIZERS:
        raise ValueError(
            f"server-optimizer {server_optimizer!r} is unknown: allowed {sorted(_OPTIMIZERS)}"
        )
    opt = _OPTIMIZERS[server_optimizer]
    if opt is None:
        return base
    return type(f"{base.__name__}With{opt.__name__}", (opt, base), {})


def build_strategy(
    server_optimizer: str,
    *,
    num_adaptors: int,
    metric: str,
    seed: int,
    eval_every: int,
    num_rounds: int,
    fraction_train: float,
    fraction_evaluate: float,
    min_available_nodes: int,
    node_wait_timeout: float,
    server_lr: float = 1.0,
    server_momentum: float = 0.9,
    proximal_mu: float = 0.01,
    client_lr: float = 0.1,
    base: type[FloralStrategy] = FloralStrategy,
) -> FloralStrategy:
    """Build the FLoRAL strategy, composed with the chosen Flower server optimizer."""
    cls = strategy_class(server_optimizer, base)
    kwargs: dict[str, Any] = dict(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=min_available_nodes,
    )
    if server_optimizer == "fedavgm":
        kwargs.update(server_learning_rate=server_lr, server_momentum=server_momentum)
    elif server_optimizer in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs.update(eta=server_lr, eta_l=client_lr)
    elif server_optimizer == "fedprox":
        kwargs.update(proximal_mu=proximal_mu)
    strategy = cls(**kwargs)
    strategy.set_floral_options(
        num_adaptors=num_adaptors,
        metric=metric,
        seed=seed,
        eval_every=eval_every,
        num_rounds=num_rounds,
        node_wait_timeout=node_wait_timeout,
    )
    return strategy
