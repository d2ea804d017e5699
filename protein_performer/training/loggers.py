"""Loggers: wandb that never waits for a login, and a CSV logger that a resumed run appends to."""

from __future__ import annotations

import csv
import netrc
import os
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def wandb_credentials() -> bool:
    """True when wandb could authenticate: WANDB_API_KEY, or a ~/.netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class AutoWandbLogger(WandbLogger):
    """WandbLogger that runs offline unless credentials exist, so a run never waits for a login or network.

    offline=None decides from the environment (WANDB_MODE=offline/disabled is respected); offline runs are
    synced later with `wandb sync DIR`.
    """

    def __init__(self, project: str = "protein-performer", offline: bool | None = None, **kwargs):
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled") or not wandb_credentials()
        if offline and os.environ.get("WANDB_MODE") != "disabled":
            os.environ["WANDB_MODE"] = "offline"
        super().__init__(project=project, offline=offline, **kwargs)


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed fit (--ckpt_path with the same logger version) keeps the
    rows of metrics.csv up to the checkpoint's step instead of deleting the file (callbacks.ResumeCSVLogs tells
    it the step); rows logged after that step by the interrupted run are dropped, as the resumed run redoes them."""

    def resume_at(self, step: int) -> None:
        self._resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self)
        return self._experiment


class _KeepingWriter(ExperimentWriter):
    """Overrides private ExperimentWriter parts (checked by tests/test_lightning_private.py)."""

    def __init__(self, log_dir: str, logger: CSVLogger):
        self.logger = logger
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # decided at the first save, once we know if this run resumes
        self._fresh = True

    def save(self) -> None:
        if self._fresh and os.path.isfile(self.metrics_file_path):
            step = getattr(self.logger, "_resume_step", None)
            rows = []
            if step is not None:
                with open(self.metrics_file_path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= step]
            os.remove(self.metrics_file_path)
            if rows:
                self.metrics = [{k: v for k, v in r.items() if v != ""} for r in rows] + self.metrics
        self._fresh = False
        super().save()
