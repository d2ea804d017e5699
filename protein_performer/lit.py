"""Lightning training: the data module, the language-model module and the callbacks they rely on.

Determinism is by construction, not by global RNG state: batch composition is a function of
(seed, epoch), masking of (seed, stream, epoch, example index), dropout of (seed, step, rank) and
random features of (seed, step, layer). A resumed run therefore replays the uninterrupted one, and every
DDP rank draws the same feature matrix without communicating.
"""

from __future__ import annotations

import math
import netrc
import os
import resource
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Literal, Sequence
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import SumMetric

from . import __version__, vocab
from .data import ConcatenatedDataset, SingleSequenceDataset, load_manifest, token_budget_batches, token_counts
from .evaluate import format_table, write_report
from .masking import IGNORE, Collator, Objective
from .model import AttentionKind, Config, ProteinLM

TRAIN_STREAM, EVAL_STREAM = 0, 1  # masking seeds of training and evaluation examples never collide

# Our train loader resumes mid-epoch on its own (ShardedBatchSampler.skip), which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([abs(int(v)) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------- data


class EpochOrder(Sampler[int]):
    """The index order of one epoch: a permutation seeded by (seed, epoch), or longest-first if not shuffled.

    Lightning calls `set_epoch` on `batch_sampler.sampler` at each epoch start, as for DistributedSampler.
    """

    def __init__(self, lengths: np.ndarray, shuffle: bool, seed: int = 0, epoch: int = 0):
        self.lengths, self.shuffle, self.seed, self.epoch = lengths, shuffle, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch))

    def __iter__(self):
        if self.shuffle:
            return iter(self.rng().permutation(len(self.lengths)))
        return iter(np.argsort(-self.lengths, kind="stable"))

    def __len__(self) -> int:
        return len(self.lengths)


