"""Batches from a prepared directory for Lightning: single sequences or concatenated windows, masked or causal."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ..data import ConcatenatedDataset, SingleSequenceDataset
from ..errors import UserError
from ..masking import EVAL_STREAM, TRAIN_STREAM, Collator, Objective
from ..prepared import PreparedDir
from .sampler import EpochOrder, Keyed, ShardedBatchSampler

# The train loader resumes mid-epoch through this module's state_dict, which Lightning's check cannot see.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
CUDA_PAD_MULTIPLE = 64  # batch lengths rounded up to this on a GPU (tensor-core tiles); 8 on the CPU


class ProteinDataModule(L.LightningDataModule):
    """Batches from a prepared directory (written by `protein-performer-prep`).

    Sharding over DDP ranks is done here: run with Trainer(use_distributed_sampler=False) (the CLI's default).

    Args:
        data_dir: the prepared directory.
        mode: "single": one protein per example, [BOS] + sequence clipped to max_len (a random window when
            training, the first max_len tokens when evaluating); "concatenated": non-overlapping windows of
            `window` tokens of the EOS-separated stream.
        objective: "masked" or "causal" (the CLI links it to the model's).
        max_len: tokens per example in single mode.
        window: tokens per example in concatenated mode.
        batch_size: sequences per batch (ignored when max_tokens is given).
        max_tokens: padded tokens per batch (length-bucketed batches), per rank.
        mask_prob: share of residues selected for the masked-LM loss.
        mask_split: replacement of selected tokens: "bert" 80/10/10 (MASK/random/unchanged) or "authors" 10/80/10.
        train_split: split to train on.
        val_split: split to validate on.
        test_splits: splits `test` evaluates (empty ones are skipped).
        num_workers: DataLoader worker processes.
        seed: seed of batch order, crops and masking.
    """

    def __init__(
        self,
        data_dir: str,
        mode: Literal["single", "concatenated"] = "single",
        objective: Objective = "masked",
        max_len: PositiveInt = 1024,
        window: PositiveInt = 8192,
        batch_size: PositiveInt | None = 8,
        max_tokens: PositiveInt | None = None,
        mask_prob: float = 0.15,
        mask_split: Literal["bert", "authors"] = "bert",
        train_split: str = "train",
        val_split: str = "valid",
        test_splits: Sequence[str] = ("test", "ood"),
        num_workers: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        # logger=False: the module's hparams go to the loggers (both have a max_len); config.yaml holds all
        self.save_hyperparameters(logger=False)
        if mode not in ("single", "concatenated"):
            raise ValueError(f"mode must be 'single' or 'concatenated', not {mode!r}")
        self.data_dir, self.mode, self.objective = Path(data_dir), mode, objective
        self.batch_size = None if max_tokens is not None else batch_size
        self.max_tokens, self.num_workers, self.seed = max_tokens, num_workers, seed
        self.collator = Collator(objective, mask_prob, mask_split, seed)
        self.datasets: dict[str, Dataset] = {}
        self.test_split_names: list[str] = []
        self._resume: tuple[int, int] | None = None  # (epoch, training batches done in it) of the last batch seen

    @property
    def example_length(self) -> int:
        """The longest example this module yields (the model's max_len must cover it)."""
        return self.hparams.max_len if self.mode == "single" else self.hparams.window

    def setup(self, stage: str) -> None:
        self.corpus = PreparedDir(self.data_dir)
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            self.collator.pad_to_multiple = CUDA_PAD_MULTIPLE
        if stage == "fit":
            self.datasets["train"] = self._dataset(self.hparams.train_split, train=True)
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset(self.hparams.val_split, train=False)
        if stage == "test":
            present = [s for s in self.hparams.test_splits if s in self.corpus.splits]
            self.datasets.update({s: self._dataset(s, train=False, may_be_empty=True) for s in present})
            self.test_split_names = [s for s in present if len(self.datasets[s])]
            skipped = sorted(set(self.hparams.test_splits) - set(self.test_split_names))
            if skipped:
                rank_zero_info(f"test: skipping splits without examples or not in {self.data_dir}: {skipped}")
            if not self.test_split_names:
                raise UserError(f"{self.data_dir}: none of the test splits {list(self.hparams.test_splits)} "
                                "holds an example")

    def _dataset(self, split: str, train: bool, may_be_empty: bool = False) -> Dataset:
        data = self.corpus.split(split)
        if not train:
            data.token_counts()  # checks every byte is a token id (training's are checked by train_token_counts)
        if self.mode == "concatenated":
            dataset = ConcatenatedDataset(data, window=self.hparams.window)
        else:
            dataset = SingleSequenceDataset(data, max_len=self.hparams.max_len, crop="random" if train else "first",
                                            seed=self.seed)
        if not len(dataset) and not may_be_empty:
            what = f"{len(data)} sequences, {data.n_tokens} tokens" + (
                f" < one window of {self.hparams.window}" if self.mode == "concatenated" else "")
            raise UserError(f"{data.dir}: split {split!r} is empty ({what}): nothing to "
                            f"{'train' if train else 'evaluate'} on; prepare more data or choose another split")
        return dataset

    def train_token_counts(self) -> np.ndarray:
        """Token counts of the training split (one scan of it), for the unigram baseline."""
        return self.corpus.split(self.hparams.train_split).token_counts()

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if self.mode == "single":  # [BOS] + residues, clipped
            lengths = np.minimum(np.asarray(dataset.lengths) + 1, self.example_length)
        else:
            lengths = np.full(len(dataset), self.example_length)
        multiple = self.collator.pad_to_multiple  # budget the padded size the collator will produce
        lengths = -(-lengths // multiple) * multiple
        if self.max_tokens is not None and len(lengths) and self.max_tokens < lengths.max():
            raise UserError(f"--data.max_tokens {self.max_tokens} is below the longest example, {lengths.max()} "
                            f"tokens once padded to a multiple of {multiple}: raise it or lower --data.max_len")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ShardedBatchSampler(
            EpochOrder(lengths, shuffle=train, seed=self.seed),
            batch_size=self.batch_size, max_tokens=self.max_tokens, rank=rank, world_size=world,
            even=train, stream=TRAIN_STREAM if train else EVAL_STREAM,
        )
        if train and self._resume is not None:  # a resumed epoch starts after the batches already done
            sampler.resume = self._resume
            sampler.sampler.set_epoch(self._resume[0])
        try:
            len(sampler)
        except ValueError as e:  # fewer training batches than ranks
            raise UserError(f"{self.data_dir}: {e}") from None
        return DataLoader(
            Keyed(dataset), batch_sampler=sampler, collate_fn=self.collator, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], train=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[s], train=False) for s in self.test_split_names]

    # -- resuming: Lightning saves and restores these with every checkpoint
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:  # called once per training batch, when it is used
            epoch, number = batch["position"]
            self._resume = (epoch, number + 1)
        return batch

    def state_dict(self) -> dict:
        return {} if self._resume is None else {"epoch": self._resume[0], "batches_done": self._resume[1]}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (state["epoch"], state["batches_done"]) if state else None
