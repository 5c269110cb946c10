"""The honest tuning protocol: ``validation-fraction`` carves a validation split out of each
client's train data (never trained on, evaluated instead of test), and ``compare --tune`` picks
every method's hyper-parameters on it with the same grid, then reports fresh ``--seeds``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from floral_flwr import compare
from floral_flwr.config import ConfigError, parse_run_config
from floral_flwr.tasks.base import ClientData
from floral_flwr.tasks.validation_split import validation_size, validation_split

torch.set_num_threads(1)


def _data(n: int = 20) -> ClientData:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    return ClientData(x, torch.arange(n), torch.full((5, 1), -1.0), torch.full((5,), -1))


def test_validation_split_holds_out_rows_of_train_only():
    data = _data(20)
    split = validation_split(data, 0.25, seed=3, cid=7)
    kept, held = split.train_y.tolist(), split.test_y.tolist()
    assert len(held) == 5 and len(kept) == 15
    assert sorted(kept + held) == list(range(20))  # a partition of the train rows
    assert -1 not in held  # nothing of the test split
    assert torch.equal(split.train_x[:, 0].long(), split.train_y)  # rows stay paired
    # seeded by (seed, client): same again, another client or seed holds out other rows
    assert validation_split(data, 0.25, 3, 7).test_y.tolist() == held
    assert validation_split(data, 0.25, 3, 8).test_y.tolist() != held
    assert validation_split(data, 0.25, 4, 7).test_y.tolist() != held
    assert validation_split(data, 0.0, 3, 7) is data
    assert [validation_size(n, 0.2) for n in (2, 3, 10, 100)] == [1, 1, 2, 20]
    assert validation_size(2, 0.9) == 1  # at least one row on each side
    with pytest.raises(ValueError, match="validation-fraction"):
        validation_size(1, 0.2)


def test_a_client_with_validation_fraction_trains_and_evaluates_on_train_rows_only():
    # mutation checked: client_data ignoring validation-fraction -> fails
    from floral_flwr.client.handlers import client_data

    data = _data(10)
    task = SimpleNamespace(client_data=lambda cid: data)
    for f, n_train, n_test, test_rows in ((0.0, 10, 5, {-1}), (0.3, 7, 3, None)):
        cfg = parse_run_config({"task": "synthetic-linear", "validation-fraction": f})
        got = client_data(SimpleNamespace(task=task, cfg=cfg), 2)
        assert (got.num_train, got.num_test) == (n_train, n_test)
        if test_rows is None:
            assert set(got.test_y.tolist()) <= set(range(10))
            assert not set(got.test_y.tolist()) & set(got.train_y.tolist())
        else:
            assert set(got.test_y.tolist()) == test_rows


def test_validation_fraction_is_validated():
    with pytest.raises(ConfigError, match="'validation-fraction'"):
        parse_run_config({"validation-fraction": 0.95})


def test_choose_picks_the_best_mean_over_tune_seeds():
    points = [{"lr": 0.1}, {"lr": 0.3}, {"lr": 1.0}]
    rows = [
        {"task": "a", "method": "m", "point": 0, "value": 0.50, "metric": "accuracy"},
        {"task": "a", "method": "m", "point": 0, "value": 0.70, "metric": "accuracy"},  # mean 0.60
        {"task": "a", "method": "m", "point": 1, "value": 0.65, "metric": "accuracy"},
        {"task": "a", "method": "m", "point": 1, "value": 0.61, "metric": "accuracy"},  # mean 0.63
        {"task": "a", "method": "m", "point": 2, "value": 0.99, "metric": "accuracy"},
        {"task": "a", "method": "m", "point": 2, "value": float("nan"), "metric": "accuracy"},  # failed
        {"task": "b", "method": "m", "point": 0, "value": 2.0, "metric": "mse"},
        {"task": "b", "method": "m", "point": 1, "value": 1.0, "metric": "mse"},
        {"task": "b", "method": "m", "point": 2, "value": 3.0, "metric": "mse"},
    ]
    chosen = compare.choose(rows, points)
    assert chosen[("a", "m")]["values"] == {"lr": 0.3}
    assert chosen[("a", "m")]["validation-mean"] == pytest.approx(0.63)
    assert chosen[("b", "m")]["values"] == {"lr": 0.3}  # mse: lowest


def test_grid_is_the_product_and_bad_grids_say_what_is_wrong():
    assert compare.parse_grid(["lr=0.1,0.3", "mixture-lr=1,3"]) == [
        {"lr": 0.1, "mixture-lr": 1}, {"lr": 0.1, "mixture-lr": 3},
        {"lr": 0.3, "mixture-lr": 1}, {"lr": 0.3, "mixture-lr": 3}]
    with pytest.raises(ConfigError, match="did you mean 'mixture-lr'"):
        compare.parse_grid(["mixtur-lr=1,3"])
    with pytest.raises(ConfigError, match="'lr'"):
        compare.parse_grid(["lr=-1"])
    with pytest.raises(ConfigError, match="cannot be tuned"):
        compare.parse_grid(["seed=1,2"])


@pytest.mark.parametrize("args,fragment", [
    (["--tune", "mixtur-lr=0.3,1"], "did you mean 'mixture-lr'?"),
    (["--tune", "lr=0.1,0.2", "--tune-seeds", "0,5"], "share [0]"),
    (["--tune", "lr=0.1", "--validation-fraction", "0"], "--validation-fraction"),
])
def test_bad_tuning_requests_stop_before_any_run(tmp_path, capsys, args, fragment):
    assert compare.main(["--tasks", "synthetic-linear", "--methods", "fedavg", "--seeds", "1",
                         "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_tune_then_report_fresh_seeds_with_the_chosen_values(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--tasks", "synthetic-linear", "--methods", "fedavg", "floral", "--seeds", "5,6",
            "--rounds", "2", "--clients", "4", "--tune", "lr=0.01,0.3", "--tune-seeds", "100,101",
            "--validation-fraction", "0.25", "--out", str(out)]
    assert compare.main(argv) == 0
    capsys.readouterr()
    tuning = list(csv.DictReader((out / "tuning.csv").open()))
    # the same budget for every method: 2 points x 2 seeds, on the tune seeds only
    for m in ("fedavg", "floral"):
        mine = [r for r in tuning if r["method"] == m]
        assert sorted((r["grid"], r["seed"]) for r in mine) == sorted(
            (g, s) for g in ("lr=0.01", "lr=0.3") for s in ("100", "101"))
    doc = json.loads((out / "tuning.json").read_text())
    assert doc["grid"] == [{"lr": 0.01}, {"lr": 0.3}] and doc["tune-seeds"] == [100, 101]
    runs = {p.name: p for p in (out / "runs").iterdir()}
    for m in ("fedavg", "floral"):
        # the choice, recomputed from the tuning rows (mse: the lowest mean)
        means = {}
        for g in ("lr=0.01", "lr=0.3"):
            vals = [float(r["value"]) for r in tuning if r["method"] == m and r["grid"] == g]
            means[g] = sum(vals) / len(vals)
        best = min(means, key=means.get)
        c = doc["chosen"][f"synthetic-linear/{m}"]
        assert c["label"] == best and math.isclose(c["validation-mean"], means[best], rel_tol=1e-9)
        # tuning runs were evaluated on the validation split, never on test
        for name, run in runs.items():
            cfg = json.loads((run / "config.json").read_text())["config"]
            if name.startswith(f"synthetic-linear__{m}__seed10"):
                assert cfg["validation-fraction"] == 0.25
        # the reported run: the fresh seed, the chosen value, the full test split
        for s in (5, 6):
            (rep,) = [r for n, r in runs.items() if n.startswith(f"synthetic-linear__{m}__seed{s}__")]
            cfg = json.loads((rep / "config.json").read_text())["config"]
            assert cfg["validation-fraction"] == 0.0 and cfg["lr"] == float(best.split("=")[1])
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("fedavg", "5"), ("fedavg", "6"),
                                                              ("floral", "5"), ("floral", "6")]
    assert all(r["tuned"] == doc["chosen"][f"synthetic-linear/{r['method']}"]["label"] for r in rows)
    assert "## Tuned hyper-parameters" in (out / "comparison.md").read_text()
    # resumable: the same command reuses all 12 runs
    assert compare.main(argv) == 0
    log = capsys.readouterr().out
    assert "8 runs (8 already finished, 0 to do)" in log and "4 runs (4 already finished, 0 to do)" in log


def test_quick_stays_quick_and_the_readme_leads_with_it():
    # the README's first comparison command: --quick, one label-shift task, three methods, one seed
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = re.search(r"python -m floral_flwr\.compare (.*?)(?:\n(?!\s{4})|$)", readme.split("### Comparing methods")[1],
                      re.S).group(1)
    words = first.replace("\\\n", " ").split()
    assert "--quick" in words and words[words.index("--seeds") + 1] == "1"
    tasks = words[words.index("--tasks") + 1:words.index("--methods")]
    methods = words[words.index("--methods") + 1:words.index("--seeds")]
    assert tasks == ["digits-label-shift"] and {"fedavg", "floral"} <= set(methods) and len(methods) <= 3
    # its budget in rounds x clients (no wall-clock threshold): 80 rounds x 20 clients at most
    for t in tasks:
        assert compare.quick_rounds(t) <= 80 and compare.quick_clients(t) == 20
        assert compare.quick_rounds(t) * compare.quick_clients(t) * len(methods) <= 80 * 20 * 3
