"""Checkpoint -> model: rebuild the ProteinLM that a training run saved, without Lightning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import Config, ProteinLM


class AnalysisError(Exception):
    """A user-facing problem with the analysis inputs (missing file, wrong format, no usable sequences)."""


@dataclass
class LoadedModel:
    model: ProteinLM  # in eval mode, on CPU
    config: Config
    objective: str  # "masked" or "causal"
    step: int | None  # global step the checkpoint was written at
    path: Path  # the checkpoint file read


def model_config(hparams: dict) -> Config:
    """The model Config of protein_performer.lit.ProteinLMModule's hyper-parameters.

    Mirrors ProteinLMModule.__init__: the preset, then model_args, causality from the objective, and the
    attention kind if one was given.
    """
    overrides = dict(hparams.get("model_args") or {}, causal=hparams["objective"] == "causal")
    if hparams.get("attention") is not None:
        overrides["attention"] = hparams["attention"]
    return Config.from_name(hparams["preset"], **overrides)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest last.ckpt (else the newest *.ckpt) under a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise AnalysisError(f"checkpoint {path} does not exist")
    for pattern in ("last.ckpt", "*.ckpt"):
        found = sorted(path.rglob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise AnalysisError(f"no checkpoint (*.ckpt) under {path}")


def load_model(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a Lightning checkpoint written by protein_performer training (`protein-performer fit`).

    `ckpt_path` may also be a run directory (see find_checkpoint). The checkpoint is read with
    weights_only=True (tensors and plain types only: no code runs on load).
    """
    path = find_checkpoint(ckpt_path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects beyond plain types
        raise AnalysisError(f"checkpoint {path} cannot be read as a torch checkpoint: {e}") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not {"preset", "objective"} <= hparams.keys() or not isinstance(state, dict):
        raise AnalysisError(
            f"checkpoint {path} does not hold a protein_performer model "
            "(expected Lightning hyper_parameters with 'preset' and 'objective' and a state_dict)"
        )
    try:
        config = model_config(hparams)
    except (ValueError, TypeError) as e:
        raise AnalysisError(f"checkpoint {path}: invalid model hyper-parameters: {e}") from None
    # The LightningModule holds the network as `self.model`; its other state (metrics, counts) is not needed.
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model = ProteinLM(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise AnalysisError(f"checkpoint {path}: weights do not match the model its hyper-parameters describe: {e}") from None
    return LoadedModel(model.eval(), config, hparams["objective"], ckpt.get("global_step"), path)
