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


# ------------------------------------------------------------------ suggestions and the pre-check


def _one_letter_off(word: str) -> str:
    """``word`` with its middle letter dropped: a one-letter misspelling."""
    i = len(word) // 2
    return word[:i] + word[i + 1:]


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _suggested(msg: str) -> str:
    import re

    found = re.findall(r"did you mean '([^']+)'\?", msg)
    assert len(found) == 1, msg
    return found[0]


def _is_a_nearest(typo: str, suggestion: str, names) -> bool:
    """The suggestion is one of the names closest to the typo (there can be ties:
    'cifar100-n-reduced' is one letter from both -bn- and -gn-)."""
    best = min(_edit_distance(typo, n) for n in names)
    return _edit_distance(typo, suggestion) == best


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_every_key_misspelled_by_one_letter_gets_it_suggested(key):
    from floral_flwr.config import precheck_run_config

    typo = _one_letter_off(key)
    for check in (precheck_run_config, parse_run_config):
        with pytest.raises(ConfigError) as info:
            check({typo: DEFAULTS[key]})
        msg = str(info.value)
        assert f"'{typo}'" in msg and f"did you mean '{key}'?" in msg and "\n" not in msg


def _task_names() -> tuple[str, ...]:
    from floral_flwr.tasks import TASK_NAMES

    return TASK_NAMES


@pytest.mark.parametrize("task", _task_names())
def test_every_task_misspelled_by_one_letter_gets_it_suggested(task):
    from floral_flwr.config import precheck_run_config

    typo = _one_letter_off(task)
    for check in (precheck_run_config, parse_run_config):
        with pytest.raises(ConfigError) as info:
            check({"task": typo})
        assert _is_a_nearest(typo, _suggested(str(info.value)), _task_names())
        assert _edit_distance(typo, task) == 1


@pytest.mark.parametrize("key,value", [
    *(("method", m) for m in __import__("floral_flwr.config", fromlist=["METHODS"]).METHODS),
    *((k, v) for k, vs in __import__("floral_flwr.config", fromlist=["CHOICES"]).CHOICES.items()
      if k != "method" for v in vs if len(v) > 3),
    ("rank", "sqrt"), ("resume", "true"), ("compile", "false"),
])
def test_every_name_in_an_allowed_set_misspelled_gets_it_suggested(key, value):
    from floral_flwr.config import precheck_run_config

    from floral_flwr.config import CHOICES, RANK_WORDS

    names = CHOICES.get(key, RANK_WORDS if key == "rank" else ("true", "false"))
    for typo in (_one_letter_off(value), value[:-1] + ("x" if value[-1] != "x" else "y")):
        with pytest.raises(ConfigError) as info:
            precheck_run_config({key: typo})
        assert f"'{key}'" in str(info.value)
        assert _is_a_nearest(typo, _suggested(str(info.value)), names), (typo, str(info.value))


def test_the_static_name_lists_match_their_registries():
    from floral_flwr.config import KEY_HELP, METHODS, TASKS
    from floral_flwr.methods import METHOD_SPECS
    from floral_flwr.tasks import TASK_NAMES

    assert tuple(TASKS) == tuple(TASK_NAMES)
    assert set(METHODS) == set(METHOD_SPECS)
    assert list(KEY_HELP) == list(DEFAULTS)


