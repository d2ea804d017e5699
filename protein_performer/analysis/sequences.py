"""Proteins to analyse, from a FASTA file (plain or gzipped) or a prepared data directory.

Prepared directories (DIR/<split>/tokens.bin + offsets.npy, DIR/manifest.json) store no accessions:
their proteins are named "<split>/<index>".
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from .. import vocab
from .checkpoint import AnalysisError

DEFAULT_SPLIT = "test"  # held out from training and in distribution: what the model has not seen


@dataclass
class Protein:
    name: str  # accession (UniProt FASTA), first header word (other FASTA) or "<split>/<index>"
    tokens: np.ndarray  # uint8 ids of the residues only (no BOS/EOS)
    entry: str = ""  # UniProt entry name (e.g. BPT1_BOVIN) when the header has one

    @property
    def sequence(self) -> str:
        return vocab.decode(self.tokens)

    def matches(self, key: str) -> bool:
        return key in (self.name, self.entry)


def is_prepared_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def _fasta_proteins(path: Path) -> Iterator[Protein]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            for header, seq in SimpleFastaParser(handle):
                tokens = vocab.encode(seq.replace(" ", ""), unknown="reject")
                if tokens is None or tokens.size == 0:  # letters outside the vocabulary, or empty
                    continue
                first = header.split(maxsplit=1)[0] if header.strip() else ""
                parts = first.split("|")
                if len(parts) == 3 and parts[0] in ("sp", "tr"):  # >tr|ACCESSION|ENTRY_NAME ...
                    yield Protein(parts[1], tokens, parts[2])
                else:
                    yield Protein(first, tokens)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise AnalysisError(f"{path} is not a readable FASTA file: {e}") from None


def _prepared_proteins(root: Path, split: str) -> Iterator[Protein]:
    split_dir = root / split
    if not (split_dir / "tokens.bin").is_file() or not (split_dir / "offsets.npy").is_file():
        present = sorted(p.name for p in root.iterdir() if (p / "tokens.bin").is_file())
        raise AnalysisError(f"split {split!r} not found in prepared directory {root} (no {split_dir}/tokens.bin); splits present: {present}")
    offsets = np.load(split_dir / "offsets.npy")
    stream = np.memmap(split_dir / "tokens.bin", dtype=np.uint8, mode="r") if offsets.size else np.zeros(0, np.uint8)
    ends = np.append(offsets[1:], len(stream)) - 1  # each sequence is followed by EOS
    for i, (start, end) in enumerate(zip(offsets.tolist(), ends.tolist())):
        yield Protein(f"{split}/{i}", np.array(stream[start:end]))


def iter_proteins(path: str | Path, split: str = DEFAULT_SPLIT) -> Iterator[Protein]:
    """Every usable protein of a FASTA file or of one split of a prepared directory, in file order.

    FASTA records with letters outside the 29-token vocabulary (J, '*', digits) or no residues are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"input {path} does not exist")
    if is_prepared_dir(path):
        return _prepared_proteins(path, split)
    if path.is_dir():
        raise AnalysisError(f"input {path} is a directory but not a prepared data directory (no manifest.json)")
    return _fasta_proteins(path)


def read_proteins(path: str | Path, limit: int | None = None, split: str = DEFAULT_SPLIT) -> list[Protein]:
    """The first `limit` usable proteins (all if None); an error if there is none."""
    proteins = []
    for protein in iter_proteins(path, split):
        if limit is not None and len(proteins) >= limit:
            break
        proteins.append(protein)
    if not proteins:
        where = f"split {split!r} of {path}" if is_prepared_dir(Path(path)) else str(path)
        raise AnalysisError(f"no valid protein sequences in {where} (FASTA records need letters of {vocab.LETTERS})")
    return proteins


def find_protein(path: str | Path, key: str, split: str = DEFAULT_SPLIT) -> Protein:
    """The first protein whose accession or entry name (or "<split>/<index>" name) is `key`."""
    for protein in iter_proteins(path, split):
        if protein.matches(key):
            return protein
    raise AnalysisError(f"no protein {key!r} in {path}")

