# size: every run-config key with its validation in one place (the single source the validator, the README and `list keys` read).
"""The run config: every key, its default, its type and what is allowed, validated once.

Flower hands the ServerApp and ClientApp a flat ``run_config`` dict (``[tool.flwr.app.config]``
in pyproject.toml plus ``--run-config`` overrides). Flower does not check types, so
``parse_run_config`` does, and it is the only place that does: both apps call it and then read
attributes of the returned :class:`RunConfig`. ``DEFAULTS`` below is the single source of truth
for the keys; a test checks that pyproject.toml declares exactly these keys with these defaults.

Keys whose default is ``"auto"`` take the task's preset (the paper's hyper-parameters for that
task, see ``floral_flwr.tasks``); any explicit value overrides the preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

# Names of the choices are kept here (not imported from the strategy/method modules) so that
# validating a config never imports torch or flwr.
METHODS = (
    "floral", "floral-oracle", "fedavg", "local-adaptor",
    # the baselines (each a peer module of floral_flwr/methods; tests check this list against its registry)
    "fedavg-ft", "ensemble", "ensemble-oracle", "ifca", "fedem", "ditto", "feddpa",
)
# (method, server-optimizer) pairs that cannot work together; checked before round 1.
INCOMPATIBLE: dict[tuple[str, str], str] = {
    (m, o): (
        "IFCA keeps an unchosen cluster model unchanged, but a stateful server optimizer "
        "(momentum / adaptive moments) keeps moving it with stale statistics; use "
        "server-optimizer 'fedavg' or 'fedprox'"
    )
    for m in ("ifca",)
    for o in ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
}
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox")
CONV_METHODS = ("balanced_2d", "balanced", "in", "out")
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISION = ("off", "bf16")
AGGREGATIONS = ("mean", "sum-only")
AUTO = "auto"

# key -> default. Order = order in README and pyproject.toml.
DEFAULTS: dict[str, Any] = {
    # what to run
    "task": "digits-label-shift",
    "method": "floral",
    "seed": 0,
    # rounds and sampling ("auto": the task's preset)
    "num-server-rounds": AUTO,
    "fraction-train": AUTO,
    "fraction-evaluate": 1.0,
    "eval-every": 10,
    "min-available-nodes": 2,
    "node-wait-timeout": 120.0,
    "reply-timeout": 600.0,
    # s between the server's pulls for replies (0 = Flower's send_and_receive, every 3 s, with
    # one wire object per array); see floral_flwr/strategy/exchange.py
    "reply-poll": 0.1,
    # local training
    "local-epochs": AUTO,
    "batch-size": AUTO,
    "lr": AUTO,
    "mixture-lr": AUTO,
    "momentum": 0.0,
    "weight-decay": 0.0,
    "device": "auto",
    "num-threads": 0,
    "mixed-precision": "off",
    "compile": False,
    # the FLoRAL parameterization
    "num-adaptors": AUTO,
    "rank": AUTO,
    "alpha": 1.0,
    "conv-method": "balanced_2d",
    "adaptive-bias": True,
    "adapt-norm": AUTO,
    "temperature": 1.0,
    "mixture-noise": 1.0,
    "prob-floor": 0.0,
    "entropy-penalty": 0.0,
    "per-layer-mixture": False,
    # server optimizer applied to the aggregate (fedavg = plain replacement)
    "server-optimizer": "fedavg",
    "server-lr": 1.0,
    "server-momentum": 0.9,
    "proximal-mu": 0.01,
    # "mean": clients send their states, the server weights and averages; "sum-only": clients
    # send n_k*base_k, w_k(c)*adaptor_c^k and the weights, the server only sums and divides once
    "aggregation": "mean",
    # baselines and clients that never train
    "holdout-clients": 0.0,
    "adapt-steps": 20,
    "ditto-lambda": 1.0,
    # data and outputs
    "data-dir": "",
    "output-dir": "~/floral-results",
    "run-name": "",
    "resume": False,
    "persist-client-state": True,
    "export-models": False,
}

# keys whose value may be "auto" (take the task preset); "device" = "auto" means cuda if present
AUTO_KEYS = {k for k, v in DEFAULTS.items() if v == AUTO and k != "device"}


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """The validated run config. Attribute names are the keys with '-' -> '_'."""

    task: str
    method: str
    seed: int
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    eval_every: int
    min_available_nodes: int
    node_wait_timeout: float
    reply_timeout: float
    reply_poll: float
    local_epochs: int
    batch_size: int
    lr: float
    mixture_lr: float
    momentum: float
    weight_decay: float
    device: str
    num_threads: int
    mixed_precision: str
    compile: bool
    num_adaptors: int
    rank: float | int | str
    alpha: float
    conv_method: str
    adaptive_bias: bool
    adapt_norm: bool
    temperature: float
    mixture_noise: float
    prob_floor: float
    entropy_penalty: float
    per_layer_mixture: bool
    server_optimizer: str
    server_lr: float
    server_momentum: float
    proximal_mu: float
    aggregation: str
    holdout_clients: float
    adapt_steps: int
    ditto_lambda: float
    data_dir: str
    output_dir: str
    run_name: str
    resume: bool
    persist_client_state: bool
    export_models: bool
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_floral(self) -> bool:
        """True when the model carries FLoRAL adaptors (and a private mixture)."""
        return self.method in ("floral", "floral-oracle", "local-adaptor", "feddpa")

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict of the resolved values (what config.json records)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "raw":
                continue
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        return out


# ----------------------------------------------------------------------------------------------
# typed readers: each raises ConfigError naming the key, the value and what is allowed


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"run config '{key}' = {value!r} is invalid: allowed {allowed}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _err(key, value, "true or false")


def _as_int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise _err(key, value, "an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _err(key, value, "an integer") from None
    if not isinstance(value, int):
        raise _err(key, value, "an integer")
    rng = _range_text(lo, hi)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _err(key, value, f"an integer {rng}")
    return value


def _as_float(
    key: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    if isinstance(value, bool):
        raise _err(key, value, "a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _err(key, value, "a number") from None
    if not isinstance(value, (int, float)):
        raise _err(key, value, "a number")
    value = float(value)
    rng = _range_text(lo, hi, lo_open)
    if not math.isfinite(value):
        raise _err(key, value, f"a finite number {rng}".strip())
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise _err(key, value, f"a number {rng}")
    if hi is not None and value > hi:
        raise _err(key, value, f"a number {rng}")
    return value


def _range_text(lo: Any, hi: Any, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _as_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _err(key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _as_rank(key: str, value: Any) -> float | int | str:
    """rank: int >= 1 (absolute), float in (0, 1] (relative budget rho), or sqrt/log/full."""
    if isinstance(value, str):
        s = value.strip()
        if s in ("sqrt", "log", "full"):
            return s
        try:
            value = float(s)
        except ValueError:
            raise _err(key, value, "an int >= 1, a float in (0, 1], 'sqrt', 'log' or 'full'") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(key, value, "an int >= 1, a float in (0, 1], 'sqrt', 'log' or 'full'")
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if float(value).is_integer() and value >= 1:
        return int(value)
    raise _err(key, value, "an int >= 1, a float in (0, 1], 'sqrt', 'log' or 'full'")


def _reply_poll(value: Any) -> float:
    """0 (Flower's own 3 s loop) or 0.01..10 s."""
    poll = _as_float("reply-poll", value, 0.0, 10.0)
    if 0.0 < poll < 0.01:
        raise _err("reply-poll", value, "0 (Flower's send_and_receive) or a number in [0.01, 10] seconds")
    return poll


def _known_tasks() -> tuple[str, ...] | None:
    try:
        from floral_flwr.tasks import TASK_NAMES
    except Exception:  # pragma: no cover - tasks package broken: report at get_task time
        return None
    return tuple(TASK_NAMES)


def task_presets(task: str) -> dict[str, Any]:
    """The task's preset hyper-parameters keyed by run-config name (may be empty)."""
    from floral_flwr import tasks

    if hasattr(tasks, "task_defaults"):
        return dict(tasks.task_defaults(task))
    return dict(tasks.get_task(task, num_clients=None).defaults)


def parse_run_config(run_config: Mapping[str, Any] | None) -> RunConfig:
    """Validate a Flower run config and resolve "auto" keys from the task preset.

    Unknown keys are an error (they are almost always typos); missing keys take ``DEFAULTS``
    (``run_simulation`` passes an empty run config). Raises :class:`ConfigError` whose message
    names the key, the bad value and what is allowed.
    """
    given = dict(run_config or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown run config key(s) {unknown}: allowed keys are {sorted(DEFAULTS)}"
        )
    merged = {**DEFAULTS, **given}

    tasks = _known_tasks()
    task = merged["task"]
    if tasks is not None:
        task = _as_choice("task", task, tasks)
    elif not isinstance(task, str):
        raise _err("task", task, "a task name")
    method = _as_choice("method", merged["method"], METHODS)

    presets = task_presets(task) if tasks is not None else {}
    # Fallbacks for presets a task does not give.
    fallback = {
        "num-server-rounds": 100,
        "fraction-train": 1.0,
        "local-epochs": 1,
        "batch-size": 32,
        "lr": 0.1,
        "mixture-lr": 0.1,
        "num-adaptors": 4,
        "rank": 0.1,
        "adapt-norm": False,
    }
    for key in AUTO_KEYS:
        if isinstance(merged[key], str) and merged[key].strip() == AUTO:
            merged[key] = presets.get(key, fallback[key])

    output_dir = merged["output-dir"]
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise _err("output-dir", output_dir, "a non-empty directory path")
    run_name = merged["run-name"]
    if not isinstance(run_name, str) or any(c in run_name for c in "/\\\0"):
        raise _err("run-name", run_name, "a name without path separators ('' = automatic)")
    data_dir = merged["data-dir"]
    if not isinstance(data_dir, str):
        raise _err("data-dir", data_dir, "a directory path or ''")

    cfg = RunConfig(
        task=task,
        method=method,
        seed=_as_int("seed", merged["seed"], 0),
        num_server_rounds=_as_int("num-server-rounds", merged["num-server-rounds"], 1),
        fraction_train=_as_float("fraction-train", merged["fraction-train"], 0.0, 1.0, lo_open=True),
        fraction_evaluate=_as_float(
            "fraction-evaluate", merged["fraction-evaluate"], 0.0, 1.0, lo_open=True
        ),
        eval_every=_as_int("eval-every", merged["eval-every"], 1),
        min_available_nodes=_as_int("min-available-nodes", merged["min-available-nodes"], 1),
        node_wait_timeout=_as_float("node-wait-timeout", merged["node-wait-timeout"], 0.0, lo_open=True),
        reply_timeout=_as_float("reply-timeout", merged["reply-timeout"], 0.0, lo_open=True),
        reply_poll=_reply_poll(merged["reply-poll"]),
        local_epochs=_as_int("local-epochs", merged["local-epochs"], 1),
        batch_size=_as_int("batch-size", merged["batch-size"], 1),
        lr=_as_float("lr", merged["lr"], 0.0, lo_open=True),
        mixture_lr=_as_float("mixture-lr", merged["mixture-lr"], 0.0),
        momentum=_as_float("momentum", merged["momentum"], 0.0, 1.0),
        weight_decay=_as_float("weight-decay", merged["weight-decay"], 0.0),
        device=_as_choice("device", merged["device"], DEVICES),
        num_threads=_as_int("num-threads", merged["num-threads"], 0, 1024),
        mixed_precision=_as_choice("mixed-precision", merged["mixed-precision"], MIXED_PRECISION),
        compile=_as_bool("compile", merged["compile"]),
        num_adaptors=_as_int("num-adaptors", merged["num-adaptors"], 1),
        rank=_as_rank("rank", merged["rank"]),
        alpha=_as_float("alpha", merged["alpha"]),
        conv_method=_as_choice("conv-method", merged["conv-method"], CONV_METHODS),
        adaptive_bias=_as_bool("adaptive-bias", merged["adaptive-bias"]),
        adapt_norm=_as_bool("adapt-norm", merged["adapt-norm"]),
        temperature=_as_float("temperature", merged["temperature"], 0.0, lo_open=True),
        mixture_noise=_as_float("mixture-noise", merged["mixture-noise"], 0.0),
        prob_floor=_as_float("prob-floor", merged["prob-floor"], 0.0, 1.0),
        entropy_penalty=_as_float("entropy-penalty", merged["entropy-penalty"]),
        per_layer_mixture=_as_bool("per-layer-mixture", merged["per-layer-mixture"]),
        server_optimizer=_as_choice(
            "server-optimizer", merged["server-optimizer"], SERVER_OPTIMIZERS
        ),
        server_lr=_as_float("server-lr", merged["server-lr"], 0.0, lo_open=True),
        server_momentum=_as_float("server-momentum", merged["server-momentum"], 0.0, 1.0),
        proximal_mu=_as_float("proximal-mu", merged["proximal-mu"], 0.0),
        aggregation=_as_choice("aggregation", merged["aggregation"], AGGREGATIONS),
        holdout_clients=_as_float("holdout-clients", merged["holdout-clients"], 0.0, 0.9),
        adapt_steps=_as_int("adapt-steps", merged["adapt-steps"], 0),
        ditto_lambda=_as_float("ditto-lambda", merged["ditto-lambda"], 0.0),
        data_dir=data_dir,
        output_dir=output_dir,
        run_name=run_name,
        resume=_as_bool("resume", merged["resume"]),
        persist_client_state=_as_bool("persist-client-state", merged["persist-client-state"]),
        export_models=_as_bool("export-models", merged["export-models"]),
        raw=given,
    )
    why = INCOMPATIBLE.get((cfg.method, cfg.server_optimizer))
    if why is not None:
        raise ConfigError(
            f"run config 'method' = {cfg.method!r} cannot be combined with 'server-optimizer' = "
            f"{cfg.server_optimizer!r}: {why}"
        )
    if cfg.prob_floor * cfg.num_adaptors > 1.0:
        raise _err(
            "prob-floor",
            cfg.prob_floor,
            f"a number with prob-floor * num-adaptors <= 1 (num-adaptors = {cfg.num_adaptors})",
        )
    return cfg


def resolve_output_dir(cfg: RunConfig) -> str:
    """Absolute output directory (the ServerApp's working directory is not the user's)."""
    return os.path.abspath(os.path.expanduser(cfg.output_dir))
