"""Dataset views over a prepared directory (written by `protein-performer-prep`, see data_prep/).

On disk, per split (train, valid, test, ood): `tokens.bin`, a flat uint8 stream in which every
sequence is followed by EOS, and `offsets.npy`, the int64 start of each sequence; `manifest.json`
in the parent directory is written last, so its presence marks a complete directory.

Two views, both memory-mapped (opened lazily, dropped when pickled, so DataLoader workers map the
file themselves instead of receiving a copy) with O(1) random access, returning int64 torch tensors:

- SingleSequenceDataset: item i = [BOS] + sequence i clipped to max_len tokens in all (so at most
  max_len - 1 residues; no EOS), as in the paper's L = 1024 task. crop="first" keeps the start,
  crop="random" a uniformly drawn window, reproducible from (seed, epoch, i).
- ConcatenatedDataset: the split's whole EOS-separated stream cut into non-overlapping windows of
  `window` tokens (no BOS; a sequence may straddle two windows; the last partial window is dropped),
  as in the paper's L = 8192 task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from protein_performer import vocab
from protein_performer.vocab import BOS

SPLITS = ("train", "valid", "test", "ood")


def load_manifest(root: str | Path) -> dict:
    """The manifest of a prepared directory; FileNotFoundError / ValueError naming the path if absent or broken."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a complete prepared data directory (run protein-performer-prep; "
            "an interrupted run leaves no manifest)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "splits" not in manifest or "vocabulary" not in manifest:
        raise ValueError(f"{path}: missing 'splits' or 'vocabulary'; not a protein-performer-prep manifest")
    return manifest


class _Split:
    """Lazily memory-mapped tokens.bin + offsets.npy of one split, checked against the manifest."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        manifest = load_manifest(self.dir.parent)
        stats = manifest["splits"].get(self.dir.name)
        if stats is None:
            raise ValueError(f"{self.dir}: split {self.dir.name!r} is not in {self.dir.parent / 'manifest.json'} (splits: {list(manifest['splits'])})")
        for name in ("tokens.bin", "offsets.npy"):
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{self.dir / name} not found: incomplete prepared directory")
        self.n_tokens = (self.dir / "tokens.bin").stat().st_size
        self.n_sequences = np.load(self.dir / "offsets.npy", mmap_mode="r").shape[0]
        if self.n_tokens != stats["tokens"] or self.n_sequences != stats["count"]:
            raise ValueError(
                f"{self.dir}: {self.n_tokens} tokens / {self.n_sequences} sequences on disk, manifest says "
                f"{stats['tokens']} / {stats['count']}: files changed or truncated"
            )
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            # np.memmap refuses empty files; an empty split is a valid (empty) array.
            self._tokens = np.memmap(self.dir / "tokens.bin", dtype=np.uint8, mode="r") if self.n_tokens else np.zeros(0, np.uint8)
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.load(self.dir / "offsets.npy", mmap_mode="r")
        return self._offsets

    def bounds(self, i: int) -> tuple[int, int]:
        """[start, end) of sequence i's residues (its EOS sits at end)."""
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) - 1 if i + 1 < self.n_sequences else self.n_tokens - 1
        return start, end

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_offsets": None}


class SingleSequenceDataset(Dataset):
    """One protein per item: int64 tensor [BOS, residues...] of length min(len + 1, max_len)."""

    def __init__(self, split_dir: str | Path, max_len: int = 1024, crop: str = "first", seed: int = 0):
        if crop not in ("first", "random"):
            raise ValueError(f"crop must be 'first' or 'random', not {crop!r}")
        if max_len < 2:
            raise ValueError("max_len must be >= 2 (BOS plus at least one residue)")
        self.split = _Split(split_dir)
        self.max_len, self.crop, self.seed, self.epoch = max_len, crop, seed, 0
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return self.split.n_sequences

    @property
    def lengths(self) -> np.ndarray:
        """Residues per sequence (int64, without BOS/EOS and before clipping), for token-budget batching."""
        if self._lengths is None:
            offsets = np.asarray(self.split.offsets)
            self._lengths = np.diff(np.append(offsets, self.split.n_tokens)) - 1
        return self._lengths

    def set_epoch(self, epoch: int) -> None:
        """Random crops depend on (seed, epoch, index): call once per epoch for fresh windows."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        start, end = self.split.bounds(i % len(self))
        keep = self.max_len - 1
        if end - start > keep and self.crop == "random":
            start += int(np.random.default_rng((self.seed, self.epoch, i % len(self))).integers(0, end - start - keep + 1))
        item = np.empty(min(end - start, keep) + 1, dtype=np.int64)
        item[0] = BOS
        item[1:] = self.split.tokens[start : start + len(item) - 1]
        return torch.from_numpy(item)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lengths": None}


class ConcatenatedDataset(Dataset):
    """Non-overlapping windows of `window` tokens over the EOS-separated stream of a split."""

    def __init__(self, split_dir: str | Path, window: int = 8192):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.split = _Split(split_dir)
        self.window = window

    def __len__(self) -> int:
        return self.split.n_tokens // self.window

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        start = (i % len(self)) * self.window
        return torch.from_numpy(self.split.tokens[start : start + self.window].astype(np.int64))


def token_counts(tokens_bin: str | Path, chunk: int = 1 << 26) -> np.ndarray:
    """Count of every vocabulary id in a uint8 token stream, read in chunks (TrEMBL's train is ~40 GB)."""
    counts = np.zeros(vocab.VOCAB_SIZE, dtype=np.int64)
    if not Path(tokens_bin).stat().st_size:  # np.memmap refuses an empty file
        return counts
    stream = np.memmap(tokens_bin, dtype=np.uint8, mode="r")
    for start in range(0, len(stream), chunk):
        counts += np.bincount(stream[start : start + chunk], minlength=vocab.VOCAB_SIZE)[: vocab.VOCAB_SIZE]
    return counts


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
