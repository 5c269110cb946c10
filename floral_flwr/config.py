# size: every run-config key with its validation in one place (the single source the validator, the README and `list keys` read).
"""The run config: every key, its default, its type and what is allowed, validated once.

Flower hands the ServerApp and ClientApp a flat ``run_config`` dict (``[tool.flwr.app.config]``
in pyproject.toml plus ``--run-config`` overrides). Flower does not check types, so
``parse_run_config`` does, and it is the only place that does: both apps call it and then read
attributes of the returned :class:`RunConfig`. ``DEFAULTS`` below is the single source of truth
for the keys; a test checks that pyproject.toml declares exactly these keys with these defaults.

Keys whose default is ``"auto"`` take the task's preset (the paper's hyper-parameters for that
task, see ``floral_flwr.tasks``); any explicit value overrides the preset.

:func:`precheck_run_config` needs no torch and no flwr (keys, names, types and ranges of the
values given, in well under a second): front ends run it first (``floral_flwr.preflight``).
Every error is one line naming the key, the value, the allowed values and the nearest valid
spelling (``difflib``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from floral_flwr.config_values import (  # noqa: F401  (ConfigError, nearest, RANK_WORDS: public here too)
    RANK_WORDS,
    ConfigError,
    _as_bool,
    _as_choice,
    _as_float,
    _as_int,
    _as_num_shares,
    _as_rank,
    _as_text,
    _as_trim_fraction,
    _err,
    _hint,
    as_reply_poll,
    is_valid_run_name,
    nearest,
)

# Names of the choices are kept here (not imported from the strategy/method modules) so that
# validating a config never imports torch or flwr.
METHODS = (
    "floral", "floral-oracle", "fedavg", "local-adaptor", "fedavg-lora",
    # the baselines (each a peer module of floral_flwr/methods; tests check this list against its registry)
    "fedavg-ft", "ensemble", "ensemble-oracle", "ifca", "fedem", "ditto", "feddpa", "feddpa-capped",
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
ADAPTOR_INITS = ("zero", "official", "centered")
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISION = ("off", "bf16")
AGGREGATIONS = ("secagg", "mean", "sum-only")
# robust aggregation (floral_flwr.strategy.robust); trimmed-mean/median need per-client values
ROBUST_MODES = ("none", "clip", "trimmed-mean", "median")
PER_CLIENT_ROBUST = ("trimmed-mean", "median")
AUTO = "auto"
# methods that run with a frozen base ("train-base" = false): the Floral-wrapped ones; with a
# frozen base, "fedavg" averages what trains, i.e. it is "fedavg-lora" (one shared LoRA)
FROZEN_BASE_METHODS = ("floral", "floral-oracle", "fedavg", "fedavg-lora", "local-adaptor", "feddpa", "feddpa-capped")
# Task names, kept here (like METHODS) so that a misspelled task is caught without importing
# torch. ``floral_flwr.tasks.TASK_NAMES`` stays the authority: a name missing here is looked up
# there by the full check, and a test keeps the two equal.
TASKS = (
    "synthetic-linear", "synthetic-linear-simple", "synthetic-linear-bn",
    "synthetic-mlp", "synthetic-mlp-simple", "synthetic-mlp-bn",
    "digits-rotate", "digits-label-shift", "digits-rotate-reduced", "digits-label-shift-reduced",
    *(n for b in ("mnist-rotate", "mnist-label-shift", "fmnist-rotate", "fmnist-label-shift",
                  "cifar10-rotate", "cifar10-label-shift", "cifar100", "cifar100-bn", "cifar100-gn",
                  "wordnet-label-shift", "wordnet-concept-shift")
      for n in (b, b + "-reduced")),
)

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
    # an evaluation round's evaluation rides on the next round's train messages (same numbers,
    # one message per client instead of two); see floral_flwr/strategy/eval_fold.py
    "fold-evaluation": True,
    # local training
    "local-epochs": AUTO,
    "batch-size": AUTO,
    "lr": AUTO,
    "mixture-lr": AUTO,
    "momentum": 0.0,
    "weight-decay": 0.0,
    # 0 = off, the paper's protocol; a bound stops the rare blow-up of a long run at lr 0.1
    # (benchmarks/RESULTS_paper.md, "Why two runs diverged")
    "grad-clip": 0.0,
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
    "adaptor-init": "centered",
    "precondition": False,
    "adapt-norm": AUTO,
    "temperature": 1.0,
    "mixture-noise": 1.0,
    "prob-floor": 0.0,
    "entropy-penalty": 0.0,
    "per-layer-mixture": False,
    # false: the base model is frozen and never sent (a pretrained backbone); only the adaptors
    # and the task's head train and travel ("auto": the task's preset, true except text tasks)
    "train-base": AUTO,
    # server optimizer applied to the aggregate (fedavg = plain replacement; "auto": the task's
    # paper setting, e.g. FedAdam with lr 0.001 for CIFAR-100, else fedavg / 1.0)
    "server-optimizer": AUTO,
    "server-lr": AUTO,
    "server-momentum": 0.9,
    "proximal-mu": 0.01,
    # what the server sees of each client (KEY_HELP, README and docs/privacy.md say it per value)
    "aggregation": "secagg",
    "secagg-clip": 8.0,
    "secagg-num-shares": 0,
    "secagg-threshold": 0.6,
    "report-mixtures": False,  # evaluation replies with each client's p_k: reveals p_k
    "report-mixtures-acknowledged": False,
    # baselines and clients that never train
    "holdout-clients": 0.0,
    "adapt-steps": 20,
    "ditto-lambda": 1.0,
    # bounds on what one client can do to the aggregate (docs/security.md)
    "robust": "none",
    "clip-norm": 0.0,
    "trim-fraction": 0.2,
    "max-examples": 0.0,
    # a fraction of every client's train split held out, never trained on; evaluation uses it
    # instead of the test split (hyper-parameter tuning: compare --tune)
    "validation-fraction": 0.0,
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

# key -> one line for `python -m floral_flwr list keys` (README's "Run config" table has the
# long form; a test checks both cover exactly DEFAULTS)
KEY_HELP: dict[str, str] = {
    "task": "what to learn: data, partition into clients, model, metric (list tasks)",
    "method": "what to federate and what stays private (list methods)",
    "seed": "seeds model init, data partition, client sampling and local training",
    "num-server-rounds": "federated rounds",
    "fraction-train": "fraction of clients sampled per round (seeded)",
    "fraction-evaluate": "fraction of clients evaluated on evaluation rounds",
    "eval-every": "evaluate every N rounds (and in the last round)",
    "min-available-nodes": "wait for this many connected nodes before a round",
    "node-wait-timeout": "seconds to wait for nodes before stopping with an error",
    "reply-timeout": "seconds to wait for the replies of one round",
    "reply-poll": "seconds between the server's pulls for replies (0 = Flower's 3 s send_and_receive)",
    "fold-evaluation": "evaluate with the next round's train message (same numbers, one message per client); plaintext aggregation (mean, sum-only) only: under secagg evaluation stays a separate exchange",
    "local-epochs": "local epochs per round",
    "batch-size": "local batch size",
    "lr": "client SGD learning rate of the shared weights",
    "mixture-lr": "client SGD learning rate of the mixture logits",
    "momentum": "client SGD momentum",
    "weight-decay": "client weight decay on the shared weights",
    "grad-clip": "bound on the L2 norm of each local step's gradient (over everything the step trains); 0 = off",
    "device": "auto (CUDA when available), cpu or cuda",
    "num-threads": "torch threads per ClientApp process; 0 = the CPUs reserved for it",
    "mixed-precision": "bf16: local training under bfloat16 autocast on CUDA",
    "compile": "torch.compile the training forward once per ClientApp process",
    "num-adaptors": "C, the number of adaptors (or models, for the C-model baselines)",
    "rank": "adaptor rank: int >= 1, relative budget in (0, 1], sqrt, log or full",
    "alpha": "adaptor scale",
    "conv-method": "how conv adaptors split the kernel",
    "adaptive-bias": "per-adaptor bias where the base layer has one",
    "adaptor-init": "zero (no symmetry breaking), official (random biases) or centered (random, summing to zero over c)",
    "precondition": "the official code's preconditioned LoRA gradient step",
    "adapt-norm": "norm-layer adaptors",
    "temperature": "p = softmax(logits / temperature)",
    "mixture-noise": "training-time logit noise mixture-noise * U[0, 1)",
    "prob-floor": "clamp the mixture p from below",
    "entropy-penalty": "adds entropy-penalty * H(p) to the loss",
    "per-layer-mixture": "one mixture per adapted layer instead of one per client",
    "train-base": "false: frozen base never sent, only adaptors + head train and travel",
    "server-optimizer": "server step on the aggregate (auto: the task's paper setting)",
    "server-lr": "server learning rate (FedAvgM, FedOpt; auto: the task's paper setting)",
    "server-momentum": "FedAvgM momentum",
    "proximal-mu": "FedProx mu",
    "aggregation": "secagg (Flower's SecAgg+: the server sees only sums), mean (reveals n_k p_k) or sum-only (plaintext sums)",
    "secagg-clip": "secagg: public bound on every masked value (|x| > clip drops that reply)",
    "secagg-num-shares": "secagg: SecAgg+ neighbourhood size; 0 = min(N, 5), else odd >= 3",
    "secagg-threshold": "secagg: fraction of a neighbourhood needed to unmask (0.5, 1]",
    "report-mixtures": "evaluation replies carry each client's mixture p_k (clients.csv, heatmap)",
    "report-mixtures-acknowledged": "deployment: the operator accepts that report-mixtures reveals p_k",
    "holdout-clients": "fraction of clients that never train (zero-shot vs adapted metrics)",
    "adapt-steps": "local steps to fit what is personal at evaluation",
    "ditto-lambda": "Ditto's proximal weight",
    "robust": "none, clip (bound each update's norm), trimmed-mean or median (per coordinate)",
    "clip-norm": "robust clip: the bound on each update's L2 norm; 0 = per round the median of the replies' norms",
    "trim-fraction": "robust trimmed-mean: the weight trimmed from each end, in [0, 0.5)",
    "max-examples": "the most examples one reply may weigh; 0 = no operator bound (the server's own bound always applies)",
    "validation-fraction": "hold out this fraction of each client's train split; evaluate on it instead of test (tuning)",
    "data-dir": "directory with train/test parquet files for the image tasks",
    "output-dir": "where run directories go",
    "run-name": "run directory name ('' = <task>-<method>-seed<seed>-<timestamp>)",
    "resume": "continue an interrupted run from its last completed round",
    "persist-client-state": "simulation: clients keep their private state under the run directory",
    "export-models": "at the end every client saves its personalized model on its own side",
}


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
    fold_evaluation: bool
    local_epochs: int
    batch_size: int
    lr: float
    mixture_lr: float
    momentum: float
    weight_decay: float
    grad_clip: float
    device: str
    num_threads: int
    mixed_precision: str
    compile: bool
    num_adaptors: int
    rank: float | int | str
    alpha: float
    conv_method: str
    adaptive_bias: bool
    adaptor_init: str
    precondition: bool
    adapt_norm: bool
    temperature: float
    mixture_noise: float
    prob_floor: float
    entropy_penalty: float
    per_layer_mixture: bool
    train_base: bool
    server_optimizer: str
    server_lr: float
    server_momentum: float
    proximal_mu: float
    aggregation: str
    secagg_clip: float
    secagg_num_shares: int
    secagg_threshold: float
    report_mixtures: bool
    report_mixtures_acknowledged: bool
    holdout_clients: float
    adapt_steps: int
    ditto_lambda: float
    robust: str
    clip_norm: float
    trim_fraction: float
    max_examples: float
    validation_fraction: float
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
        return self.method in ("floral", "floral-oracle", "local-adaptor", "feddpa", "feddpa-capped",
                               "fedavg-lora") or (self.method == "fedavg" and not self.train_base)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict of the resolved values (what config.json records)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "raw":
                continue
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        return out


# The values a key may take when it is a closed set (validation, suggestions and `list keys`).
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "device": DEVICES,
    "mixed-precision": MIXED_PRECISION,
    "conv-method": CONV_METHODS,
    "adaptor-init": ADAPTOR_INITS,
    "server-optimizer": SERVER_OPTIMIZERS,
    "aggregation": AGGREGATIONS,
    "robust": ROBUST_MODES,
}


def _choice(key: str) -> Callable[[str, Any], str]:
    return lambda k, v: _as_choice(k, v, CHOICES[key])


# key -> reader(key, value) -> typed value. One table for the fast pre-check and the full parse.
READERS: dict[str, Callable[[str, Any], Any]] = {
    "task": _as_text("a task name (python -m floral_flwr list tasks)", lambda v: bool(v.strip())),
    "method": _choice("method"),
    "seed": lambda k, v: _as_int(k, v, 0),
    "num-server-rounds": lambda k, v: _as_int(k, v, 1),
    "fraction-train": lambda k, v: _as_float(k, v, 0.0, 1.0, lo_open=True),
    "fraction-evaluate": lambda k, v: _as_float(k, v, 0.0, 1.0, lo_open=True),
    "eval-every": lambda k, v: _as_int(k, v, 1),
    "min-available-nodes": lambda k, v: _as_int(k, v, 1),
    "node-wait-timeout": lambda k, v: _as_float(k, v, 0.0, lo_open=True),
    "reply-timeout": lambda k, v: _as_float(k, v, 0.0, lo_open=True),
    "reply-poll": as_reply_poll,
    "fold-evaluation": _as_bool,
    "local-epochs": lambda k, v: _as_int(k, v, 1),
    "batch-size": lambda k, v: _as_int(k, v, 1),
    "lr": lambda k, v: _as_float(k, v, 0.0, lo_open=True),
    "mixture-lr": lambda k, v: _as_float(k, v, 0.0),
    "momentum": lambda k, v: _as_float(k, v, 0.0, 1.0),
    "weight-decay": lambda k, v: _as_float(k, v, 0.0),
    "grad-clip": lambda k, v: _as_float(k, v, 0.0),
    "device": _choice("device"),
    "num-threads": lambda k, v: _as_int(k, v, 0, 1024),
    "mixed-precision": _choice("mixed-precision"),
    "compile": _as_bool,
    "num-adaptors": lambda k, v: _as_int(k, v, 1),
    "rank": _as_rank,
    "alpha": _as_float,
    "conv-method": _choice("conv-method"),
    "adaptive-bias": _as_bool,
    "adaptor-init": _choice("adaptor-init"),
    "precondition": _as_bool,
    "adapt-norm": _as_bool,
    "temperature": lambda k, v: _as_float(k, v, 0.0, lo_open=True),
    "mixture-noise": lambda k, v: _as_float(k, v, 0.0),
    "prob-floor": lambda k, v: _as_float(k, v, 0.0, 1.0),
    "entropy-penalty": _as_float,
    "per-layer-mixture": _as_bool,
    "train-base": _as_bool,
    "server-optimizer": _choice("server-optimizer"),
    "server-lr": lambda k, v: _as_float(k, v, 0.0, lo_open=True),
    "server-momentum": lambda k, v: _as_float(k, v, 0.0, 1.0),
    "proximal-mu": lambda k, v: _as_float(k, v, 0.0),
    "aggregation": _choice("aggregation"),
    "secagg-clip": lambda k, v: _as_float(k, v, 1.0),
    "secagg-num-shares": _as_num_shares,
    "secagg-threshold": lambda k, v: _as_float(k, v, 0.5, 1.0, lo_open=True),
    "report-mixtures": _as_bool,
    "report-mixtures-acknowledged": _as_bool,
    "holdout-clients": lambda k, v: _as_float(k, v, 0.0, 0.9),
    "adapt-steps": lambda k, v: _as_int(k, v, 0),
    "ditto-lambda": lambda k, v: _as_float(k, v, 0.0),
    "robust": _choice("robust"),
    "clip-norm": lambda k, v: _as_float(k, v, 0.0),
    "trim-fraction": _as_trim_fraction,
    "max-examples": lambda k, v: _as_float(k, v, 0.0),
    "validation-fraction": lambda k, v: _as_float(k, v, 0.0, 0.9),
    "data-dir": _as_text("a directory path or ''", lambda v: True),
    "output-dir": _as_text("a non-empty directory path", lambda v: bool(v.strip())),
    "run-name": _as_text(
        "a name of at most 200 printable characters without path separators, not '.' or '..' "
        "and not starting with '.' ('' = automatic)", is_valid_run_name
    ),
    "resume": _as_bool,
    "persist-client-state": _as_bool,
    "export-models": _as_bool,
}


def _is_auto(key: str, value: Any) -> bool:
    return key in AUTO_KEYS and isinstance(value, str) and value.strip() == AUTO


def check_keys(given: Mapping[str, Any]) -> None:
    """Unknown keys are an error (they are almost always typos), each with its nearest key."""
    unknown = [k for k in given if k not in DEFAULTS]
    if not unknown:
        return
    parts = []
    for k in unknown:
        near = nearest(k, DEFAULTS)
        parts.append(f"'{k}'" + (f" (did you mean '{near}'?)" if near else ""))
    raise ConfigError(
        f"unknown run config key {', '.join(parts)}: see `python -m floral_flwr list keys` "
        f"for the {len(DEFAULTS)} keys"
    )


def _check_task_name(task: Any, names: tuple[str, ...]) -> str:
    if not isinstance(task, str) or task not in names:
        raise _task_error(task, names)
    return task


def _task_error(task: Any, names: tuple[str, ...]) -> ConfigError:
    return _err("task", task, "one of " + ", ".join(repr(n) for n in names)
                + " (python -m floral_flwr list tasks)", _hint(task, names))


def precheck_run_config(given: Mapping[str, Any]) -> None:
    """Everything that needs neither torch nor the task's presets: keys, method and choice
    values, and the type and range of every value given explicitly. Well under a second."""
    check_keys(given)
    for key, value in given.items():
        if _is_auto(key, value):
            continue
        if key == "task":
            if isinstance(value, str) and value in TASKS:
                continue
            if nearest(value, TASKS) is not None or not isinstance(value, str):  # a typo
                raise _task_error(value, TASKS)
            continue  # a task newer than TASKS: the full check asks floral_flwr.tasks
        READERS[key](key, value)


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
        # + the paper's server optimizer / lr (the tasks' extra_defaults: CIFAR-100's Adam)
        return {**tasks.task_defaults(task), **tasks.task_server_presets(task)}
    return dict(tasks.get_task(task, num_clients=None).defaults)


# Fallbacks for presets a task does not give.
_FALLBACK_PRESETS = {
    "num-server-rounds": 100,
    "fraction-train": 1.0,
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.1,
    "mixture-lr": 0.1,
    "num-adaptors": 4,
    "rank": 0.1,
    "adapt-norm": False,
    "train-base": True,
    "server-optimizer": "fedavg",
    "server-lr": 1.0,
}


def parse_run_config(run_config: Mapping[str, Any] | None) -> RunConfig:
    """Validate a Flower run config and resolve "auto" keys from the task preset.

    Unknown keys are an error (they are almost always typos); missing keys take ``DEFAULTS``
    (``run_simulation`` passes an empty run config). Raises :class:`ConfigError` whose message
    names the key, the bad value and what is allowed.
    """
    given = dict(run_config or {})
    check_keys(given)
    merged = {**DEFAULTS, **given}

    tasks = _known_tasks()
    if tasks is not None:
        task = _check_task_name(merged["task"], tasks)
    else:
        task = READERS["task"]("task", merged["task"])
    method = READERS["method"]("method", merged["method"])

    presets = task_presets(task) if tasks is not None else {}
    opt_auto = _is_auto("server-optimizer", merged["server-optimizer"])
    lr_auto = _is_auto("server-lr", merged["server-lr"])
    for key in AUTO_KEYS:
        if _is_auto(key, merged[key]):
            merged[key] = presets.get(key, _FALLBACK_PRESETS[key])
    if opt_auto and (method, merged["server-optimizer"]) in INCOMPATIBLE:
        # the task's paper optimizer cannot serve this method (IFCA and a stateful optimizer):
        # "auto" then means plain replacement
        merged["server-optimizer"] = _FALLBACK_PRESETS["server-optimizer"]
    if lr_auto and merged["server-optimizer"] != presets.get("server-optimizer", _FALLBACK_PRESETS["server-optimizer"]):
        # the preset's lr belongs to the preset's optimizer (CIFAR-100: Adam's 0.001), not another
        merged["server-lr"] = _FALLBACK_PRESETS["server-lr"]

    values = {key: READERS[key](key, merged[key]) for key in DEFAULTS if key not in ("task", "method")}
    cfg = RunConfig(
        task=task,
        method=method,
        **{key.replace("-", "_"): v for key, v in values.items()},
        raw=given,
    )
    why = INCOMPATIBLE.get((cfg.method, cfg.server_optimizer))
    if why is not None:
        raise ConfigError(
            f"run config 'method' = {cfg.method!r} cannot be combined with 'server-optimizer' = "
            f"{cfg.server_optimizer!r}: {why}"
        )
    if cfg.robust in PER_CLIENT_ROBUST and cfg.aggregation != "mean":
        raise ConfigError(
            f"run config 'robust' = {cfg.robust!r} cannot be combined with 'aggregation' = "
            f"{cfg.aggregation!r}: a trimmed mean or median needs each client's values, and that "
            f"mode gives the server only sums; use robust 'clip' or 'none', or aggregation 'mean'"
        )
    if cfg.robust == "clip" and cfg.aggregation == "secagg":
        raise ConfigError(
            "run config 'robust' = 'clip' cannot be combined with 'aggregation' = 'secagg': the server "
            "sees only the masked sum, so it cannot clip one client's update; under secagg every masked "
            "value is bounded by 'secagg-clip' instead (docs/security.md); use robust 'none' with secagg, "
            "or aggregation 'mean' / 'sum-only' with robust 'clip'"
        )
    if cfg.prob_floor * cfg.num_adaptors > 1.0:
        raise _err(
            "prob-floor",
            cfg.prob_floor,
            f"a number with prob-floor * num-adaptors <= 1 (num-adaptors = {cfg.num_adaptors})",
        )
    if not cfg.train_base and cfg.method not in FROZEN_BASE_METHODS:
        raise ConfigError(
            f"run config 'train-base' = false cannot be combined with 'method' = {cfg.method!r}: "
            f"a frozen base is supported by {', '.join(repr(m) for m in FROZEN_BASE_METHODS)}"
        )
    return cfg


def resolve_output_dir(cfg: RunConfig) -> str:
    """Absolute output directory (the ServerApp's working directory is not the user's)."""
    return os.path.abspath(os.path.expanduser(cfg.output_dir))
