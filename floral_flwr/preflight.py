"""What a front end checks before it starts anything (``launch``, ``compare``; ``deploy`` can
call the same): the ``--run-config`` text read as ``flwr run`` reads it, the fast pre-check of
:mod:`floral_flwr.config`, then what needs the task (its presets, its clusters against the
number of clients; this imports torch). Every error is one :class:`ConfigError` line.

Kept apart from :mod:`floral_flwr.config` because the task checks import the method registry,
which imports the config: config itself never imports a method.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any, Mapping

from floral_flwr.config import ConfigError, RunConfig, parse_run_config, precheck_run_config


def min_clients(task_clusters: int | None) -> int:
    """The fewest clients a task can be split into: one per true cluster."""
    return max(1, int(task_clusters or 1))


def check_task_and_clients(cfg: RunConfig, num_clients: int | None, fix: str | None = None) -> int | None:
    """What needs the task (imports torch): the method against the task's clusters, and the
    number of clients against the clusters (``fix`` says how to ask for more in the caller's
    terms). Returns the task's number of clusters."""
    from floral_flwr.methods import check_method_task
    from floral_flwr.tasks import task_info

    try:
        info = task_info(cfg.task, seed=cfg.seed)
        check_method_task(cfg, info.num_clusters)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    need = min_clients(info.num_clusters)
    if num_clients is not None and num_clients < need:
        raise ConfigError(too_few_clients(cfg.task, need, f"{num_clients} clients were asked for", fix))
    return info.num_clusters


def too_few_clients(task: str, need: int, have: str, fix: str | None = None) -> str:
    """The one line that names the fix when a federation is smaller than the task."""
    fix = fix or ("run `python -m floral_flwr.launch` (20 clients) or "
                  "`flwr run . --stream --federation-config \"num-supernodes=20\"`")
    return f"task '{task}' needs at least {need} clients (one per cluster), but {have}: {fix}"


def check_run_config(given: Mapping[str, Any], num_clients: int | None = None,
                     fix: str | None = None) -> RunConfig:
    """Everything a front end checks before it starts a process: the fast pre-check first (a
    typo answers at once), then the full parse and the task/clients check (``fix``: how the
    caller's user asks for more clients, for the error line)."""
    precheck_run_config(given)
    cfg = parse_run_config(given)
    check_task_and_clients(cfg, num_clients, fix)
    return cfg


_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_cli_run_config(text: str) -> dict[str, Any]:
    """``--run-config`` text to a dict, as ``flwr run`` reads it: space-separated ``key=value``
    pairs whose values are TOML (strings quoted), or the path of one ``.toml`` file."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.endswith(".toml") and "=" not in text:
        with open(os.path.expanduser(text), "rb") as f:
            return _flatten(tomllib.load(f))
    pairs = _PAIR.findall(text)
    leftover = _PAIR.sub("", text).strip()
    if leftover or not pairs:
        raise ConfigError(
            f"--run-config {text!r}: cannot read {leftover or text!r}; expected space-separated "
            f"key=value pairs, strings in quotes, e.g. \"method='fedavg' seed=1\""
        )
    out: dict[str, Any] = {}
    for key, raw in pairs:
        try:
            out.update(tomllib.loads(f"{key} = {raw}"))
        except tomllib.TOMLDecodeError:
            hint = " (strings need quotes: key='text')" if raw[:1] not in "'\"" else ""
            raise ConfigError(f"--run-config: cannot read {key}={raw}{hint}") from None
    return _flatten(out)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out
