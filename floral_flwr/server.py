"""The ServerApp's main: run config -> task -> method -> strategy -> results.

Everything that can be wrong with the configuration (bad keys or values, an unknown task, a
method that needs clusters the task lacks, a simulated federation with fewer SuperNodes than
the task has clusters, an unwritable output directory, ``resume=true`` with no checkpoint, secure
aggregation on an untested Flower or with too few clients, per-client mixtures requested in a
deployment without the acknowledgement) is detected here, before round 1 and (all but the
client count of secure aggregation, known in round 1) before the run directory is created, and
reported as one :class:`ConfigError` line. In simulation (``flwr run``) the ServerApp then
prints that line and returns instead of raising, so that it is the last thing a
``flwr run --stream`` user reads (Flower would print a traceback and an exit-code banner after
it); ``launch`` recognises the line (:data:`STOPPED`) and exits non-zero. In deployment the
error is raised as before, so the run's status is ``failed``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from floral_flwr.config import METHODS, ConfigError, RunConfig, parse_run_config, resolve_output_dir
from floral_flwr.federation import (  # noqa: F401 - is_simulation, check_simulated_federation: re-exported
    check_mixture_reporting,
    check_secure_sample,
    check_simulated_federation,
    is_simulation,
)
from floral_flwr.methods import build_handle, check_method_task
from floral_flwr.provenance import provenance, provenance_line
from floral_flwr.results import RunRecorder
from floral_flwr.rundir import (Checkpoints, CheckpointWriteError, NonFiniteState, RunFailed, claim_run_dir,
                               finished_summary)
from floral_flwr.strategy.bounds import ExampleCaps
from floral_flwr.strategy.exchange import exchange
from floral_flwr.strategy.floral_strategy import FloralStrategy
from floral_flwr.strategy.masked_sum import check_flower_version
from floral_flwr.strategy.nodes import ClientSetupError
from floral_flwr.strategy.optimizers import build_strategy
from floral_flwr.strategy.secagg import SecAggSettings
from floral_flwr.strategy.secure_rounds import SecureOptions
from floral_flwr.wire import to_array

logger = logging.getLogger("floral_flwr")

# what the ServerApp prints, after "[<method>] ", when it stops before training (launch greps it)
STOPPED = "stopped before round 1: "
# per-round INFO lines of the strategy that the one progress line per round already says
_ROUND_CHATTER = ("configure_train:", "aggregate_train:", "configure_evaluate:", "aggregate_evaluate:",
                  # Flower's SecAgg+ workflow (aggregation='secagg'), four lines per exchange
                  "configure_fit:", "aggregate_fit:", "Secure aggregation commencing",
                  "Secure aggregation completed")


class _DropRoundChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith(_ROUND_CHATTER))


def _after_engine_start(timeout: float = 15.0, no_ray_after: float = 3.0) -> None:
    """Wait (bounded) until the simulation engine has started Ray, so that a message printed
    next is not followed by Ray's start-up warnings: the user reads it last."""
    start = time.monotonic()
    while (waited := time.monotonic() - start) < timeout:
        ray = sys.modules.get("ray")
        if ray is None and waited > no_ray_after:
            return  # this engine does not use Ray
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            time.sleep(0.5)  # its warnings are printed as it finishes starting
            return
        time.sleep(0.2)


def _fab_hash(grid: Grid) -> str | None:
    try:
        return str(grid.run.fab_hash) or None
    except Exception:  # in-process grids have no Run
        return None


