"""What the ClientApp does for each message: train, evaluate, query.

The heavy objects (task data, the model) are built once per process and cached by config
(:mod:`floral_flwr.client.setup`). Private state (the mixture, local adaptors) is restored from
``context.state`` and, when a state directory is configured, from disk (see
:mod:`floral_flwr.client.state_store`). It never goes into a reply: a plaintext train reply
('mean', 'sum-only') carries the shared state and the weights n_k p_k; under 'secagg' the train
work runs through :mod:`floral_flwr.client.secure` and only a masked vector leaves; evaluation
replies carry metrics, and the mixture p_k only with run config ``report-mixtures``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from floral_flwr.client.setup import (  # noqa: F401 - SETUP_STATS, _SETUPS, engine_cpus: re-exported
    _SETUPS,
    SETUP_STATS,
    ClientSetup,
    apply_performance_options,
    client_identity,
    engine_cpus,
    get_setup,
)
from floral_flwr.client.state_store import DEFAULT_RUN_KEY, StateDir, accept_suggested_dir, node_state_root
from floral_flwr.fileio import save_npz
from floral_flwr.strategy.aggregate import scale_for_sum
from floral_flwr.strategy.eval_fold import EVAL_RECORD, EVAL_ROUND_KEY
from floral_flwr.methods.training import evaluate_local, seed_for, seed_torch
from floral_flwr.config import RunConfig
from floral_flwr.holdout import holdout_clients
from floral_flwr.methods import METHOD_SPECS, ModelHandle
from floral_flwr.tasks.validation_split import validation_split
from floral_flwr.wire import from_array, to_array

logger = logging.getLogger("floral_flwr")

STATE_KEY = "floral.private"
STATE_META_KEY = "floral.private.meta"
EVAL_KEY = "floral.eval"  # the last evaluation's assigned adaptor (never sent in plaintext under secagg)


# ----------------------------------------------------------------------------- private state


def _state_dir(context: Context, cfg: RunConfig, client_id: int, config: ConfigRecord) -> str | None:
    """Where this client's private state lives on disk, or None (memory only).

    The node's own ``state-dir`` (deployment) wins, namespaced by app and run
    (``<state-dir>/floral-flwr/<run>/client-<id>``); otherwise, with ``persist-client-state``,
    the directory the server suggests for simulation, only if it is a run directory on this
    machine (see :func:`floral_flwr.client.state_store.accept_suggested_dir`).
    """
    root = context.node_config.get("state-dir")
    if root:
        return str(node_state_root(str(root), str(config.get("run-key", DEFAULT_RUN_KEY)), client_id))
    suggested = config.get("client-state-dir")
    if cfg.persist_client_state and suggested:
        accepted = accept_suggested_dir(str(suggested))
        if accepted is not None:
            return os.path.join(str(accepted), f"client-{client_id}")
        if str(suggested) not in _IGNORED_DIRS:
            _IGNORED_DIRS.add(str(suggested))
            logger.warning("ignoring the server's client-state-dir %r: not a run directory on this node; "
                           "private state is kept in memory (set the node config 'state-dir' to keep it "
                           "across restarts)", str(suggested))
    return None


_IGNORED_DIRS: set[str] = set()


def open_store(context: Context, setup: ClientSetup, client_id: int, config: ConfigRecord) -> StateDir | None:
    """This client's on-disk private-state store, or None (memory only).

    Writes are always atomic (a killed process never leaves a torn file). They are also
    fsynced (durable across power loss) only for a node's own ``state-dir``: in simulation the
    state lives in the run directory and an fsync per client per round costs ~10 ms for nothing.
    """
    root = _state_dir(context, setup.cfg, client_id, config)
    if root is None:
        return None
    return StateDir(root, setup.handle.kind(), durable=bool(context.node_config.get("state-dir")))


def restore_private(setup: ClientSetup, context: Context, store: StateDir | None, server_round: int) -> None:
    """Load the newest private state saved before ``server_round`` (memory, then disk)."""
    handle = setup.handle
    handle.reset_private()
    if METHOD_SPECS[setup.cfg.method].needs_clusters:  # floral-oracle, ensemble-oracle
        cluster = setup.task.cluster_of(client_identity(context)[0])
        handle.set_oracle(int(cluster))
        return
    best: tuple[int, dict[str, torch.Tensor]] | None = None
    if STATE_KEY in context.state.array_records:
        rnd = int(context.state.config_records[STATE_META_KEY]["round"])
        if rnd < server_round:
            best = (rnd, _record_tensors(context.state.array_records[STATE_KEY]))
    if store is not None:
        # only a file newer than the copy in context.state is read (and checksummed): in a
        # running federation that copy is the newest and the disk copy is for restarts
        on_disk = store.load(before_round=server_round, after_round=best[0] if best else None)
        if on_disk is not None:
            best = (on_disk.round, on_disk.tensors)
            if STATE_KEY not in context.state.array_records:
                # a restarted SuperNode or a new run: Flower's context.state is empty
                print(f"[floral] private state of round {on_disk.round} restored from {store.root}",
                      file=sys.stderr, flush=True)
    if best is None:
        return
    try:
        handle.load_private_state_dict({k: v.to(setup.device) for k, v in best[1].items()})
    except (ValueError, RuntimeError) as exc:
        logger.warning("stored private state does not fit this model (%s): starting fresh", exc)
        handle.reset_private()


def save_private(setup: ClientSetup, context: Context, store: StateDir | None, server_round: int) -> None:
    state = setup.handle.private_state_dict()
    if not state:
        return
    context.state[STATE_KEY] = ArrayRecord({k: to_array(v.detach().cpu().numpy()) for k, v in state.items()})
    context.state[STATE_META_KEY] = ConfigRecord({"round": int(server_round)})
    if store is not None:
        try:
            store.save(state, server_round)
        except OSError as exc:
            logger.warning("could not write private state to %s (%s): kept in memory only", store.root, exc)


# ----------------------------------------------------------------------------- messages


def _record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """CPU tensors (own, writable copies) of a record's arrays, through the project's codec."""
    return {k: torch.from_numpy(np.array(from_array(a))) for k, a in record.items()}


def _load_shared(setup: ClientSetup, msg: Message) -> None:
    _load_shared_record(setup, msg.content["arrays"])


def _load_shared_record(setup: ClientSetup, record: ArrayRecord) -> None:
    state = {k: t.to(setup.device) for k, t in _record_tensors(record).items()}
    setup.handle.load_shared_state_dict(state)


def _shared_record(handle: ModelHandle) -> ArrayRecord:
    out = {}
    for k, v in handle.shared_state_dict().items():
        t = v.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()  # bf16/fp16 cannot go through numpy; the wire format is float32
        out[k] = to_array(t.numpy())
    return ArrayRecord(out)


def _mixture_weights(handle: ModelHandle, n: int) -> list[float]:
    return handle.adaptor_weights(n)  # n * p by default; per-method rule otherwise (baselines)


def is_holdout(context: Context, cfg: RunConfig, task: Any = None) -> bool:
    """This client never trains (run config ``holdout-clients``; stratified by the task's true
    clusters when it has them, see :func:`floral_flwr.holdout.holdout_clients`)."""
    if cfg.holdout_clients <= 0:
        return False
    cid, num = client_identity(context)
    clusters = None
    if task is not None and getattr(task, "num_clusters", None):
        clusters = [task.cluster_of(i) for i in range(num)]
    return cid in holdout_clients(num, cfg.holdout_clients, cfg.seed, clusters)


def _augment_for(task: Any, cid: int) -> Any:
    """The task's training augmentation, told the client's cluster (flips on rotated images
    must be applied as on the upright image)."""
    fn = getattr(task, "augment", None)
    if fn is None:
        return None
    cluster = task.cluster_of(cid)
    return lambda x, gen: fn(x, gen, cluster=cluster)


def client_data(setup: ClientSetup, cid: int) -> Any:
    """This client's data; with ``validation-fraction`` > 0 the train split minus the held-out
    rows, and the held-out rows in place of the test split (a tuning run never reads test)."""
    data = setup.task.client_data(cid)
    cfg = setup.cfg
    if cfg.validation_fraction <= 0:
        return data
    return validation_split(data, cfg.validation_fraction, cfg.seed, cid)


@dataclass
class LocalRound:
    """What one local training round produced (before it is packed into a reply)."""

    setup: ClientSetup
    client_id: int
    server_round: int
    num_examples: int
    loss: float
    metrics: dict[str, Any]  # num-examples, train-loss, client-id, the method's extra metrics
    adaptor_weights: list[float] | None  # w_k(c), None without adaptors
    arrays: ArrayRecord  # the trained shared state


def train_once(context: Context, config: ConfigRecord, shared: ArrayRecord,
               run_config: Mapping[str, Any] | None = None, setup: ClientSetup | None = None) -> LocalRound:
    """Load the global state and this client's private state, train one round, save the private
    state. Used by the plaintext reply (:func:`handle_train`) and the secure one
    (:mod:`floral_flwr.client.secure`). ``setup``: the caller's, when it already looked it up."""
    setup = setup or get_setup(context, run_config)
    cfg = setup.cfg
    cid, _ = client_identity(context)
    rnd = int(config["server-round"])
    store = open_store(context, setup, cid, config)
    _load_shared_record(setup, shared)
    restore_private(setup, context, store, rnd)
    data = client_data(setup, cid)
    seed_torch(seed_for(cfg.seed, rnd, cid))  # mixture noise, dropout
    result = setup.handle.train_round(
        data.train_x,
        data.train_y,
        setup.task.loss_fn,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        mixture_lr=0.0 if METHOD_SPECS[cfg.method].needs_clusters else cfg.mixture_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        generator_seed=seed_for(cfg.seed, rnd, cid) + 1,
        device=setup.device,
        augment=_augment_for(setup.task, cid),
    )
    save_private(setup, context, store, rnd)
    metrics: dict[str, Any] = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "client-id": cid,
        **setup.handle.train_metrics(),
    }
    weights = _mixture_weights(setup.handle, result.num_examples) if setup.handle.num_adaptors else None
    return LocalRound(setup, cid, rnd, result.num_examples, result.loss, metrics, weights,
                      _shared_record(setup.handle))


