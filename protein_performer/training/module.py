"""The LightningModule: a masked or causal protein LM (model.ProteinLM) with the paper's optimiser and metrics.

Determinism is by construction, not by global RNG state: batch composition is a function of (seed, epoch),
masking of (seed, stream, epoch, example index), dropout of (seed, step, rank) and random features of
(seed, step, layer). A resumed run therefore replays the uninterrupted one, and every DDP rank draws the same
feature matrix without communicating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields, make_dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional, get_type_hints

import docstring_parser
import lightning as L
import torch
import torch.distributed as dist
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .. import __version__, vocab
from ..checkpoints import check_finite, init_from_checkpoint, upgrade_checkpoint
from ..errors import UserError
from ..evaluate import format_table, write_report
from ..masking import Objective
from ..model import DERIVED_FIELDS, Config, PresetName, ProteinLM, derive_seed
from .callbacks import FeatureRedraw, NonFiniteGuard, ResumeCSVLogs, Throughput
from .datamodule import ProteinDataModule
from .metrics import LMMetrics, target_stats, unigram_log_probs


def lr_factor(step: int, *, warmup: int, total: int | None, decay: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then constant, cosine or linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def _config_overrides() -> type:
    """A dataclass of every other Config field as an optional override (None: the preset's), typed and documented
    as Config declares it: the type of the module's `config` argument, which jsonargparse turns into
    --model.config.<field>. Generated, so that Config stays the one declaration of the model's fields."""
    hints = get_type_hints(Config)
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(Config).params}
    names = [f.name for f in fields(Config) if f.name not in DERIVED_FIELDS]
    doc = "Model fields replacing the preset's (None: the preset's).\n\nArgs:\n" + "\n".join(
        f"    {name}: {docs.get(name, '')}" for name in names)
    return make_dataclass("ConfigOverrides", [(n, Optional[hints[n]], None) for n in names],  # noqa: UP045
                          frozen=True, namespace={"__doc__": doc, "__module__": __name__})


ConfigOverrides = _config_overrides()
# Up to release 0.2.0 each field was an option of its own: `--model.d_model` now stops with "was renamed".
RENAMED_FLAGS = {f"--model.{f.name}": f"--model.config.{f.name}" for f in fields(ConfigOverrides)}


