"""Opening what users hand the tools, and naming FASTA records.

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
