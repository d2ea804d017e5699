"""The prepared format: what `protein-performer-prep` writes and training reads, in one place (file names, the
reader, the writer of one split and of the manifest).

    DIR/manifest.json          written last: its presence marks a complete directory
    DIR/<split>/tokens.bin     uint8 token ids; every sequence is followed by EOS; no BOS, no padding
    DIR/<split>/offsets.npy    int64 start of each sequence in tokens.bin

Reading: every tool that reads a prepared directory (dataset views, the data module, inference inputs, notebooks)
goes through PreparedDir. Opening checks what is cheap (manifest, vocabulary, file sizes and counts against the
manifest, offsets); `Split.token_counts` scans the stream and checks every byte is a token id (the data module runs
it on the splits it uses). Problems are UserErrors naming the file.

Writing (protein_performer.prep, which decides what goes in): SplitWriter appends a split's sequences, with their
offsets and de-duplication digests in side files; rewrite_split / commit_rewrite move sequences between splits;
finish_split turns the side files into offsets.npy and returns the split's statistics; write_manifest comes last.
The manifest's content is built by prep.manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import vocab
from .errors import UserError

SPLITS = ("train", "valid", "test", "ood")
FORMAT_VERSION = 1
# The file names of the format: everything that reads or writes the files (prep, the tests) takes them from here.
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
_SCAN = 1 << 26  # bytes (or offsets) per step of a full scan: bounded memory at TrEMBL scale


# Reading


def is_prepared_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


class PreparedDir:
    """A prepared data directory with its manifest checked; `split(name)` gives one split's data."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST_FILE
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such data directory")
        if not path.is_file():
            raise UserError(f"{self.root}: not a complete prepared data directory (no {MANIFEST_FILE}; run "
                            "protein-performer-prep, and note that an interrupted run leaves none)")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        self._check_manifest(path)

    def _check_manifest(self, path: Path) -> None:
        m = self.manifest
        if not (isinstance(m, dict) and isinstance(m.get("splits"), dict) and isinstance(m.get("vocabulary"), dict)):
            raise UserError(f"{path}: no 'splits' or 'vocabulary' entry; not a protein-performer-prep manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: format_version {m.get('format_version')!r}; this protein_performer reads "
                            f"{FORMAT_VERSION}")
        if m["vocabulary"].get("tokens") != list(vocab.TOKENS):
            raise UserError(f"{path}: its vocabulary differs from this protein_performer's 29 tokens")
        for name, stats in m["splits"].items():
            if name not in SPLITS or not isinstance(stats, dict) or not all(
                    isinstance(stats.get(k), int) and stats[k] >= 0 for k in ("count", "tokens")):
                raise UserError(f"{path}: split entry {name!r} is not a split with integer 'count' and 'tokens'")

    @property
    def splits(self) -> list[str]:
        """Names of the splits the manifest lists, in SPLITS order."""
        return [s for s in SPLITS if s in self.manifest["splits"]]

    def split(self, name: str) -> Split:
        if name not in self.manifest["splits"]:
            raise UserError(f"{self.root}: no split {name!r} (splits: {', '.join(self.splits)})")
        return Split(self.root / name, self.manifest["splits"][name])


