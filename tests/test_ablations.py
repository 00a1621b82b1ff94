"""The statistics of `python -m benchmarks ablations` (the runs themselves take an hour: not here)."""

from __future__ import annotations

import math

import pytest

from benchmarks.ablations import mean_interval, summarize, verdict


def test_mean_and_95_percent_t_interval():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # t(2) = 4.303
    assert math.isnan(mean_interval([0.5])[1])


def test_verdict_names_the_side_of_zero_and_knows_lower_is_better():
    assert verdict(0.10, 0.05) == "reproduced"
    assert verdict(0.10, 0.20) == "interval includes 0"
    assert verdict(-0.10, 0.05) == "opposite"
    assert verdict(-2.0, 1.0, higher_is_better=False) == "reproduced"  # median rank fell
    assert verdict(0.1, float("nan")) == "one seed: no interval"


def test_comparisons_pair_runs_of_the_same_seed():
    metrics = {"t2v_R5": 0.0, "t2v_MdR": 10.0, "mc_accuracy": 0.2}
    results = [{"variant": "default", "seed": s, "t2v_R1": 0.2 + 0.1 * s, **metrics} for s in (0, 1, 2)]
    results += [{"variant": "no_pretrain", "seed": s, "t2v_R1": 0.1 + 0.1 * s, **metrics} for s in (0, 1, 2)]
    table, comparisons = summarize(results, [0, 1, 2])
    assert [row["variant"] for row in table] == ["default", "no_pretrain"]
    (row,) = comparisons  # only default vs no_pretrain has both sides
    mean, half, said = row["t2v_R1"]
    # Unpaired, the seeds' spread (0.1 per seed) would swamp the difference; paired it is exact.
    assert mean == pytest.approx(0.1) and half == pytest.approx(0.0, abs=1e-12) and said == "reproduced"
    assert row["t2v_MdR"][2] == "interval includes 0"


def test_benchmarks_help_lists_every_benchmark_and_all_leaves_out_the_hour_long_ones():
    # A '%' in a module's first doc line once broke argparse's --help.
    import subprocess
    import sys

    from benchmarks.__main__ import BENCHMARKS, BY_NAME_ONLY
    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())   # argparse wraps long help lines
    assert all(name in text for name in BENCHMARKS)
    assert f"but {', '.join(sorted(BY_NAME_ONLY))}" in text
