"""What users hand the tools (analyze, embed, score, generate): checkpoints and protein sequences.

Checkpoints are rebuilt into a ProteinLM without Lightning. Proteins come from a FASTA file (plain or
gzipped) or one split of a prepared data directory (DIR/<split>/tokens.bin + offsets.npy,
DIR/manifest.json), which stores no accessions: its proteins are named "<split>/<index>".
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from Bio.SeqIO.FastaIO import SimpleFastaParser

from . import __version__, vocab
from .model import Config, ProteinLM

class InputError(Exception):
    """A user-facing problem with the inputs (missing file, wrong format, no usable sequences)."""


@dataclass
class LoadedModel:
    model: ProteinLM  # in eval mode, on CPU (move it with .to(device))
    config: Config
    objective: str  # "masked" or "causal"
    step: int | None  # global step the checkpoint was written at
    path: Path  # the checkpoint file read


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest last.ckpt (else the newest *.ckpt) under a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"checkpoint {path} does not exist")
    for pattern in ("last.ckpt", "*.ckpt"):
        found = sorted(path.rglob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise InputError(f"no checkpoint (*.ckpt) under {path}")


def load_model(ckpt_path: str | Path) -> LoadedModel:
    """Load a Lightning checkpoint written by protein_performer training (`protein-performer fit`).

    `ckpt_path` may also be a run directory (see find_checkpoint). The checkpoint is read with
    weights_only=True (tensors and plain types only: no code runs on load).
    """
    path = find_checkpoint(ckpt_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects beyond plain types
        raise InputError(f"checkpoint {path} cannot be read as a torch checkpoint: {e}") from None
    meta = ckpt.get("protein_performer") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise InputError(f"checkpoint {path} does not hold a protein_performer model (written by `protein-performer fit`)")
    if _release(meta.get("version")) != _release(__version__):
        raise InputError(f"checkpoint {path} was written by protein_performer {meta.get('version')}; this is "
                         f"{__version__}: load it with that version (model layouts may differ between releases)")
    try:
        config = Config(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"checkpoint {path}: invalid model configuration: {e}") from None
    # The LightningModule holds the network as `self.model`; its other state (metrics, counts) is not needed.
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model = ProteinLM(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputError(f"checkpoint {path}: weights do not match the model its configuration describes: {e}") from None
    return LoadedModel(model.eval(), config, meta["objective"], ckpt.get("global_step"), path)


def _release(version) -> tuple:
    """major.minor: checkpoints are compatible within a release series."""
    return tuple(str(version).split(".")[:2])


# ---- proteins -----------------------------------------------------------------------------------------

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


def _fasta_proteins(path: Path, unknown: vocab.UnknownPolicy = "reject") -> Iterator[Protein]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            for number, (header, seq) in enumerate(SimpleFastaParser(handle), start=1):
                first = header.split(maxsplit=1)[0] if header.strip() else ""
                try:
                    tokens = vocab.encode(seq.replace(" ", ""), unknown=unknown)
                except vocab.UnknownLetterError as e:
                    raise InputError(f"{path}: record {number} ({first or 'no name'}): {e}") from None
                if tokens is None or tokens.size == 0:  # rejected for unknown letters, or empty
                    continue
                parts = first.split("|")
                if len(parts) == 3 and parts[0] in ("sp", "tr"):  # >tr|ACCESSION|ENTRY_NAME ...
                    yield Protein(parts[1], tokens, parts[2])
                else:
                    yield Protein(first, tokens)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise InputError(f"{path} is not a readable FASTA file: {e}") from None


def _prepared_proteins(root: Path, split: str) -> Iterator[Protein]:
    split_dir = root / split
    if not (split_dir / "tokens.bin").is_file() or not (split_dir / "offsets.npy").is_file():
        present = sorted(p.name for p in root.iterdir() if (p / "tokens.bin").is_file())
        raise InputError(f"split {split!r} not found in prepared directory {root} (no {split_dir}/tokens.bin); splits present: {present}")
    offsets = np.load(split_dir / "offsets.npy")
    stream = np.memmap(split_dir / "tokens.bin", dtype=np.uint8, mode="r") if offsets.size else np.zeros(0, np.uint8)
    ends = np.append(offsets[1:], len(stream)) - 1  # each sequence is followed by EOS
    for i, (start, end) in enumerate(zip(offsets.tolist(), ends.tolist())):
        yield Protein(f"{split}/{i}", np.array(stream[start:end]))


def iter_proteins(
    path: str | Path, split: str = DEFAULT_SPLIT, unknown: vocab.UnknownPolicy = "reject"
) -> Iterator[Protein]:
    """Every usable protein of a FASTA file or of one split of a prepared directory, in file order.

    FASTA records with no residues are skipped; letters outside the 29-token vocabulary (J, '*', digits)
    follow `unknown`: skip the record ("reject"), read them as X ("x"), or stop with an InputError ("error").
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if is_prepared_dir(path):
        return _prepared_proteins(path, split)
    if path.is_dir():
        raise InputError(f"input {path} is a directory but not a prepared data directory (no manifest.json)")
    return _fasta_proteins(path, unknown)


def read_proteins(
    path: str | Path, limit: int | None = None, split: str = DEFAULT_SPLIT, unknown: vocab.UnknownPolicy = "reject"
) -> list[Protein]:
    """The first `limit` usable proteins (all if None); an error if there is none."""
    proteins = []
    for protein in iter_proteins(path, split, unknown):
        if limit is not None and len(proteins) >= limit:
            break
        proteins.append(protein)
    if not proteins:
        where = f"split {split!r} of {path}" if is_prepared_dir(Path(path)) else str(path)
        raise InputError(f"no valid protein sequences in {where} (FASTA records need letters of {vocab.LETTERS})")
    return proteins


def find_protein(path: str | Path, key: str, split: str = DEFAULT_SPLIT) -> Protein:
    """The first protein whose accession or entry name (or "<split>/<index>" name) is `key`."""
    for protein in iter_proteins(path, split):
        if protein.matches(key):
            return protein
    raise InputError(f"no protein {key!r} in {path}")

