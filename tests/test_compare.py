"""The comparison runner: tables, plot, and resuming an interrupted sweep without redoing runs."""

from __future__ import annotations

import csv

import pytest
import torch

from floral_flwr import compare

torch.set_num_threads(1)

ARGS = ["--tasks", "synthetic-linear", "--methods", "fedavg", "floral", "--seeds", "2", "--rounds", "2",
        "--clients", "4"]


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
    run = out / "runs" / compare.run_name("synthetic-linear", "floral", 1)
    (run / "summary.json").unlink()
    assert compare.main(ARGS + ["--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "4 runs (3 already finished, 1 to do)" in log
    assert (run / "summary.json").exists()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 4 and all(float(r["value"]) == float(r["value"]) for r in rows)  # no NaN


def test_a_run_interrupted_mid_way_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import json

    out = tmp_path / "cmp"
    args = ["--tasks", "synthetic-linear", "--methods", "fedavg", "--seeds", "1", "--rounds", "3",
            "--clients", "4", "--out", str(out)]
    assert compare.main(args) == 0
    run = out / "runs" / compare.run_name("synthetic-linear", "fedavg", 0)
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


@pytest.mark.parametrize("task,rounds", [("digits-rotate", 20), ("synthetic-linear", 100), ("synthetic-mlp", 40)])
def test_quick_budgets(task, rounds):
    assert compare.quick_rounds(task) == rounds
