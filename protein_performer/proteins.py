"""Proteins the tools read (analyze, agreement, embed, score): the records of a FASTA file (plain or gzipped, or a
pipe) or one split of a prepared directory, whose proteins are named "<split>/<index>" (it stores no accessions). A
FASTA file goes through prep's nucleotide screen (fasta.NucleotideScreen): a DNA or RNA file is refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

from . import vocab
from .errors import UserError
from .fasta import NucleotideScreen, is_nucleotide_like, open_text, parse_title
from .prepared import TOKENS_FILE, PreparedDir, is_prepared_dir

log = logging.getLogger(__name__)
DEFAULT_SPLIT = "test"  # held out from training and in distribution: what the model has not seen
MAX_NAMED = 5  # skipped records named on stderr; the rest are only counted


@dataclass
class Protein:
    name: str  # accession (UniProt FASTA), first title word (other FASTA) or "<split>/<index>"
    tokens: np.ndarray  # uint8 ids of the residues only (no BOS/EOS)
    entry: str = ""  # UniProt entry name (e.g. BPT1_BOVIN) when the title has one

    @property
    def sequence(self) -> str:
        return vocab.decode(self.tokens)

    def matches(self, key: str) -> bool:
        return key in (self.name, self.entry)


def iter_proteins(path: str | Path, screen: NucleotideScreen, split: str = DEFAULT_SPLIT,
                  unknown: vocab.UnknownPolicy = "reject", skipped: list[str] | None = None) -> Iterator[Protein]:
    """Every usable protein of a FASTA file or of one split of a prepared directory, in file order.

    FASTA records without residues are skipped; letters outside the vocabulary (J, '*', digits) follow `unknown`:
    skip the record ("reject"), read them as X ("x"), or stop with a UserError ("error"). A description of each
    skipped record is appended to `skipped`. Every FASTA record goes through `screen`, which refuses a nucleotide
    file after its first records; the caller calls `screen.finish()` once it stops reading, for the whole-file rule.
    """
    if is_prepared_dir(path):
        yield from _prepared_proteins(PreparedDir(path), split)
    else:
        path = Path(path)
        yield from _fasta_proteins(path, unknown, [] if skipped is None else skipped, screen)


def _fasta_proteins(path: Path, unknown: vocab.UnknownPolicy, skipped: list[str],
                    screen: NucleotideScreen) -> Iterator[Protein]:
    with open_text(path, "FASTA input") as handle:
        try:
            for number, (title, seq) in enumerate(SimpleFastaParser(handle), start=1):
                name, entry = parse_title(title)
                where = f"record {number} ({name or 'no name'})"
                try:
                    tokens = vocab.encode(seq.replace(" ", ""), unknown=unknown)
                except vocab.UnknownLetterError as e:
                    raise UserError(f"{path}: {where}: {e}") from None
                vote = tokens is not None and not entry and is_nucleotide_like(tokens.tobytes())
                screen.add(1, [0] if vote else [])
                if tokens is None:
                    skipped.append(f"{where}: {vocab.count_unknown(seq)} letters outside the vocabulary")
                elif tokens.size == 0:
                    skipped.append(f"{where}: no residues")
                else:
                    yield Protein(name, tokens, entry)
        except (EOFError, OSError) as e:  # igzip: truncated or corrupt stream
            raise UserError(f"{path}: not a readable FASTA file ({e})") from None
        except ValueError as e:  # SimpleFastaParser: text before the first '>'
            raise UserError(f"{path}: not a FASTA file ({e})") from None


def _prepared_proteins(root: PreparedDir, split: str) -> Iterator[Protein]:
    data = root.split(split)
    for i in range(len(data)):
        tokens = data.residues(i)
        if tokens.size and tokens.max() >= len(vocab.LETTERS):
            raise UserError(f"{data.dir / TOKENS_FILE}: sequence {i} holds ids that are not residues: file corrupt")
        yield Protein(f"{split}/{i}", tokens)


def read_proteins(path: str | Path, limit: int | None = None, split: str = DEFAULT_SPLIT,
                  unknown: vocab.UnknownPolicy = "reject",
                  also: str | None = None) -> tuple[list[Protein], Protein | None]:
    """The first `limit` usable proteins (all if None), and the protein named `also` (accession, entry name or
    "<split>/<index>"; None if not asked), found in the same single pass, so a pipe can be read. Skipped records
    are counted and the first few named on stderr; no usable protein, or `also` not found, is a UserError."""
    proteins, skipped, found = [], [], None
    screen = NucleotideScreen(path)
    for protein in iter_proteins(path, screen, split, unknown, skipped):
        if limit is None or len(proteins) < limit:
            proteins.append(protein)
        if also is not None and found is None and protein.matches(also):
            found = protein
        if limit is not None and len(proteins) >= limit and (also is None or found is not None):
            break
    screen.finish()
    for line in skipped[:MAX_NAMED]:
        log.warning(f"{path}: {line}: skipped")
    if len(skipped) > MAX_NAMED:
        log.warning(f"{path}: {len(skipped)} records skipped in all")
    where = f"split {split!r} of {path}" if is_prepared_dir(path) else str(path)
    if not proteins:
        raise UserError(f"{where}: no usable protein sequence (records need letters of {vocab.LETTERS})")
    if also is not None and found is None:
        raise UserError(f"{where}: no protein {also!r}")
    return proteins, found
