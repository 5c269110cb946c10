"""The ServerApp's main: run config -> task -> method -> strategy -> results.

Everything that can be wrong with the configuration (bad keys or values, an unknown task, a
method that needs clusters the task lacks, an unwritable output directory, ``resume=true`` with
no checkpoint) is detected here, before round 1, and reported as one :class:`ConfigError` line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from floral_flwr.config import ConfigError, RunConfig, parse_run_config, resolve_output_dir
from floral_flwr.methods import build_handle, check_method_task
from floral_flwr.results import RunRecorder
from floral_flwr.strategy.exchange import exchange
from floral_flwr.strategy.floral_strategy import FloralStrategy
from floral_flwr.strategy.optimizers import build_strategy
from floral_flwr.wire import to_array

logger = logging.getLogger("floral_flwr")


def _run_dir(cfg: RunConfig) -> Path:
    root = Path(resolve_output_dir(cfg))
    prefix = f"{cfg.task}-{cfg.method}-seed{cfg.seed}"
    if cfg.run_name:
        return root / cfg.run_name
    if cfg.resume:
        # no run-name: resume the newest run of this task/method/seed that has a checkpoint
        candidates = sorted(
            (p for p in root.glob(prefix + "-*") if (p / "checkpoint" / "meta.json").exists()),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise ConfigError(
                f"run config 'resume' = true but no checkpoint of a '{prefix}-*' run exists under "
                f"'{root}': set 'run-name' to the run to resume, or resume=false"
            )
        return candidates[-1]
    return root / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run(cfg: RunConfig) -> tuple[Any, Any, RunRecorder]:
    """Validate everything that can be validated before round 1."""
    from floral_flwr.tasks import task_info

    try:
        task = task_info(cfg.task, seed=cfg.seed)  # no client data on the server
        check_method_task(cfg, task.num_clusters)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    handle = build_handle(cfg, task.build_model)
    run_dir = _run_dir(cfg)
    recorder = RunRecorder(run_dir, task.metric, cfg.num_server_rounds)
    try:
        recorder.prepare(cfg.to_dict(), resume=cfg.resume)
    except OSError as exc:
        raise ConfigError(
            f"run config 'output-dir' = {cfg.output_dir!r}: cannot write the run directory "
            f"'{run_dir}' ({exc.strerror or exc}); choose a writable directory"
        ) from exc
    if cfg.resume and not recorder.has_checkpoint():
        raise ConfigError(
            f"run config 'resume' = true but '{run_dir}' has no checkpoint: run without resume "
            f"first, or point 'run-name' at an interrupted run"
        )
    return task, handle, recorder


def export_models(grid: Grid, strategy: FloralStrategy, recorder: RunRecorder,
                  train_config: ConfigRecord, cfg: RunConfig) -> int:
    """Ask every client to save its personalized (merged) model on its own side."""
    from flwr.app import Message, MessageType, RecordDict

    state = load_state_for_export(recorder)
    config = ConfigRecord({**dict(train_config), "export": True, "server-round": cfg.num_server_rounds})
    msgs = [
        Message(RecordDict({"arrays": state, "config": config}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in grid.get_node_ids()
    ]
    done = 0
    for reply in exchange(grid, msgs, cfg.reply_timeout, cfg.reply_poll):
        if not reply.has_error() and int(reply.content["metrics"].get("exported", 0)):
            done += 1
        elif reply.has_error():
            log(logging.WARNING, "export on node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
    print(f"[floral] {done} client(s) exported their personalized model (kept on the client side)", flush=True)
    return done


def load_state_for_export(recorder: RunRecorder) -> ArrayRecord:
    return ArrayRecord({k: to_array(v) for k, v in recorder.latest_state().items()})


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run the whole federation; returns the summary that is also written to summary.json."""
    try:
        cfg = parse_run_config(run_config)
        task, handle, recorder = prepare_run(cfg)
    except ConfigError as exc:
        log(logging.ERROR, "[floral] configuration error: %s", exc)
        raise
    run_dir = recorder.run_dir
    print(f"[floral] run directory: {run_dir}", flush=True)
    num_adaptors = handle.num_adaptors
    initial = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
               for k, v in handle.shared_state_dict().items()}
    strategy = build_strategy(
        cfg.server_optimizer,
        num_adaptors=num_adaptors,
        metric=task.metric,
        seed=cfg.seed,
        eval_every=cfg.eval_every,
        num_rounds=cfg.num_server_rounds,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_available_nodes=cfg.min_available_nodes,
        node_wait_timeout=cfg.node_wait_timeout,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        proximal_mu=cfg.proximal_mu,
        client_lr=cfg.lr,
    )
    strategy.sum_only = cfg.aggregation == "sum-only"
    strategy.reply_poll = cfg.reply_poll
    start_round = 1
    arrays = initial
    if cfg.resume:
        done, arrays, opt_state, _ = recorder.load_checkpoint()
        if set(arrays) != set(initial) or any(arrays[k].shape != initial[k].shape for k in initial):
            raise ConfigError(
                f"run config 'resume' = true but the checkpoint in '{run_dir}' does not match this "
                f"task/method/model: keys or shapes differ"
            )
        strategy.load_optimizer_state(opt_state)
        start_round = done + 1
        recorder.truncate_after(done)
        recorder.start_round = start_round
        print(f"[floral] resuming after round {done}", flush=True)
    report = getattr(getattr(handle, "floral", None), "parameter_report", None)
    if report is not None:
        recorder.parameter_report = report().as_dict()
    else:
        n = int(sum(v.size for v in initial.values()))
        recorder.parameter_report = {"base": n, "adaptors": 0, "mixture": 0,
                                     "bytes_up": 4 * n, "bytes_down": 4 * n}

    train_config = ConfigRecord({})
    if cfg.persist_client_state:
        train_config["client-state-dir"] = str(run_dir / "client-state")
    eval_config = ConfigRecord(dict(train_config))
    rounds_log: list[dict[str, Any]] = []

    def on_round_end(rnd: int, new_arrays: ArrayRecord, strat: FloralStrategy) -> None:
        rounds_log.append(recorder.record_round(strat.stats, num_adaptors))
        state = {k: a.numpy() for k, a in new_arrays.items()}
        recorder.save_checkpoint(rnd, state, strat.optimizer_state(), {"seed": cfg.seed})

    if start_round > cfg.num_server_rounds:
        print(f"[floral] nothing to do: checkpoint is at round {start_round - 1}", flush=True)
    else:
        strategy.start(
            grid,
            ArrayRecord({k: to_array(np.asarray(v)) for k, v in arrays.items()}),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.reply_timeout,
            train_config=train_config,
            evaluate_config=eval_config,
            start_round=start_round,
            on_round_end=on_round_end,
        )
    exported = export_models(grid, strategy, recorder, train_config, cfg) if cfg.export_models else None
    per_round = [r for r in rounds_log]
    summary = recorder.write_summary(
        {
            "task": cfg.task,
            "method": cfg.method,
            "server-optimizer": cfg.server_optimizer,
            "seed": cfg.seed,
            "rounds": cfg.num_server_rounds,
            "num-adaptors": num_adaptors,
            "failures": strategy.total_failures,
            "rejected": strategy.total_rejected,
            "mean-round-s": float(np.mean([r["round-s"] for r in per_round])) if per_round else None,
            "bytes-up-per-round": float(np.mean([r["bytes-up"] for r in per_round])) if per_round else None,
            "bytes-down-per-round": float(np.mean([r["bytes-down"] for r in per_round])) if per_round else None,
            "run-dir": str(run_dir),
            "exported-models": exported,
        }
    )
    recorder.write_plots()
    final = summary.get("final", {})
    m = task.metric
    if final:
        ari = f", cluster ARI {final['cluster-ari']:.3f}" if "cluster-ari" in final else ""
        print(
            f"[floral] done: personalized {m} {final.get(f'{m}-mean', float('nan')):.4f} "
            f"(worst 10 % {final.get(f'{m}-worst10', float('nan')):.4f}){ari}; results in {run_dir}",
            flush=True,
        )
    return summary


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` are merged over the run config (tests use this with
    ``run_simulation``, whose run config is empty)."""
    app = ServerApp()
    extra = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**dict(context.run_config), **extra})

    return app
