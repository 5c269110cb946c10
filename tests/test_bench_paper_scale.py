"""The paper-scale benchmark's arithmetic: per-round median, 500-round extrapolation, order.

Fast, no data: the helpers are pure, checked against sums written out by hand here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_paper_scale", ROOT / "benchmarks" / "bench_paper_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bps = _load()


def test_middle_median_leaves_out_the_setup_and_the_evaluation_round():
    # round 1 (set-up) and round 5 (evaluation) are far off; the middle is 0.3, 0.5, 0.4
    assert bps.middle_median([9.0, 0.3, 0.5, 0.4, 30.0]) == pytest.approx(0.4)
    # an even number of middle rounds: the mean of the two central ones
    assert bps.middle_median([9.0, 0.2, 0.6, 0.4, 0.8, 30.0]) == pytest.approx(0.5)


def test_middle_median_needs_three_rounds():
    with pytest.raises(ValueError, match=">= 3 rounds"):
        bps.middle_median([1.0, 2.0])


def test_extrapolate_keeps_the_measured_ends_and_repeats_the_median_middle():
    # 2 s before round 1 and 1 s after the last round (start-up / end-of-run work)
    rounds = [7.0, 0.30, 0.50, 0.40, 0.40, 5.0]
    wall = 2.0 + sum(rounds) + 1.0
    # independent: start-up + round 1 + 498 median rounds + evaluation round + end
    expected = 2.0 + 7.0 + 498 * 0.40 + 5.0 + 1.0
    assert bps.extrapolate(wall, rounds, 500) == pytest.approx(expected)


def test_extrapolate_to_the_measured_length_with_equal_middle_rounds_is_the_wall_time():
    rounds = [3.0, 0.25, 0.25, 0.25, 2.0]
    wall = sum(rounds) + 0.5
    assert bps.extrapolate(wall, rounds, len(rounds)) == pytest.approx(wall)


def test_extrapolate_rejects_a_target_without_middle_rounds():
    with pytest.raises(ValueError, match="target_rounds"):
        bps.extrapolate(10.0, [1.0, 1.0, 1.0], 2)


def test_alternating_order_gives_each_method_each_position():
    methods = ("fedavg", "floral")
    assert bps.alternating(methods, 0) == ["fedavg", "floral"]
    assert bps.alternating(methods, 1) == ["floral", "fedavg"]
    assert bps.alternating(methods, 2) == ["fedavg", "floral"]


def test_read_round_seconds_sorts_by_round(tmp_path):
    (tmp_path / "rounds.csv").write_text(
        "round,elapsed-s,round-s,train-loss\n2,7.5,0.5,1.0\n1,7.0,7.0,2.0\n3,9.0,1.5,0.9\n")
    assert bps.read_round_seconds(tmp_path) == [7.0, 0.5, 1.5]


def test_run_config_text_quotes_strings_only():
    text = bps.run_config_text({"task": "fmnist-label-shift", "num-server-rounds": 10, "lr": 0.1,
                                "persist-client-state": False})
    assert text == "task='fmnist-label-shift' num-server-rounds=10 lr=0.1 persist-client-state=false"
    from floral_flwr.preflight import parse_cli_run_config

    # the launch's own parser reads it back unchanged
    assert parse_cli_run_config(text) == {"task": "fmnist-label-shift", "num-server-rounds": 10, "lr": 0.1,
                                          "persist-client-state": False}


def test_public_argv_hides_machine_paths():
    import argparse

    args = argparse.Namespace(data_dir="/data/fmnist", table_runs="/sweeps/t/runs", markdown="/tmp/x/out.md",
                              json="")
    argv = ["/abs/path/benchmarks/bench_paper_scale.py", "--data-dir", "/data/fmnist", "--table-runs",
            "/sweeps/t/runs", "--rounds", "25", "--markdown", "/tmp/x/out.md"]
    assert bps.public_argv(argv, args) == ("benchmarks/bench_paper_scale.py --data-dir DIR --table-runs "
                                           "SWEEP/runs --rounds 25 --markdown out.md")


def test_round_durations_from_a_clock_read_at_every_round_end():
    # clock at start 10.0, rounds end at 12.5, 13.0, 14.5: round 1 holds the set-up
    assert bps.round_durations(10.0, [12.5, 13.0, 14.5]) == pytest.approx([2.5, 0.5, 1.5])
