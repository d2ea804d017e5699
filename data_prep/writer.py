"""The splits on disk: per-split token streams written incrementally, the final fix-ups (sequences moved between
splits), offsets.npy and the statistics of each split. Everything is written inside the run's temporary
directory (output.OutputDir); the layout is the one protein_performer.corpus reads.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.manifest import build_manifest, write_manifest
from protein_performer.corpus import OFFSETS_FILE, TOKENS_FILE
from protein_performer.vocab import EOS

_COPY = 1 << 26  # bytes per copy step when rewriting a split


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each run of consecutive values in sorted `idx`."""
    breaks = np.flatnonzero(np.diff(idx) != 1)
    return np.concatenate([idx[:1], idx[breaks + 1]]), np.concatenate([idx[breaks], idx[-1:]])


class SplitWriter:
    """Appends sequences to DIR/<split>/tokens.bin; offsets and 128-bit digests go to side files."""

    def __init__(self, root: Path, name: str):
        self.dir = root / name
        self.dir.mkdir()
        # open across appends, closed by close() (the run's temporary directory goes if anything fails)
        self.tokens = open(self.dir / TOKENS_FILE, "wb", buffering=1 << 22)  # noqa: SIM115
        self.offsets = open(self.dir / "offsets.tmp", "wb", buffering=1 << 20)  # noqa: SIM115
        self.digests = open(self.dir / "digests.tmp", "wb", buffering=1 << 20)  # noqa: SIM115
        self.position = 0
        self.count = 0

    def append(
        self, tokens: memoryview, starts: np.ndarray, lengths: np.ndarray, idx: np.ndarray, digests: np.ndarray
    ) -> None:
        """Write sequences `idx` of a block (tokens[starts[i] : starts[i] + lengths[i] + 1] ends with EOS)."""
        if idx.size == 0:
            return
        # Consecutive records are written as one slice: the common case (all train) is a handful of writes.
        first, last = _runs(idx)
        for a, b in zip(starts[first].tolist(), (starts[last] + lengths[last] + 1).tolist()):
            self.tokens.write(tokens[a:b])
        sizes = lengths[idx] + 1
        ends = self.position + np.cumsum(sizes)
        self.offsets.write((ends - sizes).astype("<i8").tobytes())
        self.digests.write(np.ascontiguousarray(digests[idx]).astype("<u8").tobytes())
        self.position = int(ends[-1])
        self.count += idx.size

    def close(self) -> None:
        for f in (self.tokens, self.offsets, self.digests):
            f.close()


def read_split(split_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, offsets, digests) of a split being finalised, memory-mapped."""
    tokens = (
        np.memmap(split_dir / TOKENS_FILE, dtype=np.uint8, mode="r")
        if (split_dir / TOKENS_FILE).stat().st_size
        else np.zeros(0, np.uint8)
    )
    offsets = np.fromfile(split_dir / "offsets.tmp", dtype="<i8")
    digests = np.fromfile(split_dir / "digests.tmp", dtype="<u8").reshape(-1, 2)
    return tokens, offsets, digests


def rewrite_split(
    split_dir: Path, keep: np.ndarray, incoming: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
) -> None:
    """Rebuild a split from its sequences `keep` (sorted indices) plus `incoming` sequences.

    `incoming` holds (tokens, offsets, digests, indices) of other splits; the new files are written
    beside the old ones and renamed over them by `commit_rewrite` once every split is rebuilt.
    """
    tokens, offsets, digests = read_split(split_dir)
    ends = np.append(offsets[1:], len(tokens))
    parts = [(tokens, offsets, ends, digests, keep)] + [
        (t, o, np.append(o[1:], len(t)), d, i) for t, o, d, i in incoming
    ]
    new_offsets, new_digests, position = [], [], 0
    with open(split_dir / f"{TOKENS_FILE}.new", "wb") as out:
        for tok, off, end, dig, idx in parts:
            if idx.size == 0:
                continue
            first, last = _runs(idx)
            for a, b in zip(off[first].tolist(), end[last].tolist()):
                out.writelines(tok[s : min(b, s + _COPY)].tobytes() for s in range(a, b, _COPY))
            sizes = end[idx] - off[idx]
            new_offsets.append(position + np.cumsum(sizes) - sizes)
            new_digests.append(dig[idx])
            position += int(sizes.sum())
    np.concatenate(new_offsets or [np.zeros(0, np.int64)]).astype("<i8").tofile(split_dir / "offsets.tmp.new")
    np.concatenate(new_digests or [np.zeros((0, 2), np.uint64)]).astype("<u8").tofile(split_dir / "digests.tmp.new")


def commit_rewrite(split_dir: Path) -> None:
    for name in (TOKENS_FILE, "offsets.tmp", "digests.tmp"):
        os.replace(split_dir / f"{name}.new", split_dir / name)


def length_stats(lengths: np.ndarray) -> dict:
    """The paper's Table 1 columns; std is the population std (ddof=0), median as numpy's."""
    if lengths.size == 0:
        return {"count": 0, "residues": 0, "min": None, "max": None, "mean": None, "std": None, "median": None}
    return {
        "count": int(lengths.size),
        "residues": int(lengths.sum()),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
        "std": float(lengths.std()),
        "median": float(np.median(lengths)),
    }


def finish_split(split_dir: Path) -> dict:
    """Turn the side files into offsets.npy, check the EOS layout, return the split's statistics."""
    offsets = np.fromfile(split_dir / "offsets.tmp", dtype="<i8")
    n_tokens = (split_dir / TOKENS_FILE).stat().st_size
    lengths = np.diff(np.append(offsets, n_tokens)) - 1
    if offsets.size:
        tokens = np.memmap(split_dir / TOKENS_FILE, dtype=np.uint8, mode="r")
        # Cheap self-check of the layout (one byte per sequence): every sequence ends with EOS.
        if (lengths < 1).any() or not (tokens[offsets + lengths] == EOS).all():
            raise RuntimeError(f"{split_dir}: internal error: token stream does not match its offsets")
        del tokens
    np.save(split_dir / OFFSETS_FILE, offsets)
    for name in ("offsets.tmp", "digests.tmp"):
        (split_dir / name).unlink()
    stats = length_stats(lengths)
    stats["tokens"] = int(n_tokens)
    return stats


def write_prepared(root: Path, splits: dict[str, Sequence[np.ndarray]]) -> Path:
    """A prepared directory from residue ids per split, written the way a prep run writes it (SplitWriter,
    finish_split, the manifest), for sequences that are already tokens: the tests build their corpora with it."""
    root.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, seqs in splits.items():
        writer = SplitWriter(root, name)
        lengths = np.array([len(seq) for seq in seqs], dtype=np.int64)
        stream = np.concatenate([np.append(seq, EOS) for seq in seqs] or [np.zeros(0)]).astype(np.uint8)
        starts = np.cumsum(lengths + 1) - (lengths + 1)
        writer.append(memoryview(stream), starts, lengths, np.arange(len(seqs)), np.zeros((len(seqs), 2), np.uint64))
        writer.close()
        stats[name] = finish_split(root / name)
    kept = sum(st["count"] for st in stats.values())
    records = {"read": kept, "residues_read": sum(st["residues"] for st in stats.values()),
               "moved_to_ood_by_duplicate": 0}
    write_manifest(root, build_manifest({}, [], stats, records, Counter(), Counter()))
    return root
