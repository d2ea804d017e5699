"""The reports of issue 26's sections 2 and 3: benchmarks/attention_gap.py (the uniform-attention gap of every
checkpoint, and the conversion's share of attention's gain) and benchmarks/variants.py (perplexity at equal steps
and equal training time)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, TINY, run_cli

from protein_performer.model import Config, ProteinLM

BENCHMARKS = REPO / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import results_io as a sibling, as when they run
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_report", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def gap():
    return load("attention_gap")


@pytest.fixture(scope="module")
def variants():
    return load("variants")


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_attention_averages_what_each_position_sees(gap, causal):
    """q = k = 0 makes every score equal: row i weighs each of the n keys it sees by 1 / n (all L bidirectional,
    the prefix i + 1 causal), whatever the tokens. Exact softmax of equal scores: float32 round-off only."""
    torch.manual_seed(0)
    model = ProteinLM(Config.from_name("tiny", causal=causal, attention="exact", max_len=16))

    class Holder(torch.nn.Module):  # the attribute the report reads (a ProteinLMModule's `model`)
        def __init__(self):
            super().__init__()
            self.model = model

    with torch.no_grad():  # sharp attention first, so that a uniform result can only come from q = k = 0
        for name, weight in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                weight.normal_(std=1.0)
    tokens = torch.randint(4, 24, (2, 11))
    seen = torch.tril(torch.ones(11, 11)) if causal else torch.ones(11, 11)
    expected = seen / seen.sum(-1, keepdim=True)
    assert (model.attention_maps(tokens) - expected).abs().max() > 0.1
    gap.uniform(Holder())
    maps = model.attention_maps(tokens)  # (n_layers, B, H, L, L)
    torch.testing.assert_close(maps, expected.expand_as(maps), rtol=0, atol=1e-6)


def test_share_of_gain_kept_closed_form(gap):
    assert gap.kept(10.0, parent=10.0, flat=12.0) == 1.0  # the parent's perplexity keeps all of it
    assert gap.kept(12.0, parent=10.0, flat=12.0) == 0.0  # uniform attention's keeps none
    assert gap.kept(11.5, parent=10.0, flat=12.0) == 0.25
    assert gap.kept(12.5, parent=10.0, flat=12.0) == -0.25  # worse than uniform attention


@pytest.fixture(scope="module")
def exact_run(prepared, tmp_path_factory) -> Path:
    """A 4-step exact fit validated (and checkpointed) after steps 2 and 4, alone in its RUNS directory."""
    run = tmp_path_factory.mktemp("runs") / "exact"
    code, err = run_cli(["fit", "--config", str(TINY), "--data.data_dir", str(prepared),
                         "--model.config.attention", "exact",
                     "--model.config.dropout", "0", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                     "--checkpoint.save_top_k", "-1", "--trainer.default_root_dir", str(run),
                     "--trainer.logger.init_args.save_dir", str(run), "--trainer.enable_model_summary", "false",
                     "--data.max_len", "64", "--data.batch_size", "4"])
    assert code == 0, err
    return run


def test_gap_curve_validates_each_checkpoint_as_fit_did(gap, exact_run):
    """Every checkpoint validated in the report's process gives the perplexity its `fit` logged at that step (same
    weights, data and float32 precision, so equal to round-off); uniform attention is a real, different model."""
    runs = exact_run.parent
    curve_cmd = [sys.executable, str(BENCHMARKS / "attention_gap.py"), "curve", str(runs), "--parents", "exact",
                 "--choose_from", "exact"]
    out = subprocess.run(curve_cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    curve = pd.read_csv(runs / "report" / "gap.csv")
    logged = gap.validations(runs / "exact")
    assert curve["step"].tolist() == logged["step"].tolist() == [2, 4]
    torch.testing.assert_close(torch.tensor(curve["val/ppl"].values), torch.tensor(logged["val/ppl"].values),
                               rtol=1e-5, atol=0)
    assert (curve["uniform"] != curve["val/ppl"]).all()
    torch.testing.assert_close(torch.tensor(curve["gap"].values),
                               torch.tensor((curve["uniform"] / curve["val/ppl"] - 1).values))
    assert (runs / "report" / "parent").read_text().strip() == "exact"
    assert (runs / "report" / "attention_gap.png").stat().st_size > 0

    # a second call validates only checkpoints it has not seen (by run and file time): a marked row survives it
    marked = curve.assign(**{"val/ppl": [99.0, curve["val/ppl"].iloc[1]]})
    marked.to_csv(runs / "report" / "gap.csv", index=False)
    os.utime(gap.checkpoints(exact_run)[1][1])  # the step-4 checkpoint rewritten: validated again
    again = subprocess.run(curve_cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr
    rerun = pd.read_csv(runs / "report" / "gap.csv")
    assert rerun["val/ppl"].iloc[0] == 99.0
    assert rerun["val/ppl"].iloc[1] == pytest.approx(logged["val/ppl"].iloc[1], rel=1e-5)

    # the conversion report: the parent keeps 100% of its own gain and uniform attention 0%; swaps are validated
    out = subprocess.run([sys.executable, str(BENCHMARKS / "attention_gap.py"), "conversion", str(runs),
                          "--scratch", "exact"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(runs / "report" / "conversion_gap.csv").set_index("model")
    assert table["share of the gain kept"].iloc[:2].tolist() == ["100%", "0%"]
    swaps = table[table.index.str.startswith("swap")]
    assert len(swaps) == len(gap.SWAP_FEATURES) * len(gap.SWAP_SEEDS) + 1 and swaps["val/ppl"].notna().all()


def test_missing_checkpoints_named(gap, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="no checkpoints"):
        gap.checkpoints(tmp_path / "run")


def test_training_minutes_from_cpu_seconds_per_step(variants, exact_run):
    """A real fit of the run's model and data, timed on the CPU clock; minutes at a validation = steps x s/step."""
    seconds = variants.step_seconds(exact_run, steps=3)
    assert 0 < seconds < 30
    frame = variants.timed(exact_run, seconds)
    assert frame["step"].tolist() == [2, 4]
    assert frame["minutes"].tolist() == pytest.approx([2 * seconds / 60, 4 * seconds / 60])
    assert frame["steps/s"].iloc[0] == pytest.approx(1 / seconds)


