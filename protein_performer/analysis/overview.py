"""Readers behind the notebooks: statistics of a prepared data directory and a run's training logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import vocab
from ..errors import UserError
from ..outputs import by_age
from ..prepared import PreparedDir


def split_lengths(root: str | Path) -> dict[str, np.ndarray]:
    """Residues per sequence (EOS excluded) of every split of a prepared directory, in split order."""
    corpus = PreparedDir(root)
    return {split: corpus.split(split).lengths for split in corpus.splits}


TABLE1 = ("count", "residues", "min", "max", "mean", "std", "median")


def split_table(root: str | Path) -> pd.DataFrame:
    """The paper's Table 1 columns per split (sequences, residues, min / max / mean / std / median length), as
    protein-performer-prep computed them into the manifest."""
    corpus = PreparedDir(root)
    rows = {split: {k: corpus.manifest["splits"][split].get(k) for k in TABLE1} for split in corpus.splits}
    return pd.DataFrame.from_dict(rows, orient="index").rename(columns={"count": "sequences"})


def composition(root: str | Path) -> pd.DataFrame:
    """Share of each of the 25 letters among the residues of every split (rows: splits)."""
    corpus, rows = PreparedDir(root), {}
    for split in corpus.splits:
        letters = corpus.split(split).token_counts()[: len(vocab.LETTERS)]
        rows[split] = letters / max(letters.sum(), 1)
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(vocab.LETTERS))


def find_metrics(path: str | Path) -> Path:
    """metrics.csv of a CSVLogger run: the file itself, or the newest one under a directory."""
    path = Path(path)
    if path.is_file():
        return path
    found = by_age(path, "metrics.csv") if path.is_dir() else []
    if not found:
        raise UserError(f"no metrics.csv (Lightning CSVLogger) under {path}")
    return found[-1]


def read_metrics(path: str | Path) -> pd.DataFrame:
    """A run's logged metrics, one row per step (CSVLogger writes train and val values on separate rows)."""
    frame = pd.read_csv(find_metrics(path))
    return frame.groupby("step", as_index=False).first() if "step" in frame else frame