def _run_dir(cfg: RunConfig) -> Path:
    root = Path(resolve_output_dir(cfg))
    prefix = f"{cfg.task}-{cfg.method}-seed{cfg.seed}"
    if cfg.run_name:
        return root / cfg.run_name
    if cfg.resume:
        # no run-name: resume the newest run of this task/method/seed that has a checkpoint
        candidates = sorted(
            (p for p in root.glob(prefix + "-*") if Checkpoints(p / "checkpoint").exists()),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise ConfigError(
                f"run config 'resume' = true but no checkpoint of a '{prefix}-*' run exists under "
                f"'{root}': set 'run-name' to the run to resume, or resume=false"
            )
        return candidates[-1]
    return root / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run(cfg: RunConfig, grid: Grid | None = None) -> tuple[Any, Any, RunRecorder]:
    """Validate everything that can be validated before round 1; create the run directory
    only once all of it passed (a failed start leaves nothing behind)."""
    from floral_flwr.tasks import task_info

    try:
        task = task_info(cfg.task, seed=cfg.seed)  # no client data on the server
        check_method_task(cfg, task.num_clusters)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.aggregation == "secagg":
        check_flower_version()
    if grid is not None:
        settled = check_simulated_federation(grid, cfg, task.num_clusters)
        check_secure_sample(grid, cfg, settled)  # the settled count is waited for once
    handle = build_handle(cfg, task.build_model)
    run_dir = _run_dir(cfg)
    if cfg.resume and not Checkpoints(run_dir / "checkpoint").exists():
        raise ConfigError(
            f"run config 'resume' = true but '{run_dir}' has no checkpoint: run without resume "
            f"first, or point 'run-name' at an interrupted run"
        )
    prov = provenance(cfg.device, _fab_hash(grid) if grid is not None else None)
    claimed = None
    try:
        # refuses an existing run without resume, locks it, stores/checks the resolved config
        claimed = claim_run_dir(run_dir, cfg.to_dict(), cfg.resume, auto_named=not cfg.run_name,
                                label=cfg.method)
        run_dir = claimed.path
        recorder = RunRecorder(run_dir, task.metric, cfg.num_server_rounds, label=cfg.method,
                               eval_every=cfg.eval_every)
        recorder.run_lock = claimed  # released when run_server returns
        # resume of a finished run: nothing is written, its summary is kept
        recorder.finished = finished_summary(run_dir, cfg.num_server_rounds) if cfg.resume else None
        if recorder.finished is None:
            recorder.prepare(cfg.to_dict(), resume=cfg.resume, provenance=prov)
    except OSError as exc:
        if claimed is not None:
            claimed.release()
        raise ConfigError(
            f"run config 'output-dir' = {cfg.output_dir!r}: cannot write the run directory "
            f"'{run_dir}' ({exc.strerror or exc}); choose a writable directory"
        ) from exc
    return task, handle, recorder


def example_caps(cfg: RunConfig) -> ExampleCaps:
    """The server's bounds on reply weights: ``max-examples`` and, for tasks the server can split
    itself, every client's partition size (docs/security.md)."""
    from floral_flwr.tasks import partition_sizes

    return ExampleCaps(cfg.max_examples, lambda n: partition_sizes(cfg.task, n, cfg.seed))


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
    print(f"[{cfg.method}] {done} client(s) exported their personalized model (kept on the client side)", flush=True)
    return done


def load_state_for_export(recorder: RunRecorder) -> ArrayRecord:
    return ArrayRecord({k: to_array(v) for k, v in recorder.latest_state().items()})


def run_server(grid: Grid, run_config: Mapping[str, Any],
               round_hook: Callable[[int, FloralStrategy], None] | None = None) -> dict[str, Any]:
    """Run the whole federation; returns the summary that is also written to summary.json.
    ``round_hook(round, strategy)`` runs after each round's checkpoint (benchmarks read
    ``strategy.stats`` there)."""
    chatter = _DropRoundChatter()
    logging.getLogger("flwr").addFilter(chatter)
    try:
        return _run_server(grid, run_config, round_hook)
    finally:
        logging.getLogger("flwr").removeFilter(chatter)


def _run_server(grid: Grid, run_config: Mapping[str, Any],
                round_hook: Callable[[int, FloralStrategy], None] | None) -> dict[str, Any]:
    cfg = parse_run_config(run_config)
    check_mixture_reporting(cfg, grid)
    task, handle, recorder = prepare_run(cfg, grid)
    try:
        if recorder.finished is not None:
            recorder.say(f"{recorder.run_dir} already finished its {cfg.num_server_rounds} rounds: "
                         f"nothing to do (summary.json kept)")
            return recorder.finished
        return _run_prepared(grid, cfg, task, handle, recorder, round_hook)
    except (RunFailed, NonFiniteState, CheckpointWriteError) as exc:
        log(logging.ERROR, "[%s] run stopped: %s", cfg.method, exc)
        raise
    finally:
        recorder.run_lock.release()


def _run_prepared(grid: Grid, cfg: RunConfig, task: Any, handle: Any, recorder: RunRecorder,
                  round_hook: Callable[[int, FloralStrategy], None] | None) -> dict[str, Any]:
    run_dir = recorder.run_dir
    recorder.say(provenance_line(recorder.provenance))
    recorder.say(f"{cfg.task} | {cfg.method} | seed {cfg.seed} | {cfg.num_server_rounds} rounds | "
                 f"run directory: {run_dir}")
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
    strategy.fold_evaluation = cfg.fold_evaluation  # plaintext aggregation only (FloralStrategy.folds_evaluation)
    strategy.set_robustness(cfg.robust, cfg.clip_norm, cfg.trim_fraction, caps=example_caps(cfg))
    if cfg.aggregation == "secagg":
        strategy.secure = SecureOptions(SecAggSettings.from_config(cfg), num_clusters=int(task.num_clusters or 0),
                                        has_mixture=handle.mixture() is not None)
    start_round = 1
    arrays = initial
    if cfg.resume:
        done, arrays, opt_state, meta = recorder.load_checkpoint()
        recorder.final = dict(meta.get("final") or {})
        if set(arrays) != set(initial) or any(arrays[k].shape != initial[k].shape for k in initial):
            raise ConfigError(
                f"run config 'resume' = true but the checkpoint in '{run_dir}' does not match this "
                f"task/method/model: keys or shapes differ"
            )
        strategy.load_optimizer_state(opt_state)
        start_round = done + 1
        recorder.truncate_after(done)
        recorder.start_round = start_round
        recorder.say(f"resuming after round {done}")
    report = getattr(getattr(handle, "floral", None), "parameter_report", None)
    if report is not None:
        recorder.parameter_report = report().as_dict()
    else:
        n = int(sum(v.size for v in initial.values()))
        recorder.parameter_report = {"base": n, "adaptors": 0, "mixture": 0,
                                     "bytes_up": 4 * n, "bytes_down": 4 * n}

    train_config = ConfigRecord({"run-key": run_dir.name})  # namespaces a node's state-dir by run
    if cfg.persist_client_state:
        train_config["client-state-dir"] = str(run_dir / "client-state")
    eval_config = ConfigRecord(dict(train_config))
    rounds_log: list[dict[str, Any]] = []

    def on_round_end(rnd: int, new_arrays: ArrayRecord, strat: FloralStrategy) -> None:
        try:  # rows first: a round whose checkpoint is missing is redone and its rows replaced
            rounds_log.append(recorder.record_round(strat.stats, num_adaptors))
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not write the results of round {rnd} in '{run_dir}' ({exc.strerror or exc}); the "
                f"checkpoint of round {rnd - 1} is intact: free space and resume with resume=true") from exc
        state = {k: a.numpy() for k, a in new_arrays.items()}
        # the latest evaluation summary rides along: a resume after the last round keeps it
        recorder.save_checkpoint(rnd, state, strat.optimizer_state(), {"seed": cfg.seed, "final": recorder.final})
        if round_hook is not None:
            round_hook(rnd, strat)

    if start_round > cfg.num_server_rounds:
        recorder.say(f"nothing to do: checkpoint is at round {start_round - 1}")
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
    recorder.write_plots(f"{cfg.task} / {cfg.method} / seed {cfg.seed}")
    recorder.print_summary(summary)
    return summary


def _label(run_config: Mapping[str, Any]) -> str:
    """The method name for log lines, even when the config did not parse."""
    method = dict(run_config).get("method", "floral")
    return method if method in METHODS else "floral-flwr"


def _setup_error_line(exc: ClientSetupError) -> str:
    """The client's own message out of a (Ray-wrapped) setup error, on one line."""
    text = str(exc)
    found = re.findall(r"Message: (.*?)(?:'>|$)", text, flags=re.S)
    msg = found[-1].strip() if found else text.strip().splitlines()[-1]
    return "every client failed to set up the task: " + " ".join(msg.split())


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` are merged over the run config (tests use this with
    ``run_simulation``, whose run config is empty)."""
    app = ServerApp()
    extra = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**dict(context.run_config), **extra}
        try:
            run_server(grid, run_config)
        except (ConfigError, ClientSetupError) as exc:
            line = str(exc) if isinstance(exc, ConfigError) else _setup_error_line(exc)
            if not is_simulation(grid):
                log(logging.ERROR, "[%s] %s%s", _label(run_config), STOPPED, line)
                raise  # deployment: the run's status says failed
            _after_engine_start()
            print(f"[{_label(run_config)}] {STOPPED}{line}", flush=True)

    return app
