"""The run config: pyproject.toml declares exactly the documented keys; bad values are named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from floral_flwr.config import DEFAULTS, ConfigError, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_key_with_its_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert declared == DEFAULTS
    assert "federations" not in pyproject["tool"]["flwr"]  # legacy section would be rewritten by flwr


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in DEFAULTS if f"`{k}`" not in readme]
    assert not missing, f"README lacks run-config keys {missing}"


def test_defaults_resolve_from_the_task_preset():
    cfg = parse_run_config({})
    assert cfg.task == "digits-label-shift" and cfg.method == "floral"
    assert isinstance(cfg.num_server_rounds, int) and cfg.num_server_rounds > 0
    assert cfg.num_adaptors == 4
    explicit = parse_run_config({"lr": 0.05, "num-adaptors": 8, "rank": "full"})
    assert explicit.lr == 0.05 and explicit.num_adaptors == 8 and explicit.rank == "full"


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("task", "imagenet", "one of"),
        ("method", "fedsgd", "one of"),
        ("server-optimizer", "adamw", "one of"),
        ("num-server-rounds", "abc", "an integer"),
        ("num-server-rounds", 0, ">= 1"),
        ("fraction-train", 1.5, "(0.0, 1.0]"),
        ("fraction-train", 0.0, "(0.0, 1.0]"),
        ("fraction-evaluate", -0.1, "(0.0, 1.0]"),
        ("num-adaptors", 0, ">= 1"),
        ("lr", "fast", "a number"),
        ("lr", float("nan"), "finite"),
        ("rank", 0, "an int >= 1"),
        ("rank", "cube", "'sqrt'"),
        ("rank", 1.5, "a float in (0, 1]"),
        ("temperature", 0, "> 0"),
        ("conv-method", "diagonal", "one of"),
        ("resume", "maybe", "true or false"),
        ("prob-floor", 0.5, "prob-floor * num-adaptors <= 1"),
        ("run-name", "a/b", "path separators"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: value})
    msg = str(info.value)
    assert f"'{key}'" in msg and fragment in msg


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown run config key"):
        parse_run_config({"learning-rate": 0.1})


def test_strings_from_the_cli_are_converted():
    cfg = parse_run_config({"num-server-rounds": "5", "lr": "0.5", "resume": "false"})
    assert cfg.num_server_rounds == 5 and cfg.lr == 0.5 and cfg.resume is False
