"""A research tool must never report a wrong number as a right one: diverged runs, checkpoints, resumes, empty
splits and damaged inputs each end in a clear message, and nothing already written is corrupted."""

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from protein_performer.training import ProteinDataModule, ProteinLMModule
from protein_performer.training.callbacks import NonFiniteGuard

TINY = Path(__file__).resolve().parents[1] / "configs" / "cpu" / "tiny.yaml"


def fit_args(data, root, *extra):
    return ["fit", "--config", TINY, "--data.data_dir", data, "--trainer.default_root_dir", root,
            "--trainer.logger.init_args.save_dir", root, "--data.max_len", "64", "--data.batch_size", "4", *extra]


def finite(path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_diverged_run_stops_naming_the_step(prepared, tmp_path, cli):
    code, err = cli(fit_args(prepared, tmp_path, "--model.lr", "1e3", "--trainer.max_steps", "30",
                             "--trainer.val_check_interval", "10"))
    assert code == 2 and "training diverged at step" in err and "--model.on_nonfinite skip" in err
    step = int(err.split("training diverged at step ")[1].split(":")[0])
    assert 0 < step < 30
    for ckpt in tmp_path.rglob("*.ckpt"):  # whatever was written before the divergence is finite
        assert finite(ckpt), ckpt


class NaNAtStep(ProteinLMModule):
    """The loss of one step is NaN (as if a batch overflowed), every other step is sound."""

    bad_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.bad_step else loss


def test_skip_mode_drops_the_bad_step_and_counts_it(prepared, tmp_path):
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    guard = NonFiniteGuard("skip")
    module = NaNAtStep("tiny", on_nonfinite="skip", config={"attention": "favor-relu", "dropout": 0.0})
    dm = ProteinDataModule(str(prepared), max_len=64, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[Snapshot()])
    module.configure_callbacks = lambda: [guard]
    trainer.fit(module, dm)
    assert guard.skipped == 1
    after_bad = snapshots[4]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], after_bad))  # the NaN step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # the steps around it did
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_last_checkpoint_after_every_validation(prepared, tmp_path, cli):
    """lr 0: validation perplexity never improves, yet last.ckpt follows every validation (and the end of fit)."""
    code, err = cli(fit_args(prepared, tmp_path, "--model.lr", "0", "--trainer.max_steps", "25",
                             "--trainer.val_check_interval", "10", "--model.redraw_every", "0",
                             "--model.config.dropout", "0"))
    assert code == 0, err
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 25
    best = list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and "step10" in best[0].name  # equal perplexities: the first stays best


def metrics_steps(root) -> list[int]:
    with open(next(root.rglob("metrics.csv"))) as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f)})


def test_resume_keeps_the_earlier_metrics(prepared, tmp_path, cli):
    args = fit_args(prepared, tmp_path, "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "5",
                    "--trainer.logger.init_args.version", "run")
    assert cli([*args, "--trainer.max_steps", "20"])[0] == 0
    first = metrics_steps(tmp_path)
    code, err = cli([*args, "--trainer.max_steps", "30", "--ckpt_path", "last"])
    assert code == 0, err
    steps = metrics_steps(tmp_path)
    assert set(first) <= set(steps) and max(steps) > max(first)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("val/ppl")]) == 3  # validations at 10, 20, 30: none lost, none twice


def test_an_empty_split_is_named(tmp_path, cli, prepared_from):
    rng = np.random.default_rng(0)
    data = prepared_from(tmp_path / "data", {"train": [rng.integers(0, 20, 30).astype(np.uint8) for _ in range(8)],
                                            "valid": [], "test": []})
    code, err = cli(fit_args(data, tmp_path))
    assert code == 2 and "split 'valid' is empty" in err and "0 sequences" in err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip"])
