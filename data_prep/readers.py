"""Streaming input: open plain or gzipped files, cut them into blocks of whole records, parse blocks.

Decompression (python-isal's igzip, about 3x faster than zlib) runs in a reader thread; blocks are parsed by
the fast FASTA parser (SimpleFastaParser's rules on whole blocks) or Biopython's SwissProt reader, in the main
process or in worker processes with --workers > 1 (see pipeline.py).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

from isal import igzip

# Biopython is imported where it is used: importing Bio.SwissProt / Bio.SeqIO costs 0.2 s of start-up,
# and the fast FASTA path (pipeline.py) never needs it.

from data_prep import PrepError

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_text(path: Path):
    """A text stream of a plain or gzipped file (igzip)."""
    return igzip.open(path, "rt") if is_gzip(path) else open(path)
FORMATS = ("fasta", "swiss")


class TruncatedInput(PrepError):
    """The input ended in the middle of a record or of a gzip stream; the caller adds the record count."""


class _HashingReader(io.RawIOBase):
    """Pass-through reader that computes the SHA-256 and size of the raw (compressed) bytes."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
            self.size += n
        return n

    def drain(self) -> None:
        """Hash whatever the decompressor left unread (trailing bytes) so the checksum covers the file."""
        while data := self.raw.read(1 << 20):
            self.sha256.update(data)
            self.size += len(data)


class InputFile:
    """A FASTA or UniProt flat file, plain or gzipped, read as blocks of complete records."""

    def __init__(self, path: str | Path, fmt: str = "auto", block_size: int = 4 << 20):
        self.path, self.block_size = Path(path), block_size
        if not self.path.is_file():
            raise PrepError(f"{self.path}: no such file")
        self.gzipped = is_gzip(self.path)
        self.format = fmt
        self.sha256 = ""
        self.size = self.path.stat().st_size

    def blocks(self) -> Iterator[bytes]:
        """Yield blocks of whole records; checks the file's start, binary data and truncation."""
        with open(self.path, "rb", buffering=0) as raw:
            hashing = _HashingReader(raw)
            stream = igzip.IGzipFile(fileobj=hashing, mode="rb") if self.gzipped else io.BufferedReader(hashing, 1 << 20)
            tail, first = b"", True
            while True:
                try:
                    data = stream.read(self.block_size)
                except (EOFError, OSError) as e:  # isal raises EOFError on truncation, OSError on bad data
                    raise TruncatedInput(f"{self.path}: truncated or corrupt gzip stream ({e})") from None
                if b"\x00" in data:
                    raise PrepError(f"{self.path}: binary data (NUL byte) in the input; not a FASTA or UniProt flat file")
                buf = tail + data
                if first and buf:
                    self._check_start(buf)
                    first = False
                if not data:
                    break
                cut = self._last_boundary(buf)
                if cut > 0:
                    yield buf[:cut]
                    tail = buf[cut:]
                else:
                    tail = buf
            if tail.strip():
                if self.format == "swiss" and not re.search(rb"(^|\n)//[ \t\r]*\n?$", tail.rstrip(b"\r\n") + b"\n"):
                    raise TruncatedInput(f"{self.path}: unterminated flat-file record at end of file (no '//' line)")
                yield tail
            hashing.drain()
            self.sha256, self.size = hashing.sha256.hexdigest(), hashing.size

    def _check_start(self, buf: bytes) -> None:
        """Detect the format (auto) and refuse text before the first record."""
        stripped = buf.lstrip()
        first_line = stripped.split(b"\n", 1)[0][:60].decode("latin-1")
        line_no = buf[: len(buf) - len(stripped)].count(b"\n") + 1
        if self.format == "auto":
            if stripped.startswith(b">"):
                self.format = "fasta"
            elif stripped.startswith(b"ID   "):
                self.format = "swiss"
            elif b"\n>" in buf:
                raise PrepError(f"{self.path}: line {line_no}: text before the first '>' header: {first_line!r}")
            else:
                raise PrepError(
                    f"{self.path}: not a FASTA or UniProt flat file (line {line_no} starts {first_line!r}); "
                    "pass --format if it is one"
                )
        elif self.format == "fasta" and stripped and not stripped.startswith(b">"):
            raise PrepError(f"{self.path}: line {line_no}: text before the first '>' header: {first_line!r}")
        elif self.format == "swiss" and stripped and not stripped.startswith(b"ID   "):
            raise PrepError(f"{self.path}: line {line_no}: expected a flat-file 'ID' line, found {first_line!r}")

    def _last_boundary(self, buf: bytes) -> int:
        """Offset just past the last complete record in `buf` (0 if none is complete yet)."""
        if self.format == "fasta":
            return buf.rfind(b"\n>") + 1
        end = buf.rfind(b"\n//")
        if end < 0:
            return 0
        nl = buf.find(b"\n", end + 3)
        return nl + 1 if nl >= 0 else 0


