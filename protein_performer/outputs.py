"""Where commands write: never over a user's files by surprise, never half-written.

A command refuses an existing output unless --overwrite; with it, a directory is reused only if this command
wrote it (its marker file) or it is empty, and only the files the command writes are removed first, so no
stale output of an earlier run sits beside the new one. Files are written beside their target and renamed
into place, so an interrupted command leaves the old file or none.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_output_dir(path: str | Path, overwrite: bool, marker: str) -> Path:
    """`path` checked before any work: new, empty, or (with overwrite) written earlier by this command."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"{path}: exists and is not empty; pass --overwrite to replace this command's files in it")
        if not (path / marker).is_file():
            raise UserError(f"{path}: not written by this command (no {marker}): --overwrite replaces only such a "
                            "directory or an empty one; choose another --out")
    return path


def fresh_output_dir(path: Path, patterns: tuple[str, ...]) -> Path:
    """`path` (checked by check_output_dir) created, or cleared of the command's earlier files, just before writing."""
    path.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for stale in path.glob(pattern):
            stale.unlink()
    return path


def output_file(path: str | Path, overwrite: bool) -> Path:
    """`path` checked as a new file (or an existing one to replace with overwrite); its directory created."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file beside `path`; it replaces `path` only when the block ends without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
