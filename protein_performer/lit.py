"""Kept so that YAML configs written for protein_performer 0.1 (`class_path: protein_performer.lit.X`) still
resolve; the code lives in protein_performer.training."""

from .training import AutoWandbLogger, CSVLogger, ProteinDataModule, ProteinLMModule

__all__ = ["AutoWandbLogger", "CSVLogger", "ProteinDataModule", "ProteinLMModule"]