class ProteinLMModule(L.LightningModule):
    """A masked or causal protein language model with the paper's optimiser (AdamW, weight decay on Linear
    weights only) and metrics (perplexity and accuracy beside the unigram baseline).

    Args:
        preset: model.Config preset the model starts from.
        objective: "masked" (bidirectional, loss on selected positions) or "causal" (next token).
        config: Config fields replacing the preset's (`--model.config.n_heads 16`; in Python a dict or a
            ConfigOverrides); None keeps the preset's.
        lr: AdamW learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay on Linear weights (not biases, LayerNorm, embeddings).
        warmup_steps: linear warm-up steps.
        decay: learning-rate decay after warm-up: none, cosine or linear.
        decay_steps: steps of the decay (default: trainer.max_steps).
        min_lr_ratio: final learning rate as a share of lr.
        redraw_every: draw new random features every N optimiser steps (0: never); favor-softmax only in effect.
        on_nonfinite: a step whose gradients are NaN or infinite stops the run ("stop", naming the step) or is
            skipped ("skip": counted in train/skipped_steps; 20 in a row stop the run).
        seed: base seed of dropout (per step and rank) and of feature redraws (per step and layer).
        init_from: checkpoint (file or run directory) whose weights start this run, e.g. an exact Transformer's
            for a Performer: same shapes and objective, while the attention kind and random features may differ.
            Optimiser state and step start fresh (to continue a run, use --ckpt_path).
    """

    def __init__(
        self,
        preset: PresetName = "small",
        objective: Objective = "masked",
        config: ConfigOverrides = ConfigOverrides(),  # noqa: B008 (frozen: one shared empty value)
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: PositiveFloat = 1e-9,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        decay: Literal["none", "cosine", "linear"] = "none",
        decay_steps: PositiveInt | None = None,
        min_lr_ratio: float = 0.0,
        redraw_every: int = 1000,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        seed: int = 0,
        init_from: str | None = None,
    ):
        super().__init__()
        config = ConfigOverrides(**config) if isinstance(config, dict) else config
        overrides = {k: v for k, v in asdict(config).items() if v is not None}
        self.save_hyperparameters(ignore=["config"])
        # again with the overrides as a plain dict: checkpoints are read with weights_only=True, and the logged
        # hparams (hparams_initial) include them
        self.save_hyperparameters({**self.hparams, "config": overrides})
        if objective not in ("masked", "causal"):
            raise ValueError(f"objective must be 'masked' or 'causal', not {objective!r}")
        try:
            self.config = Config.from_name(preset, causal=objective == "causal", **overrides)
        except ValueError as e:
            raise UserError(f"--model.config: {e}") from None
        self.model = ProteinLM(self.config)
        # Training-split token counts for the unigram baseline; int64 so precision plugins never cast it.
        self.register_buffer("unigram_counts", torch.zeros(vocab.VOCAB_SIZE, dtype=torch.int64))
        self.val_metrics = LMMetrics()
        self.test_metrics = nn.ModuleList()
        self.test_results: dict[str, dict[str, float]] = {}
        self.eos_is_target = False  # set by setup() from the data module's mode
        self.weights_given = False  # set once init_from or a checkpoint has put weights in

    # -- wiring to the data module
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, ProteinDataModule):
            return
        if dm.objective != self.hparams.objective:
            raise UserError(f"--data.objective {dm.objective} differs from --model.objective "
                            f"{self.hparams.objective}")
        if dm.example_length > self.config.max_len:
            raise UserError(f"data examples of {dm.example_length} tokens (--data.max_len or --data.window) exceed "
                            f"the model's max_len {self.config.max_len} (--model.config.max_len)")
        # EOS is a target only in the concatenated stream; single sequences end without one
        self.eos_is_target = self.hparams.objective == "causal" and dm.mode == "concatenated"
        if stage == "fit" and self.trainer.ckpt_path is None:  # the baseline belongs to the training data;
            self.unigram_counts.copy_(torch.from_numpy(dm.train_token_counts()))  # a resumed run restores it
        if stage == "test":
            self.test_metrics = nn.ModuleList(LMMetrics() for _ in dm.test_split_names).to(self.device)

    def _init_from(self) -> None:
        """Weights from --model.init_from, unless a checkpoint has put the run's own in (a resume, or a module
        loaded from a checkpoint): called at the start of fit, validate and test, after Lightning restored any
        --ckpt_path. Every DDP rank reads the same file, so all hold the same weights."""
        if self.hparams.init_from and not self.weights_given:
            path, parent = init_from_checkpoint(self.model, self.hparams.objective, self.hparams.init_from)
            self.weights_given = True
            rank_zero_info(f"weights from {path} (attention {parent.attention} -> {self.config.attention}); "
                           "optimiser state and step start fresh")

    def _ensure_baseline(self) -> None:
        """A model evaluated without training here (no checkpoint, or one without counts) takes the data's."""
        dm = getattr(self.trainer, "datamodule", None)
        if not self.unigram_counts.any() and isinstance(dm, ProteinDataModule):
            self.unigram_counts.copy_(torch.from_numpy(dm.train_token_counts()))

    def configure_callbacks(self) -> list[Callback]:
        return [FeatureRedraw(self.hparams.redraw_every, self.hparams.seed), Throughput(),
                NonFiniteGuard(self.hparams.on_nonfinite), ResumeCSVLogs()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what protein_performer.checkpoints.load_model needs to rebuild the bare model without Lightning
        checkpoint["protein_performer"] = {"version": __version__, "model_config": self.config.to_dict(),
                                           "objective": self.hparams.objective}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(checkpoint)  # Lightning's own resume reads the file itself: earlier releases' names
        self.weights_given = True  # a module loaded from a run's checkpoint never goes back to init_from
        try:
            path = self.trainer.ckpt_path
        except RuntimeError:  # loaded outside a Trainer
            path = "checkpoint"
        check_finite({k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}, path)

    # -- steps
    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens, padding_mask)["logits"]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout as a function of (seed, step, rank): a resumed run draws the masks it would have drawn.
        torch.manual_seed(derive_seed(self.hparams.seed, self.global_step, self.global_rank))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ce, correct, selected = target_stats(self(batch["tokens"], batch["padding_mask"]), batch["targets"])
        n = selected.sum()
        # Token-weighted over all ranks: DDP averages gradients over W ranks, so scale by W / global tokens.
        n_global = n.clone()
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            dist.all_reduce(n_global)  # a collective, not a host sync (Lightning's reduce adds a barrier)
        loss = ce.sum() * self.trainer.world_size / n_global.clamp(min=1)
        n = n.clamp(min=1)
        mean_ce = ce.detach().sum() / n
        self.log("train/loss", mean_ce, prog_bar=True)
        self.log_dict({"train/ppl": mean_ce.exp(), "train/acc": correct.sum() / n})
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # a float becomes a device tensor: a
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])  # copy that waits, so not every step
        return loss

    def on_fit_start(self) -> None:
        self._init_from()

    def on_validation_start(self) -> None:
        self._init_from()
        self._ensure_baseline()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_metrics.update(self(batch["tokens"], batch["padding_mask"]), batch["targets"], self._baseline())

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute_and_reset()  # already summed over ranks: log without sync
        self.log("val/ppl", results.pop("ppl"), prog_bar=True)
        self.log_dict({f"val/{k}": v for k, v in results.items()})

    def on_test_start(self) -> None:
        self._init_from()
        self._ensure_baseline()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch["tokens"], batch["padding_mask"])
        self.test_metrics[dataloader_idx].update(logits, batch["targets"], self._baseline())

    def _baseline(self) -> torch.Tensor:
        return unigram_log_probs(self.unigram_counts, eos=self.eos_is_target)

    def on_test_epoch_end(self) -> None:
        names = self.trainer.datamodule.test_split_names
        self.test_results = {s: m.compute_and_reset() for s, m in zip(names, self.test_metrics)}
        for split, results in self.test_results.items():
            self.log_dict({f"test/{split}/{k}": v for k, v in results.items()}, add_dataloader_idx=False)
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank asks
        if self.trainer.is_global_zero:
            dm = self.trainer.datamodule
            task = f"{dm.mode}, L = {dm.example_length}"
            meta = {"attention": self.config.attention, "objective": self.hparams.objective, "task": task,
                    "preset": self.hparams.preset, "checkpoint": self.trainer.ckpt_path,
                    "parameters": self.model.num_parameters()}
            out = write_report(log_dir / "report", self.test_results, meta)
            rank_zero_info(format_table(self.test_results, meta) + f"\nreport written to {out}")

    # -- optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = hp.decay_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else None)
        if hp.decay != "none" and total is None:
            raise UserError("--model.decay needs --model.decay_steps or --trainer.max_steps")
        schedule = partial(lr_factor, warmup=hp.warmup_steps, total=total, decay=hp.decay, min_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