class Split:
    """tokens.bin + offsets.npy of one split, checked against the manifest; memory-mapped on first use and
    dropped when pickled, so DataLoader workers map the files themselves instead of receiving a copy."""

    def __init__(self, directory: Path, stats: dict):
        self.dir, self.name = directory, directory.name
        for f in (TOKENS_FILE, OFFSETS_FILE):
            if not (self.dir / f).is_file():
                raise UserError(f"{self.dir / f}: missing (incomplete prepared directory)")
        self.n_tokens = (self.dir / TOKENS_FILE).stat().st_size
        offsets = self._load_offsets()
        self.n_sequences = len(offsets)
        if (self.n_tokens, self.n_sequences) != (stats["tokens"], stats["count"]):
            raise UserError(f"{self.dir}: {self.n_tokens} tokens / {self.n_sequences} sequences on disk, the manifest "
                            f"says {stats['tokens']} / {stats['count']}: files changed or truncated")
        self._check_offsets(offsets)
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = offsets
        self._lengths: np.ndarray | None = None

    def _load_offsets(self) -> np.ndarray:
        path = self.dir / OFFSETS_FILE
        try:
            offsets = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: truncated or not a .npy file ({e})") from None
        if offsets.ndim != 1 or offsets.dtype != np.int64:
            raise UserError(f"{path}: expected a 1-d int64 array, found {offsets.ndim}-d {offsets.dtype}")
        return offsets

    def _check_offsets(self, offsets: np.ndarray) -> None:
        """Offsets start at 0, increase strictly and stay inside tokens.bin (checked in bounded chunks)."""
        if not self.n_sequences:
            return
        bad = offsets[0] != 0 or offsets[-1] > self.n_tokens - 2
        for s in range(0, self.n_sequences, _SCAN):
            part = np.asarray(offsets[s : s + _SCAN + 1])
            bad = bad or bool((np.diff(part) < 2).any())  # every sequence holds >= 1 residue + EOS
        if bad:
            raise UserError(f"{self.dir / OFFSETS_FILE}: offsets do not describe sequences of {TOKENS_FILE} "
                            f"({self.n_tokens} bytes): file edited or corrupt")

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:  # np.memmap refuses empty files; an empty split is a valid empty array
            path = self.dir / TOKENS_FILE
            self._tokens = np.memmap(path, dtype=np.uint8, mode="r") if self.n_tokens else np.zeros(0, np.uint8)
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.load(self.dir / OFFSETS_FILE, mmap_mode="r")
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        """Residues per sequence (int64; EOS excluded)."""
        if self._lengths is None:
            self._lengths = np.diff(np.append(np.asarray(self.offsets), self.n_tokens)) - 1
        return self._lengths

    def __len__(self) -> int:
        return self.n_sequences

    def bounds(self, i: int) -> tuple[int, int]:
        """[start, end) of sequence i's residues in tokens (its EOS sits at end)."""
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) - 1 if i + 1 < self.n_sequences else self.n_tokens - 1
        return start, end

    def residues(self, i: int) -> np.ndarray:
        """Token ids (uint8) of sequence i, without its EOS."""
        start, end = self.bounds(i)
        return np.asarray(self.tokens[start:end])

    def token_counts(self) -> np.ndarray:
        """Count of each token id over tokens.bin (int64, VOCAB_SIZE), read in chunks; a UserError if a byte is
        not a token id or the EOS count differs from the number of sequences."""
        counts = np.zeros(256, dtype=np.int64)
        for s in range(0, self.n_tokens, _SCAN):
            counts += np.bincount(self.tokens[s : s + _SCAN], minlength=256)
        outside = np.flatnonzero(counts[vocab.VOCAB_SIZE :])
        if outside.size:
            byte = int(outside[0]) + vocab.VOCAB_SIZE
            where = next(s + int(np.argmax(part == byte)) for s in range(0, self.n_tokens, _SCAN)
                         if ((part := self.tokens[s : s + _SCAN]) == byte).any())
            raise UserError(f"{self.dir / TOKENS_FILE}: byte {byte} at offset {where} is not a token id "
                            f"(vocabulary 0-{vocab.VOCAB_SIZE - 1}): file corrupt")
        if counts[vocab.EOS] != self.n_sequences:
            raise UserError(f"{self.dir / TOKENS_FILE}: {counts[vocab.EOS]} EOS tokens for {self.n_sequences} "
                            "sequences: file corrupt")
        return counts[: vocab.VOCAB_SIZE]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_offsets": None, "_lengths": None}


# Writing (protein_performer.prep decides what goes in)

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
        if (lengths < 1).any() or not (tokens[offsets + lengths] == vocab.EOS).all():
            raise RuntimeError(f"{split_dir}: internal error: token stream does not match its offsets")
        del tokens
    np.save(split_dir / OFFSETS_FILE, offsets)
    for name in ("offsets.tmp", "digests.tmp"):
        (split_dir / name).unlink()
    stats = length_stats(lengths)
    stats["tokens"] = int(n_tokens)
    return stats


def write_manifest(root: Path, manifest: dict) -> None:
    """DIR/manifest.json, synced to disk: written last, it marks the directory complete."""
    with open(root / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
