"""benchmarks/redraw.py (issue 26, feature redrawing): the pure functions that turn runs' validations into the table."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "redraw.py"


@pytest.fixture(scope="module")
def redraw():
    sys.path.insert(0, str(BENCH.parent))  # the script imports results_io as a sibling, as when it runs
    try:
        spec = importlib.util.spec_from_file_location("redraw_report", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def long_form(rows):
    return pd.DataFrame(rows, columns=["setting", "seed", "step", "val/ppl"])


def test_settings_sorted_exact_then_m_then_rarer_redraws(redraw):
    settings = ["m256-every10", "m16-every10", "exact", "m16-never", "m256-never", "m16-every100"]
    assert sorted(settings, key=redraw.setting_order) == [
        "exact", "m16-never", "m16-every100", "m16-every10", "m256-never", "m256-every10"]


def test_run_names_parsed(redraw):
    match = redraw.RUN.fullmatch("m16-every100-seed1")
    assert (match["setting"], match["m"], match["redraw"], match["seed"]) == ("m16-every100", "16", "every100", "1")
    assert redraw.RUN.fullmatch("exact-seed0")["setting"] == "exact"
    assert redraw.RUN.fullmatch("prepared") is None and redraw.RUN.fullmatch("fresh") is None


def test_summary_mean_and_half_range_over_seeds(redraw):
    long = long_form([
        ("exact", 0, 10, 18.0), ("exact", 0, 20, 17.0), ("exact", 1, 10, 18.2), ("exact", 1, 20, 17.4),
        ("m16-never", 0, 10, 19.0), ("m16-never", 0, 20, 18.0),
        ("m16-never", 1, 10, 19.0),  # seed 1 stopped early: the final column is at the last step both reached
    ])
    table = redraw.summary(long, [10]).set_index("setting")
    assert table.loc["exact", "step 10"] == "18.100 ± 0.100"
    assert table.loc["exact", "final"] == "17.200 ± 0.200" and table.loc["exact", "per seed"] == "17.000 / 17.400"
    assert table.loc["m16-never", "steps"] == 10 and table.loc["m16-never", "final"] == "19.000 ± 0.000"


def test_paired_differences_same_seed(redraw):
    long = long_form([
        ("exact", 0, 20, 17.0), ("exact", 1, 20, 17.5),
        ("m16-never", 0, 20, 18.0), ("m16-never", 1, 20, 18.5),
        ("m16-every10", 0, 20, 17.5), ("m16-every10", 1, 20, 18.7),
    ])
    table = redraw.paired(long)
    row = table[(table["setting"] == "m16-every10") & (table["minus"] == "never redrawn")].iloc[0]
    assert row["per seed"] == "-0.500 / +0.200" and row["mean"] == "-0.150"
    never = table[(table["setting"] == "m16-never") & (table["minus"] == "exact")].iloc[0]
    assert never["mean"] == "+1.000"
    assert not ((table["setting"] == "m16-never") & (table["minus"] == "never redrawn")).any()


def test_uniform_attention_rows_from_the_gap_curve(redraw, tmp_path):
    """The controls come from attention_gap.py's gap.csv: each run's last checkpoint, as trained and uniform."""
    (tmp_path / "report").mkdir()
    pd.DataFrame([("exact-seed0", 100, 18.0, 18.1), ("exact-seed0", 360, 17.8, 17.9), ("exact-seed1", 360, 17.4, 17.7)],
                 columns=["run", "step", "val/ppl", "uniform"]).to_csv(tmp_path / "report" / "gap.csv", index=False)
    table = redraw.fresh_table(tmp_path).set_index("run")
    assert table.loc["exact-seed0", ["own", "changed"]].tolist() == [17.8, 17.9]
    assert table.loc["exact-seed1", ["own", "changed"]].tolist() == [17.4, 17.7]
    assert (table["validated with"] == "uniform attention (q = k = 0)").all()
