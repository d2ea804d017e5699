"""Streaming input: plain or gzipped files and pipes, read once and cut into blocks of whole records.

Each input is opened once (protein_performer.fasta: gzip is recognised through the buffer's peek), so a pipe
(`<(zcat a.fasta.gz)`) works, and the size and SHA-256 in the manifest are those of the bytes read. Decompression
(python-isal's igzip, about 3x faster than zlib) runs in a reader thread (parallel.prefetch).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from protein_performer.errors import UserError
from protein_performer.fasta import check_input, open_binary

Format = Literal["auto", "fasta", "swiss"]  # auto: by the first line
_FLAT_FILE_END = re.compile(rb"(^|\n)//[ \t\r]*\n?$")


class TruncatedInput(UserError):
    """The input ended in the middle of a record or of a gzip stream; the pipeline adds how far it got."""


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
    """A FASTA or UniProt flat file, plain or gzipped, regular file or pipe, read as blocks of complete records.

    size, sha256 and gzipped are known once `blocks` is exhausted; records is set by the pipeline.
    """

    def __init__(self, path: str | Path, fmt: Format = "auto", block_size: int = 4 << 20):
        self.path, self.block_size = check_input(path), block_size
        if self.path.is_file() and self.path.stat().st_size == 0:  # pipes and devices are found empty when read
            raise UserError(f"{self.path}: empty input: no records")
        self.format = fmt
        self.gzipped, self.sha256, self.size, self.records = False, "", 0, 0

    def blocks(self) -> Iterator[bytes]:
        """Yield blocks of whole records; checks the file's start, binary data, emptiness and truncation."""
        with self._open() as raw:
            hashing = _HashingReader(raw)
            stream, self.gzipped = open_binary(self.path, hashing)
            tail, started = b"", False
            while True:
                data = self._read(stream)
                if b"\x00" in data:
                    raise UserError(
                        f"{self.path}: binary data (NUL byte) in the input; not a FASTA or UniProt flat file"
                    )
                buf = tail + data
                if not started and buf.strip():
                    self._check_start(buf)
                    started = True
                if not data:
                    break
                cut = self._last_boundary(buf) if started else 0
                if cut > 0:
                    yield buf[:cut]
                    tail = buf[cut:]
                else:
                    tail = buf
            if not started:
                raise UserError(f"{self.path}: empty input: no records" + (" (only blank lines)" if tail else ""))
            if tail.strip():
                if self.format == "swiss" and not _FLAT_FILE_END.search(tail.rstrip(b"\r\n") + b"\n"):
                    raise TruncatedInput(f"{self.path}: unterminated flat-file record at end of file (no '//' line)")
                yield tail
            hashing.drain()
            self.sha256, self.size = hashing.sha256.hexdigest(), hashing.size

    def _open(self):
        try:
            return open(self.path, "rb", buffering=0)
        except OSError as e:
            raise UserError(f"{self.path}: cannot read input: {e.strerror}") from None

    def _read(self, stream) -> bytes:
        try:
            return stream.read(self.block_size)
        except (EOFError, OSError) as e:  # isal raises EOFError on truncation, OSError on bad data
            if self.gzipped:
                raise TruncatedInput(f"{self.path}: truncated or corrupt gzip stream ({e})") from None
            raise UserError(f"{self.path}: read error: {e.strerror or e}") from None

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
                raise UserError(f"{self.path}: line {line_no}: text before the first '>' header: {first_line!r}")
            else:
                raise UserError(
                    f"{self.path}: not a FASTA or UniProt flat file (line {line_no} starts {first_line!r}); "
                    "pass --format if it is one"
                )
        elif self.format == "fasta" and not stripped.startswith(b">"):
            raise UserError(f"{self.path}: line {line_no}: text before the first '>' header: {first_line!r}")
        elif self.format == "swiss" and not stripped.startswith(b"ID   "):
            raise UserError(f"{self.path}: line {line_no}: expected a flat-file 'ID' line, found {first_line!r}")

    def _last_boundary(self, buf: bytes) -> int:
        """Offset just past the last complete record in `buf` (0 if none is complete yet)."""
        if self.format == "fasta":
            return buf.rfind(b"\n>") + 1
        end = buf.rfind(b"\n//")
        if end < 0:
            return 0
        nl = buf.find(b"\n", end + 3)
        return nl + 1 if nl >= 0 else 0
