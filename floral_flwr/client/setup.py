"""What a ClientApp process builds once and re-uses: the task, the method's model handle and
the device for a run config (:func:`get_setup`), and the run-config performance options applied
when it is built. A simulation's Ray actor or a SuperNode's ClientApp process keeps one setup;
every message then overwrites the model's whole state (shared from the message, private from the
store), so the cache never leaks one client's state into another's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from flwr.app import Context

from floral_flwr.config import RunConfig, parse_run_config
from floral_flwr.methods import ModelHandle, build_handle, check_method_task
from floral_flwr.tasks import get_task


@dataclass
class ClientSetup:
    cfg: RunConfig
    task: Any
    handle: ModelHandle
    device: torch.device


_SETUPS: dict[tuple, ClientSetup] = {}
SETUP_STATS = {"builds": 0, "hits": 0}  # per process: how often get_setup built vs re-used


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run config 'device' = 'cuda' but CUDA is not available on this node")
        return torch.device("cuda")
    return torch.device("cpu")


def client_identity(context: Context) -> tuple[int, int]:
    """(client id, number of clients) of this node, from its node config."""
    nc = context.node_config
    if "partition-id" in nc and "num-partitions" in nc:
        return int(nc["partition-id"]), int(nc["num-partitions"])
    raise ValueError(
        "node config lacks 'partition-id'/'num-partitions': start the SuperNode with "
        "--node-config \"partition-id=K num-partitions=N\""
    )


def get_setup(context: Context, run_config: Mapping[str, Any] | None = None) -> ClientSetup:
    """The (cached) task, model handle and device for this run config and node."""
    cfg = parse_run_config(context.run_config if run_config is None else run_config)
    _, num_clients = client_identity(context)
    data_dir = str(context.node_config.get("data-dir", "") or cfg.data_dir) or None
    data_path = str(context.node_config.get("data-path", "")) or None
    key = (tuple(sorted(cfg.to_dict().items())), num_clients, data_dir, data_path)
    setup = _SETUPS.get(key)
    if setup is None:
        task = get_task(cfg.task, num_clients=num_clients, seed=cfg.seed, data_dir=data_dir, data_path=data_path)
        check_method_task(cfg, task.num_clusters)
        device = _device(cfg)
        handle = build_handle(cfg, task.build_model)
        handle.bind_task(task)
        handle.module.to(device)
        handle._initial_private = handle.private_state_dict()
        apply_performance_options(cfg, handle, device)
        setup = ClientSetup(cfg, task, handle, device)
        _SETUPS.clear()  # one config per process at a time: bounded memory
        _SETUPS[key] = setup
        SETUP_STATS["builds"] += 1
    else:
        SETUP_STATS["hits"] += 1
    return setup


def engine_cpus() -> int | None:
    """CPUs the engine reserved for this ClientApp process: Ray's assignment in simulation,
    else ``OMP_NUM_THREADS`` when set; None when nothing says (then torch's default stays)."""
    ray = sys.modules.get("ray")  # imported in simulation actors; never imported just for this
    try:
        if ray is not None and ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(round(cpus)))
    except Exception:  # pragma: no cover - no ray, or not in a Ray worker
        pass
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def apply_performance_options(cfg: RunConfig, handle: ModelHandle, device: torch.device) -> None:
    """Run-config performance keys, applied once per process when the setup is built:
    ``num-threads`` (torch intra-op threads), ``mixed-precision`` (bf16 autocast on CUDA) and
    ``compile`` (``torch.compile`` of the training forward). The training loop reads
    ``handle.autocast_dtype`` and ``handle.train_forward``."""
    threads = cfg.num_threads or engine_cpus()
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    handle.autocast_dtype = torch.bfloat16 if (cfg.mixed_precision == "bf16" and device.type == "cuda") else None
    handle.train_forward = torch.compile(handle.module) if cfg.compile else None
