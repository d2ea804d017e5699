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


@contextmanager
def fresh_output_dir(path: Path, patterns: tuple[str, ...]) -> Iterator[Path]:
    """`path` (checked by check_output_dir) created; when the block ends without error, the files of `patterns`
    it did not (re)write are removed, so no stale output of an earlier run stays beside the new ones. The block
    writes the command's marker file last; an interrupted block leaves the earlier run's files, marker included,
    so a later --overwrite is still accepted."""
    path.mkdir(parents=True, exist_ok=True)
    before = {f: _identity(f) for pattern in patterns for f in path.glob(pattern)}
    yield path
    for f, identity in before.items():
        if f.exists() and _identity(f) == identity:  # neither replaced nor rewritten by this run
            f.unlink()


def _identity(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_ino, st.st_mtime_ns


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; an output is as readable as any new file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def by_age(root: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` anywhere under `root`, oldest first: the last is what a run wrote most recently
    (the newest checkpoint, the newest metrics.csv), as Lightning's `--ckpt_path last` picks."""
    return sorted(root.rglob(pattern), key=lambda p: p.stat().st_mtime)
