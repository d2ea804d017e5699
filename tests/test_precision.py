"""`precision: null` on both kinds of CPU: bf16-mixed where bf16 matrix products beat fp32 (AMX-BF16, or measured),
fp32 elsewhere. Any machine acts as either kind through PROTEIN_PERFORMER_CPU_BF16, which protein_performer/machine.py
(the one reader of the capability) puts before the CPU's flags and the measurement; the other tests fix their
precision, so the suite passes on both kinds."""

import csv
import json
import math
import sys

import pytest
import torch
import yaml
from conftest import TINY

from protein_performer import machine
from protein_performer.errors import UserError
from protein_performer.training.lightning_cli import auto_precision, build_cli


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["protein-performer"])  # pytest's own arguments are not the CLI's


def test_the_capability_is_measured_unless_forced_and_reported(monkeypatch):
    monkeypatch.delenv(machine.BF16_ENV, raising=False)
    info = machine.machine_info()
    speedup = machine.bf16_matmul_speedup()
    assert speedup > 0 and info["bf16_matmul_speedup"] == round(speedup, 2) and not info["bf16_forced"]
    assert info["bf16_fast"] == (info["amx_bf16"] or speedup >= machine.FAST_BF16)
    assert f"bf16 products {info['bf16_matmul_speedup']}x fp32;" in machine.machine_line(info)
    for value, fast in (("fast", True), ("slow", False)):
        monkeypatch.setenv(machine.BF16_ENV, value)
        info = machine.machine_info()
        assert machine.cpu_bf16()[0] is fast and info["bf16_fast"] is fast and info["bf16_forced"]
        assert f"(taken as {value}: forced by {machine.BF16_ENV})" in machine.machine_line(info)
    monkeypatch.setenv(machine.BF16_ENV, "yes")
    with pytest.raises(UserError, match=machine.BF16_ENV):
        machine.cpu_bf16()


@pytest.mark.parametrize("amx, speedup, fast", [(False, 0.58, False), (False, 1.49, False), (False, 2.3, True),
                                                (True, 0.58, True)])
def test_unforced_choice_is_amx_or_the_measured_speedup(amx, speedup, fast, monkeypatch):
    monkeypatch.delenv(machine.BF16_ENV, raising=False)
    monkeypatch.setattr(machine, "bf16_matmul_speedup", lambda: speedup)
    monkeypatch.setattr(machine, "has_amx_bf16", lambda flags=None: amx)
    assert machine.cpu_bf16()[0] is fast
    assert auto_precision("cpu")[0] == ("bf16-mixed" if fast else "32-true")


@pytest.mark.parametrize("kind, expected", [("fast", "bf16-mixed"), ("slow", "32-true")])
def test_precision_null_follows_the_cpu(kind, expected, monkeypatch, tmp_path):
    monkeypatch.setenv(machine.BF16_ENV, kind)
    assert auto_precision("cpu")[0] == expected
    with torch.device("meta"):
        cli = build_cli(["--config", str(TINY), "--trainer.precision", "null", "--data.data_dir", str(tmp_path)],
                        run=False)
    assert cli.trainer.precision == expected
    # a precision given explicitly is kept on either kind
    with torch.device("meta"):
        cli = build_cli(["--config", str(TINY), "--data.data_dir", str(tmp_path)], run=False)
    assert cli.trainer.precision == "32-true"


def test_bf16_mixed_training_on_a_cpu_with_fast_bf16(prepared, tmp_path, monkeypatch, cli):
    """What `precision: null` does on a CPU with fast bf16 products, end to end: bf16-mixed fit and validation with
    finite metrics, and a checkpoint of float32 weights (mixed precision keeps float32 master weights) that `test`
    reads."""
    monkeypatch.setenv(machine.BF16_ENV, "fast")
    common = ["--config", TINY, "--data.data_dir", prepared, "--trainer.precision", "null",
              "--trainer.default_root_dir", tmp_path, "--trainer.logger.init_args.save_dir", tmp_path,
              "--trainer.enable_model_summary", "false", "--data.max_len", "64", "--data.batch_size", "4"]
    code, err = cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                     "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"])
    assert code == 0, err
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    for key in ("train/loss", "val/loss", "val/ppl"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(math.isfinite(v) for v in values), (key, rows)
    last = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    code, err = cli(["test", *common, "--trainer.logger.init_args.save_dir", tmp_path / "eval", "--ckpt_path", last])
    assert code == 0, err
    report = json.loads(next((tmp_path / "eval").rglob("report.json")).read_text())
    assert all(math.isfinite(r["ppl"]) and r["tokens"] > 0 for r in report["results"].values())
