"""The private Lightning methods the project overrides or calls still exist with the signatures it relies on.

ProteinCLI._parse_ckpt_path (training/lightning_cli.py), BestAndLastCheckpoint (training/callbacks.py) and the CSV
logger's writer (training/loggers.py) replace or call methods Lightning does not promise to keep; pyproject.toml pins
lightning below the next minor release, and this test fails loudly, naming the method, if a release in the pinned
range (or a raised bound) changes one of them.
"""

import inspect

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from protein_performer.training.callbacks import BestAndLastCheckpoint
from protein_performer.training.loggers import _KeepingWriter

# (class, method, its parameters): every private method that is overridden or called.
PRIVATE = [
    (LightningCLI, "_parse_ckpt_path", ["self"]),
    (ModelCheckpoint, "_should_save_on_train_epoch_end", ["self", "trainer"]),
    (ModelCheckpoint, "_save_last_checkpoint", ["self", "trainer", "monitor_candidates"]),
    (ModelCheckpoint, "_monitor_candidates", ["self", "trainer"]),
    (ModelCheckpoint, "_save_checkpoint", ["self", "trainer", "filepath"]),
    (ExperimentWriter, "_check_log_dir_exists", ["self"]),
    (ExperimentWriter, "save", ["self"]),
]


@pytest.mark.parametrize("cls, name, params", PRIVATE, ids=[f"{c.__name__}.{n}" for c, n, _ in PRIVATE])
def test_private_methods_keep_their_signatures(cls, name, params):
    method = getattr(cls, name, None)
    assert method is not None, f"lightning's {cls.__name__}.{name} is gone: see the overrides in training/"
    assert list(inspect.signature(method).parameters) == params, f"{cls.__name__}.{name} changed its parameters"


def test_the_overrides_are_still_called_where_expected(tmp_path):
    # LightningCLI loads --ckpt_path's hyperparameters in _parse_ckpt_path, right after parsing
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
    assert {"_save_checkpoint", "_save_last_checkpoint"} <= set(vars(BestAndLastCheckpoint))
    # CSVLogger keeps its writer in _experiment, which the override of `experiment` fills; the writer checks its
    # directory in __init__ (the override defers that to the first save) and keeps metrics and metrics_file_path
    logger = CSVLogger(tmp_path)
    assert logger._experiment is None
    writer = _KeepingWriter(str(tmp_path / "log"), logger)
    assert writer._fresh and writer.metrics == [] and writer.metrics_file_path.endswith("metrics.csv")
