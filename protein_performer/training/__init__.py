"""Lightning training, by concern: the data module (datamodule.py) and its batch sampler (sampler.py), the
language-model module (module.py), its metrics (metrics.py), callbacks (callbacks.py) and loggers (loggers.py); the
fit / validate / test command line, a LightningCLI (lightning_cli.py)."""

from .callbacks import BestAndLastCheckpoint, FeatureRedraw, NonFiniteGuard, Throughput, TrainingDiverged
from .datamodule import ProteinDataModule
from .loggers import AutoWandbLogger, CSVLogger
from .module import ProteinLMModule

__all__ = [
    "AutoWandbLogger",
    "BestAndLastCheckpoint",
    "CSVLogger",
    "FeatureRedraw",
    "NonFiniteGuard",
    "ProteinDataModule",
    "ProteinLMModule",
    "Throughput",
    "TrainingDiverged",
]