def test_an_empty_or_truncated_checkpoint_is_refused_by_test(prepared, tmp_path, cli, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    code, err = cli(["test", "--config", TINY, "--data.data_dir", prepared, "--ckpt_path", bad])
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


def test_a_diverged_checkpoint_is_refused_by_test(prepared, tmp_path, cli):
    assert cli(fit_args(prepared, tmp_path, "--trainer.max_steps", "2"))[0] == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["model.head.weight"][:] = math.nan
    torch.save(ckpt, tmp_path / "nan.ckpt")
    code, err = cli(["test", "--config", TINY, "--data.data_dir", prepared, "--ckpt_path", tmp_path / "nan.ckpt",
                     "--trainer.logger", "false"])
    assert code == 2 and "not finite" in err and "model.head.weight" in err


def test_a_checkpoint_of_release_0_1_is_evaluated(prepared, tmp_path, cli):
    """0.1 saved model fields in a model_args dict, named exact attention "softmax" and the MLP layers mlp.0/mlp.2;
    `test --ckpt_path` reads its hyperparameters into the config, so they must upgrade too."""
    assert cli(fit_args(prepared, tmp_path, "--trainer.max_steps", "2", "--model.config.attention", "exact"))[0] == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    ckpt["hyper_parameters"] = {**{k: v for k, v in hp.items() if k not in ("config", "on_nonfinite", "init_from")},
                                "attention": "softmax", "model_args": {"dropout": hp["config"]["dropout"]}}
    ckpt["protein_performer"]["version"] = "0.1.0"
    ckpt["protein_performer"]["model_config"]["attention"] = "softmax"
    for key in [k for k in ckpt["state_dict"] if ".mlp." in k]:
        old = key.replace("mlp.fc.", "mlp.0.").replace("mlp.proj.", "mlp.2.")
        ckpt["state_dict"][old] = ckpt["state_dict"].pop(key)
    torch.save(ckpt, tmp_path / "old.ckpt")
    code, err = cli(["test", "--config", TINY, "--data.data_dir", prepared, "--ckpt_path", tmp_path / "old.ckpt",
                     "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path / "eval"])
    assert code == 0, err
    assert "exact" in (tmp_path / "eval" / "report" / "report.json").read_text()


@pytest.mark.parametrize("damage", ["truncate tokens", "foreign byte"])
def test_damaged_data_is_one_clear_line(tmp_path, cli, prepared_from, damage):
    rng = np.random.default_rng(0)
    seqs = {s: [rng.integers(0, 20, 30).astype(np.uint8) for _ in range(8)] for s in ("train", "valid")}
    data = prepared_from(tmp_path / "data", seqs)
    tokens = data / "valid" / "tokens.bin"
    if damage == "truncate tokens":
        tokens.write_bytes(tokens.read_bytes()[:-5])
    else:
        tokens.write_bytes(tokens.read_bytes()[:3] + bytes([200]) + tokens.read_bytes()[4:])
    code, err = cli(fit_args(data, tmp_path))
    assert code == 2 and str(tokens.parent) in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1 and "Traceback" not in err


def small_fit(prepared, tmp_path, callbacks=(), **trainer_kw):
    from protein_performer.training import BestAndLastCheckpoint

    module = ProteinLMModule("tiny", redraw_every=0, config={"attention": "favor-relu", "dropout": 0.0})
    dm = ProteinDataModule(str(prepared), max_len=64, batch_size=16, num_workers=0)
    every = trainer_kw.pop("every_n_train_steps", None)  # a series of step checkpoints, as for `agreement`
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path / "checkpoints", monitor=None if every else "val/ppl", mode="min",
                                 save_last=True, save_top_k=-1 if every else 1, filename="best-step{step}",
                                 auto_insert_metric_name=False, every_n_train_steps=every)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[*callbacks, ckpt], default_root_dir=tmp_path,
                        **trainer_kw)
    trainer.fit(module, dm)
    return trainer


def test_no_checkpoint_from_non_finite_weights(prepared, tmp_path):
    """Weights that turned NaN between checks (as on a GPU, where the guard reads its flag at logging steps):
    the step checkpoint due then is not written and the run stops, naming the parameters."""

    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 10:  # runs before the checkpoint callback, which Lightning calls last
                with torch.no_grad():
                    pl_module.model.head.weight[0, 0] = float("nan")

    from protein_performer.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="model.head.weight"):
        small_fit(prepared, tmp_path, [Poison()], max_steps=20, every_n_train_steps=5, limit_val_batches=0)
    written = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert written and not any("step10" in name for name in written)
    assert all(finite(tmp_path / "checkpoints" / name) for name in written)


def test_validation_once_per_epoch_keeps_best_and_last(prepared, tmp_path):
    """Lightning's default schedule (validation at each epoch's end, where it saves top-k): both files appear."""
    trainer = small_fit(prepared, tmp_path, max_epochs=2, limit_val_batches=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-step") for n in names), names
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == trainer.global_step
