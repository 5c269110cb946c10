"""The comparison runner: tables, plot, and resuming an interrupted sweep without redoing runs;
runs are keyed by their full resolved config, so a changed budget never reuses a stale run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from floral_flwr import compare

torch.set_num_threads(1)

ARGS = ["--tasks", "synthetic-linear", "--methods", "fedavg", "floral", "--seeds", "2", "--rounds", "2",
        "--clients", "4"]


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    """The one run directory of (task, method, seed) in a sweep (its name ends in a config key)."""
    found = sorted((out / "runs").glob(compare.run_name(task, method, seed, "*")))
    assert len(found) == 1, found
    return found[0]


def test_sweep_writes_tables_and_resumes_without_redoing_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(ARGS + ["--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "4 runs (0 already finished, 4 to do)" in log and "run 4/4" in log and "ETA" in log
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert {(r["method"], r["seed"]) for r in rows} == {("fedavg", "0"), ("fedavg", "1"), ("floral", "0"),
                                                        ("floral", "1")}
    md = (out / "comparison.md").read_text()
    assert "| fedavg |" in md and "| floral |" in md and "**" in md and "±" in md and "(n=2)" in md
    assert "bytes" in md.lower() and (out / "comparison.png").stat().st_size > 1000

    # interrupted sweep: one run lost its summary (killed before writing it) -> only it reruns
    run = run_dir(out, "synthetic-linear", "floral", 1)
    (run / "summary.json").unlink()
    assert compare.main(ARGS + ["--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "4 runs (3 already finished, 1 to do)" in log
    assert "reusing 3 finished run(s) with the same resolved config" in log
    assert (run / "summary.json").exists()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 4 and all(float(r["value"]) == float(r["value"]) for r in rows)  # no NaN


def test_a_run_interrupted_mid_way_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import json

    out = tmp_path / "cmp"
    args = ["--tasks", "synthetic-linear", "--methods", "fedavg", "--seeds", "1", "--rounds", "3",
            "--clients", "4", "--out", str(out)]
    assert compare.main(args) == 0
    run = run_dir(out, "synthetic-linear", "fedavg", 0)
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 3
    # pretend it was killed after round 2: checkpoint at 2, no summary
    (run / "summary.json").unlink()
    for kind in ("state", "optimizer"):
        (run / "checkpoint" / f"{kind}-000003.npz").rename(run / "checkpoint" / f"{kind}-000002.npz")
    meta["round"] = 2
    (run / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    seen = []
    real = compare.run_one

    def spy(job):
        seen.append(job)
        return real(job)

    monkeypatch.setattr(compare, "run_one", spy)
    assert compare.main(args) == 0
    assert len(seen) == 1 and (run / "summary.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["round"] == 3


def test_bad_method_stops_before_any_run(tmp_path, capsys):
    assert compare.main(["--tasks", "synthetic-linear", "--methods", "nope", "--seeds", "1",
                         "--out", str(tmp_path)]) == 2
    assert "'method'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--tasks", "synthetic-linaer", "--methods", "fedavg"], "did you mean 'synthetic-linear'?"),
    (["--tasks", "synthetic-linear", "--methods", "fedag"], "did you mean 'fedavg'?"),
    (["--tasks", "synthetic-linear", "--methods", "fedavg", "--set", "num-adaptor=2"], "did you mean 'num-adaptors'?"),
])
def test_misspelled_names_get_a_suggestion_and_nothing_runs(tmp_path, capsys, args, fragment):
    assert compare.main(args + ["--seeds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_changed_budget_or_setting_runs_again_instead_of_reusing(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["--tasks", "synthetic-linear", "--methods", "fedavg", "--seeds", "1", "--clients", "4", "--out", str(out)]
    assert compare.main(base + ["--rounds", "2"]) == 0
    capsys.readouterr()
    assert compare.main(base + ["--rounds", "3"]) == 0  # another budget: a new run, not the old one
    log = capsys.readouterr().out
    assert "1 runs (0 already finished, 1 to do)" in log and "reusing" not in log
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [int(r["rounds"]) for r in rows] == [3]
    assert compare.main(base + ["--rounds", "3", "--set", "lr=0.05"]) == 0  # another setting too
    assert "1 runs (0 already finished, 1 to do)" in capsys.readouterr().out
    assert compare.main(base + ["--rounds", "2"]) == 0  # the first config again: its run is reused
    log = capsys.readouterr().out
    assert "1 runs (1 already finished, 0 to do)" in log and "reusing 1 finished run(s)" in log
    assert len(list((out / "runs").iterdir())) == 3


def test_the_config_key_covers_every_resolved_key_but_placement():
    from floral_flwr.config import parse_run_config

    resolved = parse_run_config({"task": "synthetic-linear"}).to_dict()
    key = compare.config_key(resolved, 4)
    assert compare.config_key(resolved, 5) != key
    for k, v in resolved.items():
        changed = {**resolved, k: f"{v}x"}
        if k in ("output-dir", "run-name", "resume"):
            assert compare.config_key(changed, 4) == key, k
        else:
            assert compare.config_key(changed, 4) != key, k


@pytest.mark.parametrize("task,rounds", [("digits-rotate", 20), ("synthetic-linear", 100), ("synthetic-mlp", 40)])
def test_quick_budgets(task, rounds):
    assert compare.quick_rounds(task) == rounds
