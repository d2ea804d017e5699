"""Dataset views over one split of a prepared directory (see prepared.py), and the batching helpers they share
with inference.

- SingleSequenceDataset: item i = [BOS] + sequence i clipped to max_len tokens in all (so at most max_len - 1
  residues; no EOS), as in the paper's L = 1024 task. crop="first" keeps the start, crop="random" a uniformly
  drawn window, reproducible from (seed, epoch, i).
- ConcatenatedDataset: the split's whole EOS-separated stream cut into non-overlapping windows of `window`
  tokens (no BOS; a sequence may straddle two windows; the last partial window is dropped), as in the paper's
  L = 8192 task.

Both are memory-mapped (through prepared.Split) with O(1) random access, picklable for DataLoader workers
without copying the corpus, and return int64 torch tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .prepared import Split
from .vocab import BOS


class SingleSequenceDataset(Dataset):
    """One protein per item: int64 tensor [BOS, residues...] of length min(len + 1, max_len)."""

    def __init__(self, split: Split, max_len: int = 1024, crop: str = "first", seed: int = 0):
        if crop not in ("first", "random"):
            raise ValueError(f"crop must be 'first' or 'random', not {crop!r}")
        if max_len < 2:
            raise ValueError("max_len must be >= 2 (BOS plus at least one residue)")
        self.split, self.max_len, self.crop, self.seed, self.epoch = split, max_len, crop, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    @property
    def lengths(self) -> np.ndarray:
        """Residues per sequence (before clipping), for token-budget batching."""
        return self.split.lengths

    def set_epoch(self, epoch: int) -> None:
        """Random crops depend on (seed, epoch, index): call once per epoch for fresh windows."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        i %= len(self)
        start, end = self.split.bounds(i)
        keep = self.max_len - 1
        if end - start > keep and self.crop == "random":
            start += int(np.random.default_rng((self.seed, self.epoch, i)).integers(0, end - start - keep + 1))
        item = np.empty(min(end - start, keep) + 1, dtype=np.int64)
        item[0] = BOS
        item[1:] = self.split.tokens[start : start + len(item) - 1]
        return torch.from_numpy(item)


class ConcatenatedDataset(Dataset):
    """Non-overlapping windows of `window` tokens over the EOS-separated stream of a split."""

    def __init__(self, split: Split, window: int = 8192):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.split, self.window = split, window

    def __len__(self) -> int:
        return self.split.n_tokens // self.window

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        start = (i % len(self)) * self.window
        return torch.from_numpy(self.split.tokens[start : start + self.window].astype(np.int64))


def token_budget_batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Indices grouped longest-first so that (batch size x longest length) stays within the budget.

    A sequence longer than the budget gets a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > tokens_per_batch:
            batches.append(np.array(current))
            current = []
        current.append(i)
    if current:
        batches.append(np.array(current))
    return batches


def model_tokens(residues: np.ndarray, max_len: int) -> np.ndarray:
    """[BOS] + residue ids, cropped to max_len tokens (int64): the model input of one protein."""
    return np.concatenate([[BOS], np.asarray(residues, dtype=np.int64)[: max_len - 1]]).astype(np.int64)
