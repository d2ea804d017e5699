"""Output: per-split token streams written incrementally, final fix-ups, statistics, manifest.

Everything is written into a hidden temporary directory next to DIR and renamed to DIR only after
manifest.json (written last) is complete, so an interrupted run never leaves a DIR that looks done
and never touches an existing DIR unless --overwrite (which swaps the new one in by rename).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from data_prep import PrepError
from protein_performer.vocab import EOS

_COPY = 1 << 26  # bytes per copy step when rewriting a split


class OutputDir:
    """Context manager giving a temporary directory that becomes `out` on success, vanishes on failure."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise PrepError(f"{self.out}: output directory exists; pass --overwrite to replace it")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as e:
            raise PrepError(f"{self.out}: cannot create output directory ({e.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each run of consecutive values in sorted `idx`."""
    breaks = np.flatnonzero(np.diff(idx) != 1)
    return np.concatenate([idx[:1], idx[breaks + 1]]), np.concatenate([idx[breaks], idx[-1:]])


class SplitWriter:
    """Appends sequences to DIR/<split>/tokens.bin; offsets and 128-bit digests go to side files."""

    def __init__(self, root: Path, name: str):
        self.dir = root / name
        self.dir.mkdir()
        self.tokens = open(self.dir / "tokens.bin", "wb", buffering=1 << 22)
        self.offsets = open(self.dir / "offsets.tmp", "wb", buffering=1 << 20)
        self.digests = open(self.dir / "digests.tmp", "wb", buffering=1 << 20)
        self.position = 0
        self.count = 0

    def append(self, tokens: memoryview, starts: np.ndarray, lengths: np.ndarray, idx: np.ndarray, digests: np.ndarray) -> None:
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
    tokens = np.memmap(split_dir / "tokens.bin", dtype=np.uint8, mode="r") if (split_dir / "tokens.bin").stat().st_size else np.zeros(0, np.uint8)
    offsets = np.fromfile(split_dir / "offsets.tmp", dtype="<i8")
    digests = np.fromfile(split_dir / "digests.tmp", dtype="<u8").reshape(-1, 2)
    return tokens, offsets, digests


def rewrite_split(split_dir: Path, keep: np.ndarray, incoming: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Rebuild a split from its sequences `keep` (sorted indices) plus `incoming` sequences.

    `incoming` holds (tokens, offsets, digests, indices) of other splits; the new files are written
    beside the old ones and renamed over them by `commit_rewrite` once every split is rebuilt.
    """
    tokens, offsets, digests = read_split(split_dir)
    ends = np.append(offsets[1:], len(tokens))
    parts = [(tokens, offsets, ends, digests, keep)] + [(t, o, np.append(o[1:], len(t)), d, i) for t, o, d, i in incoming]
    new_offsets, new_digests, position = [], [], 0
    with open(split_dir / "tokens.bin.new", "wb") as out:
        for tok, off, end, dig, idx in parts:
            if idx.size == 0:
                continue
            first, last = _runs(idx)
            for a, b in zip(off[first].tolist(), end[last].tolist()):
                for s in range(a, b, _COPY):
                    out.write(tok[s : min(b, s + _COPY)].tobytes())
            sizes = end[idx] - off[idx]
            new_offsets.append(position + np.cumsum(sizes) - sizes)
            new_digests.append(dig[idx])
            position += int(sizes.sum())
    np.concatenate(new_offsets or [np.zeros(0, np.int64)]).astype("<i8").tofile(split_dir / "offsets.tmp.new")
    np.concatenate(new_digests or [np.zeros((0, 2), np.uint64)]).astype("<u8").tofile(split_dir / "digests.tmp.new")


def commit_rewrite(split_dir: Path) -> None:
    for name in ("tokens.bin", "offsets.tmp", "digests.tmp"):
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
    n_tokens = (split_dir / "tokens.bin").stat().st_size
    lengths = np.diff(np.append(offsets, n_tokens)) - 1
    if offsets.size:
        tokens = np.memmap(split_dir / "tokens.bin", dtype=np.uint8, mode="r")
        # Cheap self-check of the layout (one byte per sequence): every sequence ends with EOS.
        if (lengths < 1).any() or not (tokens[offsets + lengths] == EOS).all():
            raise PrepError(f"{split_dir}: internal error: token stream does not match its offsets")
        del tokens
    np.save(split_dir / "offsets.npy", offsets)
    for name in ("offsets.tmp", "digests.tmp"):
        (split_dir / name).unlink()
    stats = length_stats(lengths)
    stats["tokens"] = int(n_tokens)
    return stats


def write_manifest(root: Path, manifest: dict) -> None:
    path = root / "manifest.json"
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
