"""DDP on CPU: two gloo processes launched through the CLI, as a user would.

After training every rank must hold the same weights and the same FAVOR projections (redrawn during the
run), and validation must count every validation target exactly once across the ranks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from protein_performer.masking import IGNORE
from protein_performer.training import ProteinDataModule, ProteinLMModule

ROOT = Path(__file__).resolve().parents[1]


class DumpRankState(Callback):
    """Saves each rank's model state and validation metrics to DIRPATH/rank<r>.pt at the end of fit.

    Loaded by the CLI subprocess through --trainer.callbacks (tests/ is on its PYTHONPATH)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "metrics": metrics, "world_size": trainer.world_size},
                   Path(self.dirpath) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_identical(tmp_path, sample_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    cmd = [
        sys.executable, "-m", "protein_performer.cli", "fit", "--config", str(ROOT / "configs/cpu/tiny.yaml"),
        "--data.data_dir", str(sample_dir), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--model.redraw_every", "5",
        "--trainer.callbacks+=test_ddp.DumpRankState", f"--trainer.callbacks.dirpath={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    a, b = (r["state"] for r in ranks)
    assert a.keys() == b.keys()
    projections = [k for k in a if k.endswith("projection")]
    assert projections and all(a[k].numel() for k in projections)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The projections were redrawn at step 10 (not the construction-time matrices any more).
    fresh = ProteinLMModule("tiny", config={"attention": "favor-softmax"}).state_dict()
    assert not torch.equal(fresh[projections[0]], a[projections[0]])
    # Every validation target counted once: the two ranks' sum equals a single-process count.
    dm = ProteinDataModule(str(sample_dir), max_len=512, batch_size=8, num_workers=0)
    dm.setup("validate")
    expected = sum(int((batch["targets"] != IGNORE).sum()) for batch in dm.val_dataloader())
    assert ranks[0]["metrics"]["val/tokens"] == ranks[1]["metrics"]["val/tokens"] == expected

    # `test` on more ranks than batches: one batch per split, so rank 1 evaluates a filler batch that counts zero
    # (Lightning would skip its loop and rank 0 would wait for it forever); every sequence is counted once.
    test_cmd = [c for c in cmd if not c.startswith("--trainer.callbacks")]
    test_cmd[test_cmd.index("fit")] = "test"
    test_cmd += ["--ckpt_path", str(next(tmp_path.rglob("last.ckpt"))), "--data.batch_size", "100000",
                 "--trainer.logger.init_args.version", "eval"]
    proc = subprocess.run(test_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(tmp_path.rglob("eval/report/report.json")).read_text())
    dm = ProteinDataModule(str(sample_dir), max_len=512, batch_size=100000, num_workers=0)
    dm.setup("test")
    for split, loader in zip(dm.test_split_names, dm.test_dataloader()):
        assert len(loader) == 1
        assert report["results"][split]["tokens"] == sum(int((b["targets"] != IGNORE).sum()) for b in loader)
