"""Checkpoints written by `protein-performer fit`, rebuilt into a bare ProteinLM (no Lightning).

They are read with weights_only=True (tensors and plain types only: no code runs on load), and refused with a
UserError naming the file when empty, truncated, from a newer release, or holding non-finite weights (a
diverged run). Checkpoints of earlier 0.x releases are upgraded on reading, in one place: upgrade_checkpoint
(reports of 0.1 are upgraded by evaluate.read_report).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .model import DERIVED_FIELDS, Config, ProteinLM
from .outputs import by_age


@dataclass
class LoadedModel:
    model: ProteinLM  # in eval mode, on the device asked for
    config: Config
    objective: str  # "masked" or "causal"
    step: int | None  # global step the checkpoint was written at
    path: Path  # the checkpoint file read


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or under a run directory the newest last checkpoint (last.ckpt, or last-v1.ckpt when
    another run wrote into the same folder: newest by time, as Lightning's `--ckpt_path last` picks), else the
    newest *.ckpt."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    for pattern in ("last*.ckpt", "*.ckpt"):
        found = by_age(path, pattern)
        if found:
            return found[-1]
    raise UserError(f"{path}: no checkpoint (*.ckpt) under this directory")


def check_readable(path: str | Path) -> Path:
    """A cheap check before a full load: the file exists and is a complete torch zip archive (its central
    directory, at the end of the file, is intact)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a checkpoint")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: truncated or not a torch checkpoint")
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (on the CPU), loaded with weights_only=True."""
    path = check_readable(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read when used
    except Exception as e:  # truncated inside, or pickled objects beyond plain types
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot be read as a torch checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return upgrade_checkpoint(ckpt)


LEGACY_ATTENTION = {"softmax": "exact"}  # how protein_performer 0.1 named exact attention
CONFIG_FIELDS = {f.name for f in fields(Config)} - set(DERIVED_FIELDS)  # what a run sets
LEGACY_MLP = {".mlp.0.": ".mlp.fc.", ".mlp.2.": ".mlp.proj."}  # 0.1 held the MLP as an nn.Sequential


def upgrade_checkpoint(ckpt: dict) -> dict:
    """A checkpoint of any 0.x release in this release's form, changed in place: the one place that knows earlier
    releases' checkpoints. Run on every checkpoint read (read_checkpoint) and on Lightning's own resume
    (ProteinLMModule.on_load_checkpoint). 0.1 kept model fields in hyper_parameters["model_args"], named exact
    attention "softmax" and held the MLP as an nn.Sequential (mlp.0 = fc, mlp.2 = proj); up to 0.2 the model's
    fields were hyperparameters of their own, now gathered in hyper_parameters["config"]."""
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, dict):
        hparams.update(hparams.pop("model_args", None) or {})
        # up to 0.2.0 the model's fields were arguments of their own (--model.d_model); now they are `config`'s
        flat = {k: hparams.pop(k) for k in [k for k in hparams if k in CONFIG_FIELDS]}
        if flat:
            hparams["config"] = {**{k: v for k, v in flat.items() if v is not None}, **hparams.get("config", {})}
    meta = ckpt.get("protein_performer")
    model_config = meta.get("model_config") if isinstance(meta, dict) else None
    for values in (hparams and hparams.get("config"), model_config):
        if isinstance(values, dict) and "attention" in values:
            values["attention"] = LEGACY_ATTENTION.get(values["attention"], values["attention"])
    weights = ckpt.get("state_dict")
    if isinstance(weights, dict):
        for key in [k for k in weights if any(old in k for old in LEGACY_MLP)]:
            new = key
            for old, current in LEGACY_MLP.items():
                new = new.replace(old, current)
            weights[new] = weights.pop(key)
    return ckpt


def non_finite(named_tensors: Iterable[tuple[str, object]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf: the one check of saved and loaded weights."""
    return [k for k, v in named_tensors if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state_dict: dict, path: str | Path) -> None:
    """UserError naming the first floating-point tensor with NaN or infinite values (a diverged run)."""
    bad = non_finite(state_dict.items())
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{path}: weights are not finite ({bad[0]}{more} hold NaN or inf): the run diverged; "
                        "use a checkpoint from before the divergence")


