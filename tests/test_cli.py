"""The CLI: every config parses and builds, fit -> test end to end on the bundled sample, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from protein_performer.prepared import TOKENS_FILE
from protein_performer.training.lightning_cli import auto_precision, build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY = str(ROOT / "configs/cpu/tiny.yaml")


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["protein-performer"])  # pytest's own arguments are not the CLI's


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_builds(config):
    with torch.device("meta"):  # the 36-layer models are built without allocating their weights
        cli = build_cli(["--config", str(config)], run=False)
    cfg, n = cli.model.config, cli.model.model.num_parameters()
    assert cli.datamodule.objective == cli.model.hparams.objective  # linked
    declared = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("precision")
    # a fixed precision is kept; null picks what this machine does best (both choices: test_precision_null_*)
    assert cli.trainer.precision == (auto_precision("auto")[0] if declared is None else declared)
    assert cli.trainer.gradient_clip_val == 0.5
    if cfg.name == "paper-36l":
        assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.max_len) == (36, 512, 8, 1024, 1024)
        assert n == pytest.approx(76.2e6, rel=0.01)
        assert config.stem.split("-", 1)[1] == {"exact": "transformer", "favor-relu": "performer-relu",
                                                 "favor-softmax": "performer-softmax"}[cfg.attention]
        assert cfg.causal == (config.stem.split("-")[0] == "causal")
    if config.stem.startswith("concat"):
        assert cli.datamodule.mode == "concatenated" and cfg.max_len == 8192


def test_paper_configs_cover_table_2():
    names = {p.stem for p in (ROOT / "configs/paper").glob("*.yaml")}
    kinds = ("transformer", "performer-relu", "performer-softmax")
    assert {f"{o}-{k}" for o in ("masked", "causal") for k in kinds} <= names
    assert {"concat-performer", "concat-transformer"} <= names


def fit_args(data_dir, root, *extra):
    return ["fit", "--config", TINY, "--data.data_dir", str(data_dir), "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), *extra]


def test_missing_data_dir_is_a_clear_error(tmp_path, cli):
    code, err = cli(fit_args(tmp_path / "nowhere", tmp_path))
    assert code == 2 and "protein-performer fit: error:" in err and "nowhere" in err


def test_missing_split_file_is_a_clear_error(tmp_path, cli, make_prepared):
    data = make_prepared(tmp_path / "data")
    (data / "valid" / TOKENS_FILE).unlink()
    code, err = cli(fit_args(data, tmp_path))
    assert code == 2 and "valid/tokens.bin: missing" in err


def test_unknown_attention_kind_is_a_clear_error(tmp_path, cli):
    config = tmp_path / "bad.yaml"
    config.write_text(Path(TINY).read_text().replace("attention: favor-softmax", "attention: linformer"))
    code, err = cli(["fit", "--config", config, "--data.data_dir", tmp_path])
    assert code == 2 and "model.config.attention" in err and "linformer" in err


@pytest.mark.parametrize("override, words", [
    (["--model.d_modl", "128"], ["d_modl"]),  # a typo inside the model options
    (["--model.config.d_model", "wide"], ["model.config.d_model", "wide"]),  # a wrong type
    (["--model.config.d_model", "0"], ["--model.config", "d_model = 0", "positive"]),  # a value out of range
    (["--model.preset", "huge"], ["model.preset", "huge"]),  # an unknown preset
    (["--model.d_model", "128"], ["--model.d_model was renamed --model.config.d_model"]),  # the 0.2 spelling
])
def test_model_option_errors_are_argument_errors(tmp_path, cli, override, words):
    code, err = cli(fit_args(tmp_path, tmp_path, *override))
    assert code == 2 and all(w in err for w in words), err


def test_per_field_model_overrides_are_typed(tmp_path):
    """`--model.config.d_model 128` reaches the model as an int (0.1's untyped model_args dict broke on strings)."""
    with torch.device("meta"):
        built = build_cli(["--config", TINY, "--model.config.d_model", "128", "--model.config.n_heads", "8",
                           "--model.config.dropout", "0.25", "--model.config.attention", "exact",
                           "--data.data_dir", str(tmp_path)], run=False)
    cfg = built.model.config
    assert (cfg.d_model, cfg.n_heads, cfg.dropout, cfg.attention, cfg.n_layers) == (128, 8, 0.25, "exact", 2)


def run_cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "protein_performer.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_fit_then_test_on_the_sample(sample_dir, tmp_path, monkeypatch):
    """fit with the wandb logger and no credentials (HOME without .netrc, no WANDB_API_KEY, no WANDB_MODE):
    it must go offline by itself; then `test` on the last checkpoint writes the Table-2 report."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE")
    common = ["--config", TINY, "--data.data_dir", str(sample_dir), "--trainer.default_root_dir", str(tmp_path)]
    fit = run_cli("fit", *common, "--trainer.max_steps", "10", "--trainer.val_check_interval", "5",
                  "--trainer.logger", "protein_performer.training.AutoWandbLogger",
                  "--trainer.logger.save_dir", str(tmp_path),
                  cwd=tmp_path)
    # nothing a user cannot act on: Lightning's LeafSpec FutureWarning under torch 2.13, its cloud adverts
    noise = [line for line in fit.stderr.splitlines() if any(w in line for w in ("Warning", "LeafSpec", "💡"))]
    assert not noise, noise
    assert list(tmp_path.glob("wandb/offline-run-*")), "wandb did not write an offline run"
    last = next(tmp_path.rglob("checkpoints/last.ckpt"))
    assert list(last.parent.glob("best-step*.ckpt"))
    ckpt = torch.load(last, weights_only=True)  # plain tensors and types only
    assert ckpt["global_step"] == 10 and any(k.endswith("projection") for k in ckpt["state_dict"])
    proc = run_cli("test", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "eval"),
                   "--ckpt_path", str(last), cwd=tmp_path)
    assert "| masked | test |" in proc.stdout + proc.stderr
    report = json.loads(next((tmp_path / "eval").rglob("report.json")).read_text())
    assert set(report["results"]) == {"test", "ood"}
    for r in report["results"].values():
        assert r["tokens"] > 0 and 1.0 < r["ppl"] < 29.0 and 10.0 < r["baseline_ppl"] < 25.0
    assert report["meta"]["attention"] == "favor-softmax" and report["meta"]["objective"] == "masked"


def test_logger_switch_from_wandb_to_csv():
    config = str(ROOT / "configs/paper/masked-performer-relu.yaml")
    with torch.device("meta"):
        cli = build_cli(["--config", config, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger"], run=False)
    assert type(cli.trainer.logger).__name__ == "CSVLogger"
    assert cli.trainer.logger.save_dir == "runs/paper/masked-performer-relu"


def test_report_joins_runs_into_table_2(tmp_path, cli, capsys):
    from protein_performer.evaluate import write_report

    r = {"acc": 0.3158, "ppl": 9.17, "baseline_acc": 0.0992, "baseline_ppl": 17.80, "tokens": 1000.0}
    for kind in ("favor-relu", "softmax"):  # "softmax": how 0.1 named exact attention in its reports
        write_report(tmp_path / kind, {"test": r, "ood": r}, {"attention": kind, "objective": "causal"})
    md = (tmp_path / "softmax" / "report.md").read_text()
    assert "| causal | test | 31.58 / 9.17 | 9.92 / 17.80 | 1,000 |" in md
    assert cli(["report", tmp_path / "favor-relu" / "report.json", tmp_path / "softmax" / "report.json"])[0] == 0
    out = capsys.readouterr().out
    assert "| objective | task | set | Transformer | Performer (ReLU) | unigram baseline |" in out
    assert "| causal | single, L = 1024 | test | 31.58 / 9.17 | 31.58 / 9.17 | 9.92 / 17.80 |" in out
    assert out.rstrip().endswith("cells: accuracy % / perplexity; baseline: unigram frequencies of train, "
                                 "Laplace alpha = 1")  # the console says which number is which
    # the concatenated task has rows of its own; two reports for one cell are refused, naming both
    write_report(tmp_path / "concat", {"test": r}, {"attention": "favor-relu", "objective": "causal",
                                                    "task": "concatenated, L = 8192"})
    paths = [tmp_path / d / "report.json" for d in ("favor-relu", "concat")]
    assert cli(["report", *paths])[0] == 0
    assert "| causal | concatenated, L = 8192 | test | 31.58 / 9.17 | 9.92 / 17.80 |" in capsys.readouterr().out
    code, err = cli(["report", paths[0], paths[0]])
    assert code == 2 and "one cell, two numbers" in err and str(paths[0]) in err
    assert cli(["report", *paths, "--json"])[0] == 0  # what scripts read (scripts/demo.sh)
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["split"], r["ppl"], r["beats_baseline"]) for r in rows] == [
        ("single, L = 1024", "test", 9.17, True), ("single, L = 1024", "ood", 9.17, True),
        ("concatenated, L = 8192", "test", 9.17, True)]


def test_report_errors_name_the_file(tmp_path, cli):
    (tmp_path / "bad.json").write_text("{}")
    code, err = cli(["report", tmp_path / "bad.json"])
    assert code == 2 and "bad.json" in err and "report.json" in err
    code, err = cli(["report"])
    assert code == 2 and "reports" in err
