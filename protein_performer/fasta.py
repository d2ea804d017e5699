"""Opening what users hand the tools, naming FASTA records, and the nucleotide screen that refuses a DNA or RNA
file given in place of proteins (prep and every command that reads a FASTA use it).

Inputs may be plain or gzipped files, or pipes and devices (`<(zcat x.gz)`, /dev/stdin): gzip is recognised by
its magic bytes, read through a buffer's peek, so nothing is consumed and a pipe is opened only once.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from isal import igzip

from .errors import UserError
from .vocab import LETTERS

GZIP_MAGIC = b"\x1f\x8b"


def check_input(path: str | Path, what: str = "input") -> Path:
    """`path` if it can be read as a stream (regular file, pipe, device); otherwise a UserError saying why."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory, not a file ({what})")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: permission denied ({what})")
    return path


def open_binary(path: str | Path, raw: io.RawIOBase | None = None) -> tuple[io.BufferedIOBase, bool]:
    """(decompressed binary stream, was_gzipped) of a plain or gzipped file or pipe (igzip: 3x zlib's speed).

    `raw` lets the caller interpose its own raw reader (e.g. one that hashes the compressed bytes).
    """
    if raw is None:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller, who closes it
    buffered = io.BufferedReader(raw, 1 << 20)
    if buffered.peek(2)[:2] == GZIP_MAGIC:
        return igzip.IGzipFile(fileobj=buffered, mode="rb"), True
    return buffered, False


def open_text(path: str | Path, what: str = "input") -> io.TextIOBase:
    """A latin-1 text stream of a plain or gzipped file or pipe; checks `path` first (see check_input)."""
    stream, _ = open_binary(check_input(path, what))
    return io.TextIOWrapper(stream, encoding="latin-1", newline=None)


def parse_title(title: str) -> tuple[str, str]:
    """(accession, entry name) of a FASTA title: UniProt `sp|P00974|BPT1_BOVIN ...` -> ("P00974", "BPT1_BOVIN");
    any other title -> (its first word, ""); an empty title -> ("", "")."""
    word = title.split(None, 1)[0] if title.strip() else ""
    parts = word.split("|")
    if len(parts) >= 3 and parts[0] in ("sp", "tr"):
        return parts[1], parts[2]
    return word, ""


# ---- the nucleotide screen ----
# A record is nucleotide-like when it has at least NUCLEOTIDE_MIN_LENGTH letters of which at least NUCLEOTIDE_PERCENT %
# are A, C, G, T, U or N. Real proteins can be: P02732, an antifreeze glycoprotein, is (AAT)n, and TrEMBL holds
# poly-A, poly-G and poly-N fragments. Such a record is a valid sequence and is kept; the file is what is judged.
# A file is refused when more than half of its first NUCLEOTIDE_FILE_RECORDS records, or of all its records, are
# nucleotide-like records without a UniProt title. Measured: all 26,094 real nucleotide records at hand are
# nucleotide-like (Debian's bowtie2-examples: lambda phage genome, 26,000 Illumina reads; emboss-test: 91 EMBL and
# GenBank entries, genomic, mRNA, EST, viral); of the 18,543 proteins of four UniProt reference proteomes none is (the
# highest share is 65.3%, GFCA_ECOLI), and of a held-out UniProt-derived set of 1.34 M records two are (one sequence,
# P02732). So a nucleotide file is ~100% nucleotide-like and a protein file ~1e-6, and a majority leaves a wide
# margin on both sides. 1,000 records (about 0.4 MB of protein FASTA, one read block) refuse a DNA file of any size
# at its start; the count over the whole file catches DNA appended to proteins (`cat proteins.fa reads.fa`). A few
# nucleotide-like records among proteins are kept, counted and named. Records of UniProt entries (`sp|ACC|NAME`
# titles, flat-file entries) never count towards refusal: they are proteins by definition, so a small UniProt file
# of antifreeze glycoproteins is read like any other.
NUCLEOTIDE_LETTERS = "ACGTUN"
NUCLEOTIDE_PERCENT = 90
NUCLEOTIDE_MIN_LENGTH = 20
NUCLEOTIDE_FILE_RECORDS = 1000
NUCLEOTIDE_IDS = bytes(LETTERS.index(c) for c in NUCLEOTIDE_LETTERS)
NUCLEOTIDE_RULE = (
    f"a record of >= {NUCLEOTIDE_MIN_LENGTH} letters, >= {NUCLEOTIDE_PERCENT}% of them "
    f"{'/'.join(NUCLEOTIDE_LETTERS)}, is nucleotide-like (kept and counted); a file is refused when more than half "
    f"of its first {NUCLEOTIDE_FILE_RECORDS} records, or of all its records, are nucleotide-like records of no "
    "UniProt entry (title sp|ACC|NAME or tr|ACC|NAME, or a flat-file entry)"
)


def _nucleotides(tokens: bytes) -> int:
    """How many of a record's token ids are A/C/G/T/U/N."""
    return len(tokens) - len(tokens.translate(None, NUCLEOTIDE_IDS))


def is_nucleotide_like(tokens: bytes) -> bool:
    """The nucleotide-like rule for one record's token ids."""
    n = len(tokens)
    return n >= NUCLEOTIDE_MIN_LENGTH and 100 * _nucleotides(tokens) >= NUCLEOTIDE_PERCENT * n


def nucleotide_detail(tokens: bytes) -> str:
    share = 100 * _nucleotides(tokens) / len(tokens)
    return f"{share:.0f}% of its {len(tokens)} letters are {'/'.join(NUCLEOTIDE_LETTERS)}"


class NucleotideScreen:
    """The file-level rule (see NUCLEOTIDE_FILE_RECORDS) for one input read as a stream: `add` the records as they
    are read, then `finish`; either raises the UserError that refuses a nucleotide file."""

    def __init__(self, path: str | Path):
        self.path, self.records, self.votes = path, 0, 0

    @property
    def decided(self) -> bool:
        """Whether the file's start has passed: only the count at the end can still refuse it."""
        return self.records >= NUCLEOTIDE_FILE_RECORDS

    def add(self, records: int, votes) -> None:
        """`records` more records, of which those at the indices `votes` (counted from 0 among them) are
        nucleotide-like and of no UniProt entry."""
        first = NUCLEOTIDE_FILE_RECORDS - self.records
        if 0 < first <= records:
            self._check(self.votes + sum(1 for i in votes if i < first), NUCLEOTIDE_FILE_RECORDS, "first ")
        self.records += records
        self.votes += len(votes)

    def finish(self) -> None:
        self._check(self.votes, self.records, "")

    def _check(self, votes: int, records: int, which: str) -> None:
        if 2 * votes > records:
            raise UserError(
                f"{self.path}: {votes:,} of its {which}{records:,} records are nucleotide sequences (>= "
                f"{NUCLEOTIDE_PERCENT}% {'/'.join(NUCLEOTIDE_LETTERS)}): a DNA or RNA file, not protein"
            )
