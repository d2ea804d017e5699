"""What the prep says on stderr besides errors: warnings, notes and the progress bar, in one voice."""

from __future__ import annotations

import sys

PROG = "protein-performer-prep"


def say(message: str, kind: str = "warning") -> None:
    """`PROG: KIND: message` on stderr, without breaking a running progress bar."""
    line = f"{PROG}: {kind}: {message}"
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        tqdm.tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: bool | None):
    """tqdm bar with residues/s; without one (off, or not a terminal) tqdm is not even imported (70 ms)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="res", unit_scale=True, file=sys.stderr, desc="prep")
