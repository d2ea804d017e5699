"""LightningCLI for fit / validate / test: configs in configs/, any key overridable (`--model.config.d_model 128`),
precision picked by the machine, checkpoints that can be trusted (training/callbacks.py)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from ..checkpoints import check_init_from, read_checkpoint
from ..errors import UserError
from ..machine import cpu_bf16
from .callbacks import BestAndLastCheckpoint
from .datamodule import ProteinDataModule
from .module import ProteinLMModule


def auto_precision(accelerator: str) -> tuple[str, str]:
    """(precision, reason) for `precision: null`: bf16-mixed where bf16 matrix products beat fp32, else fp32.

    A CUDA GPU with bf16 support; a CPU with AMX-BF16, or whose bf16 products measure at least 1.5x fp32's
    (machine.cpu_bf16: an AMD EPYC with AVX512-BF16 trains the small preset 1.9x faster in bf16-mixed; an Intel
    Xeon with AVX512-BF16 but no AMX ran bf16 products at 0.58x fp32 and stays in fp32).
    """
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"GPU {torch.cuda.get_device_name()} supports bf16"
        return "32-true", f"GPU {torch.cuda.get_device_name()} has no bf16"
    fast, why = cpu_bf16()
    return ("bf16-mixed" if fast else "32-true"), f"CPU: {why}"


class SaveAndLogConfig(SaveConfigCallback):
    """Writes config.yaml to the log directory (Lightning's default) and sends the whole run config to wandb."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"cli": self.config.as_dict()})


class ProteinCLI(LightningCLI):
    """LightningCLI with the data objective linked to the model's, checkpoints, and precision by machine."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}  # no predict_step

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.objective", "data.objective")
        # last.ckpt (after every validation and at the end) for resuming, and the best by validation perplexity
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/ppl",
            "checkpoint.mode": "min",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-step{step}-ppl{val/ppl:.3f}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:  # configs say null: decide on the machine that runs
            config.trainer.precision, reason = auto_precision(str(config.trainer.accelerator))
            rank_zero_info(f"precision: {config.trainer.precision}, picked for this machine: {reason}")
        if config.trainer.precision in ("32-true", "32", 32) and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 work on tensor cores
        if config.checkpoint.dirpath is None:  # one place per run directory, so `--ckpt_path last` finds it
            config.checkpoint.dirpath = str(Path(config.trainer.default_root_dir or ".") / "checkpoints")
        if self.subcommand and config.get("weights_only") is None:  # checkpoints hold tensors and plain types only
            config.weights_only = True

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # the model is built and nothing written yet: the trainer's run directory (config.yaml, logs) comes later
        self._check_init_from()
        return super().instantiate_trainer(**kwargs)

    def _check_init_from(self) -> None:
        """A bad --model.init_from (missing, unreadable, another objective or shape) stops the run before its run
        directory and model summary, not at the start of fit. The weights themselves are copied then
        (ProteinLMModule._init_from), after any --ckpt_path restore; with --ckpt_path the run's own checkpoint holds
        its weights, so the parent is not needed (a converted run resumes without it) and not checked."""
        hparams = self.model.hparams
        if self.subcommand and hparams.init_from and self.config[self.subcommand].get("ckpt_path") is None:
            try:
                check_init_from(self.model.model, hparams.objective, hparams.init_from)
            except UserError as e:
                raise UserError(f"--model.init_from: {e}") from None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own version loads --ckpt_path's hyperparameters into the model's config with a bare
        torch.load; this one reads the file through checkpoints.read_checkpoint (clear errors for an empty or
        truncated file) and upgrades those of earlier releases (checkpoints.upgrade_checkpoint). A private
        method, called before any public hook: tests/test_lightning_private.py checks it is still called."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in (None, "last", "best", "hpc", "registry"):
            return
        hparams = {k: v for k, v in read_checkpoint(ckpt_path).get("hyper_parameters", {}).items()
                   if k != "_instantiator"}
        if "preset" in hparams:  # written by ProteinLMModule
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)


def _not_lightning_ad(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip: For seamless cloud")


def quiet_library_noise() -> None:
    """Silence, by name, what Lightning prints on every run that a user of this project cannot act on."""
    # Lightning's utilities/_pytree.py builds torch's deprecated LeafSpec: a FutureWarning (torch 2.13) on every
    # fit. Still so in Lightning 2.6.6 (the newest within pyproject's range) and on its master branch
    # (Lightning-AI/pytorch-lightning#21326): drop this filter once a Lightning release calls treespec_leaf().
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Lightning 2.6 advertises its cloud services (litlogger, litmodels) on every fit: nothing about this run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_lightning_ad)


def build_cli(args: Sequence[str] | None = None, run: bool = True, other_commands: Sequence[str] = ()) -> ProteinCLI:
    """The Lightning CLI; run=False parses `args` (no subcommand) and instantiates without running."""
    quiet_library_noise()
    return ProteinCLI(
        ProteinLMModule,
        ProteinDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        # ProteinDataModule shards over ranks itself (no padding of the validation set)
        trainer_defaults={"use_distributed_sampler": False, "gradient_clip_val": 0.5},
        parser_kwargs={"description": "Train and evaluate protein language models (Performer / Transformer). "
                       f"Other subcommands: {', '.join(other_commands)} (protein-performer NAME --help)."},
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
    )
