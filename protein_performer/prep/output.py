"""Where the prep writes: a hidden temporary directory beside OUT, swapped in at the end, under a lock.

- One run per OUT: `.OUT.lock` beside OUT is held (fcntl.flock) for the whole run and names its holder; a second
  run into the same OUT stops at once. Locks are released by the kernel when a run dies, however it dies.
- Temporary directories `.OUT.tmp-*` of runs that were killed are removed by the next run into OUT: holding the
  lock proves no live run owns them.
- OUT is never merged into: a new OUT must not exist (unless --overwrite), and --overwrite replaces only a
  prepared directory (its manifest.json and split directories, nothing else) or an empty directory. Both are
  checked at the start and again at the swap, under the lock.
- Swap: the old OUT is renamed aside, the new one renamed in, the old one removed; a failed run removes its
  temporary directory and leaves OUT as it was. An OSError while writing (disk full) becomes a UserError.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from protein_performer.errors import UserError
from protein_performer.prep import PROG
from protein_performer.prepared import MANIFEST_FILE, OFFSETS_FILE, SPLITS, TOKENS_FILE

PREPARED_ENTRIES = frozenset({MANIFEST_FILE, *SPLITS})
SPLIT_FILES = frozenset({TOKENS_FILE, OFFSETS_FILE})
# flock on some cluster file systems (Lustre without -o flock, old NFS): the run goes on without a lock
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
log = logging.getLogger(__name__)


def _megabytes(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 1e6


class OutputDir:
    """Context manager: a locked temporary directory that becomes `out` on success and vanishes on failure."""

    def __init__(self, out: str | Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
        self.given = Path(out)
        self.out = self.given.resolve()
        self.overwrite = overwrite
        for path in inputs:
            if self.out in Path(path).resolve().parents:
                raise UserError(f"{path}: input lies inside the output directory {self.given}; choose another --out")
        self.parent = self.out.parent
        self.lock_path = self.parent / f".{self.out.name}.lock"
        self.tmp = self.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._lock_fd: int | None = None

    # ---- the lock ----

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "starting"
                os.close(fd)
                if e.errno in _NO_LOCKS:
                    self.lock_path.unlink(missing_ok=True)
                    log.warning(
                        f"{self.parent}: the file system does not support locks ({e.strerror}): a concurrent run into "
                        f"{self.given} would not be noticed, and temporary directories of killed runs are left alone"
                    )
                    return
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(
                    f"{self.given}: another {PROG} run is writing it ({holder}; lock {self.lock_path}); "
                    "wait for it to finish or choose another --out"
                ) from None
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # a run that finished meanwhile unlinked this file: lock the new one
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
        )
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)  # before closing: a run waiting on this inode sees it is stale
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- checks ----

    def _check_target(self, when: str) -> None:
        """Refuse an OUT that the run may not replace (see the module docstring)."""
        if not self.out.exists():
            return
        if not self.out.is_dir():
            raise UserError(f"{self.given}: exists and is not a directory{when}; choose another --out")
        if not self.overwrite:
            raise UserError(f"{self.given}: output directory exists{when}; pass --overwrite to replace it")
        entries = sorted(p.name for p in self.out.iterdir())
        if entries and MANIFEST_FILE not in entries:
            raise UserError(
                f"{self.given}: not a prepared directory (no {MANIFEST_FILE}) and not empty{when}: --overwrite "
                "replaces only a prepared directory or an empty one; choose another --out"
            )
        foreign = [name for name in entries if name not in PREPARED_ENTRIES]
        for split in PREPARED_ENTRIES.intersection(SPLITS).intersection(entries):
            inside = sorted(p.name for p in (self.out / split).iterdir()) if (self.out / split).is_dir() else [""]
            foreign += [f"{split}/{name}".rstrip("/") for name in inside if name not in SPLIT_FILES]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise UserError(
                f"{self.given}: holds files {PROG} did not write ({shown}){when}; --overwrite replaces "
                "only a prepared directory or an empty one: move them or choose another --out"
            )

    def _remove_stale(self) -> None:
        """Remove what killed runs left beside OUT (the lock we hold proves they are dead)."""
        stale = sorted(self.parent.glob(f".{self.out.name}.tmp-*"))
        old = sorted(self.parent.glob(f".{self.out.name}.old-*"))
        if self.out.exists():  # an .old-* is the previous OUT only if the swap was cut between its two renames
            stale += old
        elif old:
            log.info(
                f"kept {', '.join(p.name for p in old)} beside {self.given}: a run was killed while replacing it, and "
                "that directory may hold the previous output"
            )
        if not stale:
            return
        megabytes = sum(_megabytes(p) for p in stale)
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        what = "temporary directory" if len(stale) == 1 else "temporary directories"
        log.info(
            f"removed {len(stale)} {what} left beside {self.given} by killed runs ({megabytes:.1f} MB): "
            f"{', '.join(p.name for p in stale)}"
        )

    # ---- the run ----

    def __enter__(self) -> Path:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as e:
            raise UserError(f"{self.given}: cannot create the output directory ({e.strerror})") from None
        try:
            self._check_target("")
            if self._lock_fd is not None:  # only the lock proves the owners of temporary directories are dead
                self._remove_stale()
            self.tmp.mkdir()
        except OSError as e:
            self._unlock()
            raise UserError(f"{self.given}: cannot create the output directory ({e.strerror})") from None
        except BaseException:
            self._unlock()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._swap()
                except BaseException:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
                return
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # reading errors are UserErrors by now: this one happened writing
                raise UserError(
                    f"{self.given}: cannot write the prepared data: {exc.strerror or exc}; nothing was "
                    "written and the temporary files were removed"
                ) from None
        finally:
            self._unlock()

    def _swap(self) -> None:
        self._check_target(" (it appeared or changed during this run)")
        old = self.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}" if self.out.exists() else None
        try:
            if old is not None:
                os.rename(self.out, old)
            try:
                os.rename(self.tmp, self.out)
            except OSError:
                if old is not None:
                    os.rename(old, self.out)
                raise
        except OSError as e:
            raise UserError(f"{self.given}: cannot move the prepared data into place ({e.strerror})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