def test_summary_at_equal_steps_and_equal_time(variants):
    long = pd.DataFrame([
        # exact: 100 steps in 10 min; fs64: 200 steps in 5 min
        ("masked", "exact", 50, 5.0, 18.0), ("masked", "exact", 100, 10.0, 16.0),
        ("masked", "fs64", 100, 2.5, 17.0), ("masked", "fs64", 200, 5.0, 15.0),
    ], columns=["task", "variant", "step", "minutes", "val/ppl"]).assign(**{"steps/s": 1.0})
    table = variants.summary(long).set_index("attention")
    assert table["(steps)"].tolist() == [100, 100] and table["(min)"].tolist() == [5.0, 5.0]
    assert table.loc["exact", "ppl at equal steps"] == 16.0 and table.loc["fs64", "ppl at equal steps"] == 17.0
    assert table.loc["exact", "ppl at equal time"] == 18.0 and table.loc["fs64", "ppl at equal time"] == 15.0


def test_run_names(variants):
    assert variants.RUN.fullmatch("concat-fs256-redraw").group("task", "variant") == ("concat", "fs256-redraw")
    assert variants.RUN.fullmatch("masked-relu")["variant"] == "relu"
    for other in ("masked-exact-d8", "causal-exact-long", "converted-fs64", "prepared", "report"):
        assert variants.RUN.fullmatch(other) is None


def test_seeds_table_at_the_last_step_every_seed_reached(variants):
    long = pd.DataFrame([
        ("concat", "relu", 0, 300, 15.0), ("concat", "relu", 0, 600, 14.8),
        ("concat", "relu", 1, 300, 15.2), ("concat", "relu", 1, 600, 14.6), ("concat", "relu", 2, 300, 15.4),
        ("concat", "exact", 0, 150, 17.8),  # one seed: not in the table
    ], columns=["task", "variant", "seed", "step", "val/ppl"])
    table = variants.seeds(long)
    assert len(table) == 1 and table["steps"].iloc[0] == 300  # seed 2 stopped at 300
    assert table["per seed"].iloc[0] == "15.000 / 15.200 / 15.400"
    assert table["mean"].iloc[0] == 15.2 and table["half range"].iloc[0] == 0.2
    assert variants.RUN.fullmatch("concat-fs64-redraw-seed1").group("variant", "seed") == ("fs64-redraw", "1")