def handle_train(msg: Message, context: Context, run_config: Mapping[str, Any] | None = None) -> Message:
    """A plaintext train reply ('mean' / 'sum-only'): the trained shared state and, with
    adaptors, the weights w_k(c) = n_k p_k(c) in the metrics."""
    setup = get_setup(context, run_config)
    cfg = setup.cfg
    if cfg.aggregation == "secagg":
        # the client, not only the server, holds the line: no plaintext update under secagg
        raise PermissionError(
            "run config 'aggregation' = 'secagg': this client sends its update only through "
            "secure aggregation, but got a plaintext train request (allowed for plaintext replies: "
            "aggregation 'mean' or 'sum-only')"
        )
    config = msg.content["config"]
    # the previous round's evaluation, folded into this message (floral_flwr.strategy.eval_fold):
    # done first, from the same shared and private state; training below reloads both
    evaluated = (evaluate_personalized(setup, context, msg, int(config[EVAL_ROUND_KEY]))
                 if EVAL_ROUND_KEY in config else None)
    local = train_once(context, config, msg.content["arrays"], run_config, setup)
    metrics = local.metrics
    if local.adaptor_weights is not None:
        metrics["adaptor-weights"] = local.adaptor_weights
    arrays = local.arrays
    if cfg.aggregation == "sum-only":  # send n_k*base_k and w_k(c)*adaptor_c^k: the server only sums
        scaled = scale_for_sum({k: from_array(a) for k, a in arrays.items()}, local.num_examples,
                               local.adaptor_weights)
        arrays = ArrayRecord({k: to_array(v) for k, v in scaled.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if evaluated is not None:
        content[EVAL_RECORD] = MetricRecord(evaluated)
    fault = context.node_config.get("fault")
    if fault:  # TEST ONLY: deliberate bad replies for the fault tests (floral_flwr/client/faults.py)
        from floral_flwr.client.faults import inject_fault

        content = inject_fault(str(fault), content, local.server_round)
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, run_config: Mapping[str, Any] | None = None) -> Message:
    setup = get_setup(context, run_config)
    config = msg.content["config"]
    metrics = evaluate_personalized(setup, context, msg, int(config["server-round"]))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate_personalized(setup: ClientSetup, context: Context, msg: Message, rnd: int) -> dict[str, Any]:
    """This client's personalized metrics after round ``rnd``: the message's shared state with
    the private state saved in round ``rnd`` (an evaluate message, or a train message of round
    ``rnd + 1`` that evaluates first, see :mod:`floral_flwr.strategy.eval_fold`)."""
    cfg = setup.cfg
    cid, _ = client_identity(context)
    config = msg.content["config"]
    store = open_store(context, setup, cid, config)
    _load_shared(setup, msg)
    # evaluation after round r uses the state saved in round r
    restore_private(setup, context, store, rnd + 1)
    data = client_data(setup, cid)
    task, handle = setup.task, setup.handle
    extra: dict[str, Any] = {}
    seed_torch(seed_for(cfg.seed, rnd, cid) + 2)
    if is_holdout(context, cfg, setup.task):
        # never trained: zero-shot (personal part at its init), then fit only what is personal
        handle.reset_private()
        if METHOD_SPECS[cfg.method].needs_clusters:
            handle.set_oracle(int(task.cluster_of(cid)))
        handle.prepare_zero_shot(data.train_x, data.train_y, task.loss_fn, cfg, setup.device)
        zs_loss, zs_value, _ = evaluate_local(handle, data.test_x, data.test_y, task.loss_fn, task.metric,
                                              device=setup.device)
        steps = handle.adapt(data.train_x, data.train_y, task.loss_fn, cfg, setup.device)
        extra = {"holdout": 1, f"zero-shot-{task.metric}": zs_value, "zero-shot-loss": zs_loss,
                 "adapt-steps": int(steps)}
    else:
        handle.prepare_eval(data.train_x, data.train_y, task.loss_fn, cfg, setup.device)
    loss, value, n = evaluate_local(
        setup.handle, data.test_x, data.test_y, setup.task.loss_fn, setup.task.metric, device=setup.device
    )
    cluster = setup.task.cluster_of(cid)
    metrics: dict[str, Any] = {
        "num-examples": n,
        "loss": loss,
        setup.task.metric: value,
        "client-id": cid,
        "true-cluster": -1 if cluster is None else int(cluster),
    }
    metrics.update(extra)
    mix = setup.handle.mixture()
    if mix and setup.handle.num_adaptors:
        assigned = int(np.argmax(np.asarray(mix).reshape(-1, setup.handle.num_adaptors).mean(0)))
        # kept for the secure contingency table of this round (floral_flwr.client.secure)
        context.state[EVAL_KEY] = ConfigRecord({"round": rnd, "assigned": assigned,
                                                "true-cluster": metrics["true-cluster"]})
        if cfg.report_mixtures:  # opt-in (refused in deployment without the acknowledgement)
            metrics["mixture"] = mix
        elif cfg.aggregation != "secagg":  # 'mean' reveals n_k p_k anyway: the argmax in plaintext
            metrics["assigned-adaptor"] = assigned
    return metrics


def export_personalized(setup: ClientSetup, context: Context, msg: Message, cid: int) -> str | None:
    """Save this client's personalized model (``ModelHandle.personalized_module``: for FLoRAL the
    plain base architecture with the mixture folded in) on the client's side: its state dir,
    else the run's client-state dir. Returns the path.

    The model stays where it was made: only the path goes back to the server.
    """
    config = msg.content["config"]
    rnd = int(config.get("server-round", 1 << 30))
    store = open_store(context, setup, cid, config)
    if store is None:
        return None
    root = str(store.root)
    _load_shared(setup, msg)
    restore_private(setup, context, store, rnd + 1)
    model = setup.handle.personalized_module()
    arrays = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
              for k, v in model.state_dict().items()}
    path = os.path.join(root, "personalized-model.npz")
    save_npz(path, arrays)
    return path


def handle_query(msg: Message, context: Context, run_config: Mapping[str, Any] | None = None) -> Message:
    """Discovery: the server learns this node's client id and train-set size. With
    ``config["export"]`` (and the global arrays), the client exports its personalized model."""
    setup = get_setup(context, run_config)
    cid, _ = client_identity(context)
    if "config" in msg.content.config_records and msg.content["config"].get("export"):
        path = export_personalized(setup, context, msg, cid)
        return Message(RecordDict({"metrics": MetricRecord({"client-id": cid, "exported": int(path is not None)})}),
                       reply_to=msg)
    data = client_data(setup, cid)
    cluster = setup.task.cluster_of(cid)
    metrics = {
        "client-id": cid,
        "num-partitions": client_identity(context)[1],
        "num-train-examples": data.num_train,
        "true-cluster": -1 if cluster is None else int(cluster),
        "holdout": int(is_holdout(context, setup.cfg, setup.task)),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
