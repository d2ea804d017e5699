"""Callbacks of every training run: feature redraws, throughput, the non-finite guard, checkpoints, CSV resume."""

from __future__ import annotations

import resource
import time

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from ..checkpoints import non_finite
from ..errors import UserError
from ..model import derive_seed
from .loggers import CSVLogger


class FeatureRedraw(Callback):
    """Redraws the FAVOR random features every `every_n_steps` optimiser steps.

    The seed is derived from (seed, global_step) and the model derives one per layer, so all ranks draw
    the same matrices with no communication. The matrices are buffers: checkpoints save them, and a
    resumed run continues with the matrix in use and redraws at the same steps as an uninterrupted one.
    """

    def __init__(self, every_n_steps: int = 1000, seed: int = 0):
        self.every_n_steps, self.seed = every_n_steps, seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            pl_module.model.redraw_features(derive_seed(self.seed, step))


class Throughput(Callback):
    """Logs training throughput (real, non-PAD tokens per second over all ranks) and peak memory (MiB).

    Peak memory is CUDA's max allocated on a GPU, the process's peak resident set size on CPU. Token counts
    stay on the device until a logging step.
    """

    def __init__(self):
        self.tokens = 0
        self.start: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.start is None:  # the first step includes warm-up: start counting after it
            self.start, self.tokens = now, 0
            return
        mask = batch["padding_mask"]
        self.tokens += batch["tokens"].numel() if mask is None else mask.sum()
        if trainer.global_step % trainer.log_every_n_steps:
            return
        rate = float(self.tokens) * trainer.world_size / max(now - self.start, 1e-9)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        pl_module.log_dict({"perf/tokens_per_s": rate, "perf/peak_mem_mib": peak})
        self.start, self.tokens = now, 0


class TrainingDiverged(UserError):
    """The loss or the gradients of a training step were NaN or infinite."""


class NonFiniteGuard(Callback):
    """Watches the gradients of every optimiser step (after DDP's all-reduce, so every rank decides alike).

    mode "stop": the first step with NaN or infinite gradients stops the run with TrainingDiverged naming it.
    The check stays on the device: the first bad step is kept in a device tensor, read after every step on the
    CPU (where reading costs nothing: the run stops before the bad step is applied) and, on a GPU, at logging
    steps, before validation and at the end of fit, where Lightning reads values anyway. A checkpoint is never
    written from non-finite weights (BestAndLastCheckpoint stops the run instead).
    mode "skip": the bad step's gradients are dropped (AdamW then leaves every parameter as it is), counted in
    train/skipped_steps; MAX_SKIPS steps in a row stop the run. Deciding before the step reads the flag every step.
    Under fp16 the gradient scaler already skips overflowing steps; the guard leaves them to it.
    """

    MAX_SKIPS = 20

    def __init__(self, mode: str = "stop"):
        self.mode = mode
        self.first_bad: torch.Tensor | None = None  # the first step with non-finite gradients, -1 while none
        self.skipped = self.in_a_row = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        step = trainer.global_step
        if self.mode == "skip":
            self._skip_if(bool(bad), optimizer, step)
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        first = torch.full_like(self.first_bad, step)  # a fill kernel: no host-to-device copy
        self.first_bad = torch.where(bad & (self.first_bad < 0), first, self.first_bad)
        if bad.device.type == "cpu" or (step + 1) % trainer.log_every_n_steps == 0:
            self.check()

    def _skip_if(self, bad: bool, optimizer, step: int) -> None:
        if not bad:
            self.in_a_row = 0
            return
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        rank_zero_warn(f"step {step}: non-finite gradients; step skipped ({self.skipped} so far)")
        if self.in_a_row >= self.MAX_SKIPS:
            raise TrainingDiverged(f"training diverged: {self.in_a_row} steps in a row up to step {step} had "
                                   "non-finite gradients; lower the learning rate or check the data")

    def check(self) -> None:
        """Raise TrainingDiverged if a step so far had non-finite gradients (reads one number from the device)."""
        if self.first_bad is not None and (step := int(self.first_bad)) >= 0:
            raise TrainingDiverged(
                f"training diverged at step {step}: the loss or gradients are NaN or infinite; lower the learning "
                "rate (--model.lr), add warm-up (--model.warmup_steps), or skip such steps with "
                "--model.on_nonfinite skip")

    def on_validation_start(self, trainer, pl_module) -> None:
        self.check()

    def on_train_end(self, trainer, pl_module) -> None:
        self.check()


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes last.ckpt after every validation and at the end of fit (Lightning's own
    rewrites it only when the monitored metric improves), and never from non-finite weights: a NaN or infinite
    model is neither best nor last, and trying to save one stops the run (the guard's message names the step).
    Overrides private ModelCheckpoint methods (no public hook sees every save): tests/test_lightning_private.py."""

    _last_step: int | None = None  # global step of the last last.ckpt written

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else the epoch's end saves top-k, then last
            self._save_last_if_new(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_new(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last_if_new(trainer)

    def _save_last_if_new(self, trainer) -> None:
        if (self.save_last and trainer.state.fn == "fit" and not trainer.sanity_checking
                and self._last_step != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step = trainer.global_step

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """Every save passes here: refuse non-finite weights."""
        for guard in trainer.callbacks:
            if isinstance(guard, NonFiniteGuard):
                guard.check()  # the usual case: the guard names the first bad step
        bad = non_finite(trainer.lightning_module.named_parameters())
        if bad:
            raise TrainingDiverged(f"training diverged by step {trainer.global_step}: parameters {bad[:3]} hold NaN "
                                   f"or inf; {filepath} was not written")
        super()._save_checkpoint(trainer, filepath)


class ResumeCSVLogs(Callback):
    """A resumed fit keeps the rows its CSVLogger wrote up to the checkpoint's step (see loggers.CSVLogger)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    logger.resume_at(checkpoint.get("global_step", 0))