def _read_model(path: Path) -> tuple[dict, Config, str, dict]:
    """(checkpoint, model config, objective, ProteinLM weights) of a checkpoint file written by `fit`."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("protein_performer")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: does not hold a protein_performer model (written by `protein-performer fit`)")
    if _release(meta.get("version")) > _release(__version__):
        raise UserError(f"{path}: written by protein_performer {meta.get('version')}, newer than this {__version__}; "
                        "upgrade protein_performer to read it")
    try:
        config = Config.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: invalid model configuration: {e}") from None
    # The LightningModule holds the network as `self.model`; its other state (metrics, counts) is not needed.
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_finite(weights, path)
    return ckpt, config, meta["objective"], weights


def load_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint file or run directory (see find_checkpoint), in eval mode on `device`."""
    device = check_device(device)
    path = find_checkpoint(ckpt_path)
    ckpt, config, objective, weights = _read_model(path)
    model = ProteinLM(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the model its configuration describes: {e}") from None
    return LoadedModel(model.eval().to(device), config, objective, ckpt.get("global_step"), path)


# Config fields that shape the weights: a run initialised from another run's checkpoint must share them. The rest
# (attention kind, random features, chunking, dropout, checkpointing) change how the same weights are used.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len")


def _is_projection(key: str) -> bool:
    """FAVOR's random projection buffers: drawn by each model from its own feature_seed, never transferred."""
    return key.endswith(".attn.core.projection")


def check_init_from(model: ProteinLM, objective: str, ckpt_path: str | Path) -> tuple[Path, Config, dict]:
    """The one check that another run's checkpoint can start `model`: (checkpoint file, its config, the weights to
    copy). A missing or unreadable file, or a checkpoint of another objective or shape, is refused in one line
    naming the first difference. The CLI runs it before anything is written (training/lightning_cli.py)."""
    path = find_checkpoint(ckpt_path)
    _, parent, parent_objective, weights = _read_model(path)
    refuse = f"{path}: cannot initialise this model from it: "
    if parent_objective != objective:
        raise UserError(refuse + f"its objective is {parent_objective}, this run's is {objective}")
    for field in SHAPE_FIELDS:
        theirs, ours = getattr(parent, field), getattr(model.cfg, field)
        if theirs != ours:
            raise UserError(refuse + f"its {field} is {theirs}, this model's is {ours} (--model.config.{field})")
    theirs = {k: v for k, v in weights.items() if not _is_projection(k)}
    ours = {k: v for k, v in model.state_dict().items() if not _is_projection(k)}
    differ = sorted(theirs.keys() ^ ours.keys())  # a name or size that SHAPE_FIELDS does not decide
    differ = differ or [f"{k}: {tuple(v.shape)}, this model's {tuple(ours[k].shape)}" for k, v in theirs.items()
                        if v.shape != ours[k].shape]
    if differ:
        raise UserError(refuse + f"weights do not match ({differ[0]})")
    return path, parent, theirs


def init_from_checkpoint(model: ProteinLM, objective: str, ckpt_path: str | Path) -> tuple[Path, Config]:
    """Copy the weights of another run's checkpoint into `model`, whose attention kind and random features may
    differ (a softmax Transformer made a Performer, or back): (checkpoint file, its config).

    Every parameter is copied; FAVOR projections are not (each model keeps its own draw). The checkpoint must pass
    check_init_from. Only weights: optimiser state, step and the unigram baseline start fresh (this is not a resume).
    """
    path, parent, weights = check_init_from(model, objective, ckpt_path)
    model.load_state_dict(weights, strict=False)  # every key but the projections, each of the model's size
    return path, parent


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this machine has; a UserError otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device}: not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _release(version) -> tuple[int, ...]:
    """(major, minor) of a version string; unreadable versions count as 0.0."""
    try:
        return tuple(int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return (0, 0)