def _title_accession(title: bytes) -> str:
    """fasta_accession of a raw title; the UniProt `sp|ACC|` / `tr|ACC|` case without decoding the title."""
    if title[2:3] == b"|" and title[:2] in (b"sp", b"tr"):
        end = title.find(b"|", 3)
        acc = title[3:end]
        if end > 3 and not any(c in acc for c in (b" ", b"\r")):  # no other whitespace in fast-path blocks
            return acc.decode("latin-1")
    return fasta_accession(title.decode("latin-1"))


def fasta_accession(title: str) -> str:
    """UniProt accession of a FASTA title (`sp|P12345|NAME ...` -> P12345), else its first word."""
    word = title.split(None, 1)[0] if title.strip() else ""
    parts = word.split("|")
    return parts[1] if len(parts) >= 3 and parts[0] in ("sp", "tr") else word


# A parsed record: (accession or "", Pfam families from the entry, sequence bytes, error or None).
Parsed = tuple[str, tuple[str, ...], bytes, str | None]

# Whitespace that str.rstrip() removes at line ends besides ' ' and '\r' (see parse_fasta).
_RARE_SPACE = tuple(bytes([c]) for c in b"\t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0")


def parse_fasta_biopython(block: bytes) -> Iterator[Parsed]:
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    for title, seq in SimpleFastaParser(io.StringIO(block.decode("latin-1"))):
        yield fasta_accession(title), (), seq.encode("latin-1"), None


def parse_fasta(block: bytes) -> Iterator[Parsed]:
    """Records of a FASTA block, exactly as Bio.SeqIO.FastaIO.SimpleFastaParser reads them, 4x faster.

    SimpleFastaParser loops over lines in Python (about 0.7 us a line, the bottleneck of the whole
    prep). It strips trailing whitespace of every line, joins, and removes ' ' and '\r'. When the
    only whitespace is ' ', '\r' and '\n' that equals removing those three characters from the
    record's body, which bytes.replace does in C. Blocks holding any other whitespace character go
    to SimpleFastaParser itself. tests/test_data_prep.py checks the two agree.
    """
    if any(c in block for c in _RARE_SPACE):  # one memchr each: 10x faster than a regex class
        yield from parse_fasta_biopython(block)
        return
    start = 0 if block.startswith(b">") else block.find(b"\n>") + 1
    if start == 0 and not block.startswith(b">"):
        return  # only blank lines (text before the first '>' was refused by InputFile)
    for rec in block[start + 1 :].split(b"\n>"):
        title, _, body = rec.partition(b"\n")
        yield _title_accession(title), (), body.replace(b"\n", b"").replace(b" ", b"").replace(b"\r", b""), None


_AC_LINE = re.compile(r"^AC   (\S+?);", re.M)


def _swiss_record(rec) -> Parsed:
    families = tuple(x[1] for x in rec.cross_references if x[0] == "Pfam")
    return rec.accessions[0] if rec.accessions else "", families, rec.sequence.encode("latin-1"), None


def parse_swiss(block: bytes) -> Iterator[Parsed]:
    """Records of a block of flat-file entries (Bio.SwissProt); an entry it cannot read comes with its error.

    The whole block goes through one SwissProt.parse call (20% faster than entry by entry); only a
    block with a malformed entry is re-read entry by entry to find and skip that entry.
    """
    from Bio import SwissProt

    text = block.decode("latin-1")
    try:
        records = [_swiss_record(r) for r in SwissProt.parse(io.StringIO(text))]
    except (ValueError, SwissProt.SwissProtParserError):
        records = None
    if records is not None:
        yield from records
        return
    for entry in re.split(r"(?<=\n)//[ \t\r]*\n", text):
        if not entry.strip():
            continue
        try:
            yield _swiss_record(SwissProt.read(io.StringIO(entry + "//\n")))
        except (ValueError, SwissProt.SwissProtParserError) as e:
            m = _AC_LINE.search(entry)
            yield (m.group(1) if m else ""), (), b"", str(e).splitlines()[0]


PARSERS = {"fasta": parse_fasta, "fasta-biopython": parse_fasta_biopython, "swiss": parse_swiss}
