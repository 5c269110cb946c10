"""What the ServerApp checks about the federation it runs on, before round 1.

Simulation or deployment (a simulated federation is set up by whoever runs the server, so it may
see per-client mixtures on request; a deployment needs the operator's acknowledgement), and
whether a simulated federation has enough SuperNodes for the task's clusters.
"""

from __future__ import annotations

import time

from flwr.serverapp import Grid

from floral_flwr.config import ConfigError, RunConfig
from floral_flwr.preflight import min_clients, too_few_clients
from floral_flwr.strategy.nodes import sample_size
from floral_flwr.strategy.secagg import SecAggSettings, protocol_sizes


def is_simulation(grid: Grid) -> bool:
    """True for the grid of Flower's simulation engine (``flwr run`` on a simulation SuperLink)."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - other flwr layouts
        return type(grid).__name__ == "InMemoryGrid"
    return isinstance(grid, InMemoryGrid)


def _settled_node_count(grid: Grid, timeout: float) -> int:
    """The number of simulated nodes once registration has settled. The simulation engine
    registers all its nodes in one go, just after it starts the ServerApp's thread."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        n = len(list(grid.get_node_ids()))
        if (n > 0 and n == last) or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.25)


def check_simulated_federation(grid: Grid, cfg: RunConfig, task_clusters: int | None) -> int | None:
    """In simulation every SuperNode is one client: stop before round 1 when there are fewer
    than the task's clusters (Flower's default federation has 2 SuperNodes). Returns the
    settled node count (None outside Flower's simulation engine)."""
    if not is_simulation(grid):
        return None  # deployment: nodes come and go; each node's num-partitions sizes its task
    need = min_clients(task_clusters)
    have = _settled_node_count(grid, min(cfg.node_wait_timeout, 30.0))
    if have < need:
        raise ConfigError(too_few_clients(
            cfg.task, need, f"this federation has {have} simulated SuperNode{'s' * (have != 1)}"))
    return have


def is_simulated(grid: Grid) -> bool:
    """The simulation engine's grid or the in-process one: every node runs on this machine, set
    up by whoever runs the server. Anything else (a SuperLink's HttpGrid) is a deployment."""
    return is_simulation(grid) or bool(getattr(grid, "simulated", False))


def check_mixture_reporting(cfg: RunConfig, grid: Grid) -> None:
    """``report-mixtures`` sends every client's p_k to the server: in a deployment only with the
    operator's explicit acknowledgement."""
    if cfg.report_mixtures and not cfg.report_mixtures_acknowledged and not is_simulated(grid):
        raise ConfigError(
            "run config 'report-mixtures' = true sends every client's mixture p_k to the server in "
            "plaintext; in a deployment it needs 'report-mixtures-acknowledged' = true as well "
            "(allowed: report-mixtures = false, or both true)"
        )


def check_secure_sample(grid: Grid, cfg: RunConfig, settled: int | None = None) -> None:
    """Under secagg, a simulated federation whose round sample is too small for the protocol
    (or for ``secagg-num-shares``) stops here, before the run directory exists. A deployment's
    nodes are only known in round 1, where the same check runs (``secure_rounds``).
    ``settled``: the node count :func:`check_simulated_federation` already waited for."""
    if cfg.aggregation != "secagg":
        return
    if is_simulation(grid):
        nodes = settled if settled is not None else _settled_node_count(grid, min(cfg.node_wait_timeout, 30.0))
    elif getattr(grid, "simulated", False):
        nodes = len(list(grid.get_node_ids()))
    else:
        return
    minimum = 1  # build_strategy's min_train_nodes
    protocol_sizes(sample_size(nodes, cfg.fraction_train, minimum), SecAggSettings.from_config(cfg))