class ShardedBatchSampler:
    """This rank's batches of one epoch: fixed-size or token-budget (length-bucketed), sharded over ranks.

    All ranks build the same global list of batches, then rank r takes batches r, r + W, r + 2W, ...
    Training (even=True) drops the last len % W batches so every rank steps the same number of times;
    evaluation (even=False) keeps them, so ranks may get one batch more or less and every sequence is
    evaluated exactly once (DistributedSampler would pad by repeating sequences instead).
    Yields keys (stream, epoch, index); `skip` batches are left out once (a resumed epoch).
    """

    def __init__(
        self,
        sampler: EpochOrder,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
        stream: int = TRAIN_STREAM,
        bucket: int = 1024,
    ):
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give exactly one of batch_size and max_tokens")
        if max_tokens is not None and len(sampler) and max_tokens < sampler.lengths.max():
            raise ValueError(f"max_tokens={max_tokens} is below the longest sequence ({sampler.lengths.max()})")
        self.sampler, self.batch_size, self.max_tokens = sampler, batch_size, max_tokens
        self.rank, self.world_size, self.even, self.stream, self.bucket = rank, world_size, even, stream, bucket
        self.skip = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _global_batches(self) -> list[np.ndarray]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        if self.batch_size is not None:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # Token budget: sort each bucket of the (shuffled) order by length so that a batch holds sequences
        # of similar length (little padding), pack greedily, then shuffle the batches themselves.
        lengths = self.sampler.lengths
        batches: list[np.ndarray] = []
        for start in range(0, len(order), self.bucket):
            chunk = order[start : start + self.bucket]
            batches += [chunk[b] for b in token_budget_batches(lengths[chunk], self.max_tokens)]
        if self.sampler.shuffle:
            batches = [batches[i] for i in self.sampler.rng().permutation(len(batches))]
        return batches

    def batches(self) -> list[np.ndarray]:
        """This rank's batches for the sampler's current epoch (cached per epoch)."""
        if self._cache is None or self._cache[0] != self.sampler.epoch:
            batches = self._global_batches()
            stop = len(batches) // self.world_size * self.world_size if self.even else len(batches)
            if len(batches) < self.world_size:  # a rank without batches would skip the metric sync and hang
                raise ValueError(f"{len(batches)} batches cannot be shared by {self.world_size} ranks: use smaller batches")
            self._cache = (self.sampler.epoch, batches[self.rank : stop : self.world_size])
        return self._cache[1]

    def __iter__(self):
        epoch = self.sampler.epoch if self.stream == TRAIN_STREAM else 0
        skip, self.skip = self.skip, 0
        for batch in self.batches()[skip:]:
            yield [(self.stream, epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches())


class _Keyed(Dataset):
    """dataset[(stream, epoch, index)] -> (key, dataset[index]): the key travels to the collator for seeding."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int, int]):
        if hasattr(self.dataset, "set_epoch"):  # random crops follow the key's epoch, in whichever worker
            self.dataset.set_epoch(key[1])
        return key, self.dataset[key[-1]]


class ProteinDataModule(L.LightningDataModule):
    """Batches from a prepared directory (DIR/<split>/tokens.bin + offsets.npy, DIR/manifest.json).

    mode "single": one sequence per example, [BOS] + sequence clipped to max_len (random crop when
    training, first max_len tokens when evaluating); "concatenated": non-overlapping EOS-separated windows
    of `window` tokens. Give batch_size (sequences) or max_tokens (padded tokens per batch, length-bucketed;
    it takes precedence over batch_size).
    Sharding over DDP ranks is done here: run with Trainer(use_distributed_sampler=False) (the CLI's default).
    """

    def __init__(
        self,
        data_dir: str,
        mode: Literal["single", "concatenated"] = "single",
        objective: Objective = "masked",
        max_len: int = 1024,
        window: int = 8192,
        batch_size: int | None = 8,
        max_tokens: int | None = None,
        mask_prob: float = 0.15,
        mask_split: Literal["bert", "authors"] = "bert",
        train_split: str = "train",
        val_split: str = "valid",
        test_splits: Sequence[str] = ("test", "ood"),
        num_workers: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if mode not in ("single", "concatenated"):
            raise ValueError(f"mode must be 'single' or 'concatenated', not {mode!r}")
        if max_tokens is not None:
            batch_size = None
        self.data_dir, self.mode, self.objective = Path(data_dir), mode, objective
        self.batch_size, self.max_tokens, self.num_workers, self.seed = batch_size, max_tokens, num_workers, seed
        self.collator = Collator(objective, mask_prob, mask_split, seed)
        self.datasets: dict[str, Dataset] = {}
        self.test_split_names: list[str] = []
        self.unigram_counts: np.ndarray | None = None

    @property
    def example_length(self) -> int:
        """The longest example this module yields (the model's max_len must cover it)."""
        return self.hparams.max_len if self.mode == "single" else self.hparams.window

    def _split_dir(self, split: str) -> Path:
        path = self.data_dir / split
        if not (path / "tokens.bin").is_file():
            present = sorted(p.name for p in self.data_dir.iterdir() if (p / "tokens.bin").is_file())
            raise FileNotFoundError(f"split {split!r} not found in {self.data_dir} (no {path}/tokens.bin); splits present: {present}")
        return path

    def _dataset(self, split: str, train: bool) -> Dataset:
        path = self._split_dir(split)
        if self.mode == "concatenated":
            return ConcatenatedDataset(path, window=self.hparams.window)
        return SingleSequenceDataset(path, max_len=self.hparams.max_len, crop="random" if train else "first", seed=self.seed)

    def setup(self, stage: str) -> None:
        load_manifest(self.data_dir)  # FileNotFoundError naming the directory if it is not a prepared one
        if stage == "fit":
            self.datasets["train"] = self._dataset(self.hparams.train_split, train=True)
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset(self.hparams.val_split, train=False)
        if stage == "test":  # the splits that exist and are not empty (a sample may have no OOD family)
            present = [s for s in self.hparams.test_splits if (self.data_dir / s / "tokens.bin").is_file()]
            if not present:
                self._split_dir(self.hparams.test_splits[0])  # raises the missing-split error
            self.datasets.update({s: self._dataset(s, train=False) for s in present})
            self.test_split_names = [s for s in present if len(self.datasets[s])]
        train_dir = self.data_dir / self.hparams.train_split
        if self.unigram_counts is None and (train_dir / "tokens.bin").is_file():
            self.unigram_counts = token_counts(train_dir / "tokens.bin")

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if self.mode == "single":  # [BOS] + residues, clipped
            lengths = np.minimum(np.asarray(dataset.lengths) + 1, self.example_length)
        else:
            lengths = np.full(len(dataset), self.example_length)
        multiple = self.collator.pad_to_multiple  # budget the padded size the collator will produce
        lengths = -(-lengths // multiple) * multiple
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ShardedBatchSampler(
            EpochOrder(lengths, shuffle=train, seed=self.seed),
            batch_size=self.batch_size, max_tokens=self.max_tokens, rank=rank, world_size=world,
            even=train, stream=TRAIN_STREAM if train else EVAL_STREAM,
        )
        if train and trainer is not None:
            # Resuming mid-epoch: start where the interrupted epoch stopped (restored loop progress).
            sampler.sampler.set_epoch(trainer.current_epoch)
            sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return DataLoader(
            _Keyed(dataset), batch_sampler=sampler, collate_fn=self.collator, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], train=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[s], train=False) for s in self.test_split_names]


def unigram_log_probs(counts: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Laplace (alpha = 1) unigram log-probabilities over the ids that can be targets of `objective`.

    Targets are the 25 letters, plus EOS for the causal objective (the concatenated stream predicts the
    end of each protein); other ids get probability 0 (log-prob -inf).
    """
    support = torch.zeros(vocab.VOCAB_SIZE, dtype=torch.bool, device=counts.device)
    support[: len(vocab.LETTERS)] = True
    support[vocab.EOS] = objective == "causal"
    smoothed = torch.where(support, counts.double() + 1.0, torch.zeros((), dtype=torch.float64, device=counts.device))
    return (smoothed / smoothed.sum()).log()


# ------------------------------------------------------------------------------------------- metrics


class LMMetrics(nn.Module):
    """Token-weighted sums of one evaluated split, synchronised over DDP ranks by torchmetrics.

    perplexity = exp(sum CE / tokens), accuracy = correct / tokens, and the same for the unigram baseline
    on the same target positions.
    """

    NAMES = ("ce", "correct", "tokens", "baseline_ce", "baseline_correct")

    def __init__(self):
        super().__init__()
        self.sums = nn.ModuleDict({n: SumMetric().set_dtype(torch.float64) for n in self.NAMES})

    def update(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.sums[name].update(value.double())

    def compute_and_reset(self) -> dict[str, float]:
        s = {n: float(m.compute()) if m.update_called else 0.0 for n, m in self.sums.items()}
        for m in self.sums.values():
            m.reset()
        n = max(s["tokens"], 1.0)
        return {
            "loss": s["ce"] / n, "ppl": math.exp(s["ce"] / n), "acc": s["correct"] / n, "tokens": s["tokens"],
            "baseline_ppl": math.exp(s["baseline_ce"] / n), "baseline_acc": s["baseline_correct"] / n,
        }


# -------------------------------------------------------------------------------------------- module


def lr_factor(step: int, *, warmup: int, total: int | None, decay: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then constant, cosine or linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


class ProteinLMModule(L.LightningModule):
    """A masked or causal protein LM (model.ProteinLM) with the paper's optimiser and metrics.

    Args:
        preset: model.Config preset ("paper-36l", "paper-concat-6l", "paper-concat-transformer", "small", "tiny").
        objective: "masked" (bidirectional, loss on selected positions) or "causal" (next token, non-PAD targets).
        attention: "softmax" (exact), "favor-softmax" or "favor-relu"; None keeps the preset's.
        model_args: further model.Config overrides (dropout, nb_features, relu_random_features, ...).
        lr, betas, eps, weight_decay: AdamW; decay applies to Linear weights only (not biases, LayerNorm, embeddings).
        warmup_steps, decay, decay_steps, min_lr_ratio: schedule; decay_steps defaults to trainer.max_steps.
        redraw_every: draw new random features every N optimiser steps (0: never); FAVOR-softmax only in effect.
        seed: base seed of dropout (per step and rank) and of feature redraws (per step and layer).
    """

    def __init__(
        self,
        preset: str = "small",
        objective: Objective = "masked",
        attention: AttentionKind | None = None,
        model_args: dict | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        decay: Literal["none", "cosine", "linear"] = "none",
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        redraw_every: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if objective not in ("masked", "causal"):
            raise ValueError(f"objective must be 'masked' or 'causal', not {objective!r}")
        overrides = dict(model_args or {}, causal=objective == "causal")
        if attention is not None:
            overrides["attention"] = attention
        self.config = Config.from_name(preset, **overrides)
        self.model = ProteinLM(self.config)
        # Training-split token counts for the unigram baseline; int64 so precision plugins never cast it.
        self.register_buffer("unigram_counts", torch.zeros(vocab.VOCAB_SIZE, dtype=torch.int64))
        self.val_metrics = LMMetrics()
        self.test_metrics = nn.ModuleList()
        self.test_results: dict[str, dict[str, float]] = {}

    # -- wiring to the data module
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, ProteinDataModule):
            return
        if dm.objective != self.hparams.objective:
            raise ValueError(f"data objective {dm.objective!r} differs from the model's {self.hparams.objective!r}")
        if dm.example_length > self.config.max_len:
            raise ValueError(f"data examples of {dm.example_length} tokens exceed the model's max_len {self.config.max_len}")
        # The baseline belongs to the data the model is trained on: taken when fitting (or if still unset),
        # kept when a trained model is evaluated on other data; checkpoints restore it after setup.
        if dm.unigram_counts is not None and (stage == "fit" or not self.unigram_counts.any()):
            self.unigram_counts.copy_(torch.from_numpy(dm.unigram_counts))
        if stage == "test":
            self.test_metrics = nn.ModuleList(LMMetrics() for _ in dm.test_split_names).to(self.device)

    def configure_callbacks(self) -> list[Callback]:
        return [FeatureRedraw(self.hparams.redraw_every, self.hparams.seed), Throughput()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what protein_performer.inputs.load_model needs to rebuild the bare model without Lightning
        checkpoint["protein_performer"] = {"version": __version__, "model_config": self.config.to_dict(),
                                           "objective": self.hparams.objective}

    # -- steps
    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens, padding_mask)["logits"]

    def _targets_stats(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-target cross-entropy, correctness and target ids over the positions that carry a loss."""
        logits = self(batch["tokens"], batch["padding_mask"])
        selected = batch["targets"] != IGNORE
        targets = batch["targets"][selected]
        logits = logits[selected].float()
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ce, logits.argmax(-1) == targets, targets

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout as a function of (seed, step, rank): a resumed run draws the masks it would have drawn.
        torch.manual_seed(derive_seed(self.hparams.seed, self.global_step, self.global_rank))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, correct, _ = self._targets_stats(batch)
        n = ce.new_tensor(float(ce.numel()))
        # Token-weighted over all ranks: DDP averages gradients over W ranks, so scale by W / global tokens.
        n_global = self.trainer.strategy.reduce(n.clone(), reduce_op="sum")
        loss = ce.sum() * self.trainer.world_size / n_global.clamp(min=1.0)
        mean_ce = ce.detach().mean()
        self.log("train/loss", mean_ce, prog_bar=True)
        self.log_dict({"train/ppl": mean_ce.exp(), "train/acc": correct.float().mean(),
                       "train/lr": self.optimizers().param_groups[0]["lr"]})
        return loss

    def _update(self, metrics: LMMetrics, batch: dict[str, torch.Tensor]) -> None:
        ce, correct, targets = self._targets_stats(batch)
        logp = unigram_log_probs(self.unigram_counts, self.hparams.objective)
        metrics.update(
            ce=ce.sum(), correct=correct.sum(), tokens=ce.new_tensor(ce.numel()),
            baseline_ce=-logp[targets].sum(), baseline_correct=(targets == logp.argmax()).sum(),
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute_and_reset()  # already summed over ranks: log without sync
        self.log("val/ppl", results.pop("ppl"), prog_bar=True)
        self.log_dict({f"val/{k}": v for k, v in results.items()})

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(self.test_metrics[dataloader_idx], batch)

    def on_test_epoch_end(self) -> None:
        names = self.trainer.datamodule.test_split_names
        self.test_results = {s: m.compute_and_reset() for s, m in zip(names, self.test_metrics)}
        for split, results in self.test_results.items():
            self.log_dict({f"test/{split}/{k}": v for k, v in results.items()}, add_dataloader_idx=False)
        if self.trainer.is_global_zero:
            meta = {"attention": self.config.attention, "objective": self.hparams.objective, "preset": self.hparams.preset,
                    "checkpoint": self.trainer.ckpt_path, "parameters": self.model.num_parameters()}
            out = write_report(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "report", self.test_results, meta)
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
            raise ValueError("decay needs model.decay_steps or trainer.max_steps")
        schedule = partial(lr_factor, warmup=hp.warmup_steps, total=total, decay=hp.decay, min_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ----------------------------------------------------------------------------------------- callbacks


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

    Peak memory is CUDA's max allocated on a GPU, the process's peak resident set size on CPU.
    """

    def __init__(self):
        self.tokens = 0
        self.start: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.start is None:  # the first step includes warm-up: start counting after it
            self.start, self.tokens = now, 0
            return
        self.tokens += batch["padding_mask"].sum()
        if trainer.global_step % trainer.log_every_n_steps:
            return
        rate = float(self.tokens) * trainer.world_size / max(now - self.start, 1e-9)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        pl_module.log_dict({"perf/tokens_per_s": rate, "perf/peak_mem_mib": peak})
        self.start, self.tokens = now, 0


# -------------------------------------------------------------------------------------------- logging


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