def test_precheck_needs_neither_torch_nor_flwr():
    """launch's first check must answer before torch is imported (that alone takes seconds)."""
    import subprocess
    import sys

    code = ("import sys; from floral_flwr.config import ConfigError, precheck_run_config\n"
            "from floral_flwr.preflight import parse_cli_run_config\n"
            "try:\n    precheck_run_config(parse_cli_run_config(\"num-adaptor=4 method='floral'\"))\n"
            "except ConfigError as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'flwr', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    assert "did you mean 'num-adaptors'?" in out[0]
    assert out[1] == "[]"


def test_precheck_checks_explicit_values_and_leaves_presets_to_the_full_parse():
    from floral_flwr.config import precheck_run_config

    precheck_run_config({"num-server-rounds": "auto", "lr": 0.5, "rank": "full", "task": "digits-rotate"})
    for bad in ({"num-server-rounds": 0}, {"lr": "auto-ish"}, {"fraction-train": 2.0}, {"seed": -1}):
        with pytest.raises(ConfigError, match=f"'{next(iter(bad))}'"):
            precheck_run_config(bad)
    # a cross-key rule needs the preset of num-adaptors: only the full parse sees it
    precheck_run_config({"prob-floor": 0.5})
    with pytest.raises(ConfigError, match="prob-floor"):
        parse_run_config({"prob-floor": 0.5})


@pytest.mark.parametrize("text", [
    "num-server-rounds=5 lr=0.05",
    "method='fedavg' output-dir='/tmp/with space/x' resume=true",
    'task="synthetic-linear" rank=0.25 compile=false',
    "run-name='a=b'",
])
def test_cli_run_config_is_read_as_flwr_reads_it(text):
    from flwr.common.config import parse_config_args

    from floral_flwr.preflight import parse_cli_run_config

    assert parse_cli_run_config(text) == parse_config_args([text])


def test_unreadable_cli_run_config_is_one_clear_line():
    from floral_flwr.preflight import parse_cli_run_config

    with pytest.raises(ConfigError, match="strings need quotes"):
        parse_cli_run_config("method=fedavg")


def test_check_run_config_compares_the_task_with_the_number_of_clients():
    from floral_flwr.preflight import check_run_config

    check_run_config({"task": "digits-label-shift"}, 4)
    with pytest.raises(ConfigError) as info:
        check_run_config({"task": "digits-label-shift"}, 2)
    msg = str(info.value)
    assert "at least 4 clients" in msg and "num-supernodes=20" in msg and "floral_flwr.launch" in msg


def test_text_task_presets_and_server_caps_read_no_data(monkeypatch, tmp_path):
    """The config parser and the server's weight caps run before (or without) the clients' data:
    for a WordNet task neither may read the definitions (a prepared data-dir lives on the
    clients; CI has no /usr/share/wordnet)."""
    from floral_flwr.tasks import clear_cache, partition_sizes, task_server_presets, text, wordnet

    clear_cache()
    monkeypatch.setattr(wordnet, "DEBIAN_DATA_NOUN", str(tmp_path / "absent" / "data.noun"))

    def no_reading(*args, **kwargs):
        raise AssertionError("the WordNet definitions were read")

    monkeypatch.setattr(wordnet, "load_definitions", no_reading)
    monkeypatch.setattr(wordnet, "parse_data_noun", no_reading)
    monkeypatch.setattr(text, "load_definitions", no_reading)
    assert task_server_presets("wordnet-label-shift") == {"server-optimizer": "fedavg", "server-lr": 1.0}
    cfg = parse_run_config({"task": "wordnet-label-shift", "data-dir": str(tmp_path / "prepared")})
    assert cfg.train_base is False and cfg.server_optimizer == "fedavg" and cfg.server_lr == 1.0
    assert partition_sizes("wordnet-label-shift", 4) is None  # the data are on the clients
    assert partition_sizes("digits-label-shift", 4) is not None  # embedded: the server splits it


@pytest.mark.parametrize("task", ["digits-label-shift", "digits-rotate-reduced", "synthetic-linear", "synthetic-mlp-bn"])
def test_server_presets_match_what_the_built_task_declares(task):
    """``task_server_presets`` no longer builds the task; it must still say what the task says."""
    from floral_flwr.tasks import get_task, task_server_presets

    extra = get_task(task, num_clients=None).extra_defaults
    assert task_server_presets(task) == {k: extra[k] for k in ("server-optimizer", "server-lr")}
