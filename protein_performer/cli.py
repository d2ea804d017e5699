"""`protein-performer`: one entry point for training, evaluation, analysis and using trained models.

    protein-performer fit      --config configs/cpu/demo.yaml [--trainer.max_steps 10 --data.data_dir DIR ...]
    protein-performer fit      --config configs/cpu/demo.yaml --ckpt_path last    # resume DEFAULT_ROOT_DIR/checkpoints/last.ckpt
    protein-performer validate --config configs/cpu/demo.yaml --ckpt_path CKPT
    protein-performer test     --config configs/cpu/demo.yaml --ckpt_path CKPT   # Table-2 report
    protein-performer report   RUN_A/report/report.json RUN_B/report/report.json  # join reports
    protein-performer analyze  --ckpt CKPT --input FASTA_OR_DIR --out DIR          # attention vs BLOSUM62
    protein-performer embed | score | generate --ckpt CKPT ...                     # see inference.py

fit/validate/test are Lightning's LightningCLI; other subcommands are plain functions in COMMANDS.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .evaluate import report_main
from .lit import ProteinDataModule, ProteinLMModule



def _lazy(module: str, function: str) -> Callable[[list[str]], None]:
    """A subcommand whose module is imported only when it runs (keeps `fit` start-up free of matplotlib)."""

    def run(argv: list[str]) -> None:
        getattr(importlib.import_module(module, __package__), function)(argv)

    return run


# Subcommands that are not Lightning's: name -> function(argv).
COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "report": report_main,
    "analyze": _lazy(".analysis.cli", "main"),
    "embed": _lazy(".inference", "embed_main"),
    "score": _lazy(".inference", "score_main"),
    "generate": _lazy(".inference", "generate_main"),
}


def auto_precision(accelerator: str) -> str:
    """bf16 mixed precision on a GPU that supports it, full fp32 elsewhere (CPU bf16 is slow and lossy)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class SaveAndLogConfig(SaveConfigCallback):
    """Writes config.yaml to the log directory (Lightning's default) and sends the whole run config to wandb."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"cli": self.config.as_dict()})


class ProteinCLI(LightningCLI):
    """LightningCLI with the data objective linked to the model's, a checkpoint callback and runtime precision."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}  # no predict_step

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.objective", "data.objective")
        # last.ckpt for resuming (--ckpt_path last) and the best by validation perplexity
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
            config.trainer.precision = auto_precision(str(config.trainer.accelerator))
        if config.checkpoint.dirpath is None:  # one place per run directory, so `--ckpt_path last` finds it
            config.checkpoint.dirpath = str(Path(config.trainer.default_root_dir or ".") / "checkpoints")
        if self.subcommand and config.get("weights_only") is None:  # checkpoints hold tensors and plain types only
            config.weights_only = True


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> ProteinCLI:
    """The Lightning CLI; run=False parses `args` (no subcommand) and instantiates without running."""
    return ProteinCLI(
        ProteinLMModule,
        ProteinDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        # ProteinDataModule shards over ranks itself (no padding of the validation set)
        trainer_defaults={"use_distributed_sampler": False, "gradient_clip_val": 0.5},
        parser_kwargs={"description": "Train and evaluate protein language models (Performer / Transformer). "
                       f"Other subcommands: {', '.join(COMMANDS)} (protein-performer report REPORT.json ...)."},
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return
    try:
        build_cli(None if argv is None else args)
    except FileNotFoundError as e:  # a missing data directory or split: a message, not a traceback
        sys.exit(f"protein-performer: error: {e}")


if __name__ == "__main__":
    main()
