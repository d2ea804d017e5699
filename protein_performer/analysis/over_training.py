"""Agreement with BLOSUM62 along training: the analysis of a series of checkpoints, one row per checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import load_model
from ..errors import UserError
from ..proteins import Protein
from . import plots
from .compute import CONTROLS, VARIANTS, analyze_attention


def checkpoint_files(paths: list[str]) -> list[Path]:
    """Every *.ckpt given or found under the run directories given, without duplicates (last.ckpt repeats a step)."""
    files: list[Path] = []
    for p in map(Path, paths):
        found = sorted(p.rglob("*.ckpt")) if p.is_dir() else [p]
        if not found:
            raise UserError(f"{p}: no checkpoint (*.ckpt) there")
        files += found
    return list(dict.fromkeys(files))


def agreement_over_training(ckpts: list[str], proteins: list[Protein], *, device: str = "cpu",
                            progress: bool | None = None, **analysis) -> pd.DataFrame:
    """One row per checkpoint: run, attention kind, step, and per similarity (attention variants, controls)
    its Pearson r with BLOSUM62, p-value and heads used, plus the mean attention entropy. `analysis` goes to
    analyze_attention (max_length, threshold, min_kept, permutations, seed)."""
    rows = []
    for path in checkpoint_files(ckpts):
        loaded = load_model(path, device)
        result = analyze_attention(loaded, proteins, progress=progress, **analysis)
        row = {"run": str(path.parent.parent if path.parent.name == "checkpoints" else path.parent),
               "checkpoint": path.name, "attention": loaded.config.attention, "step": loaded.step}
        for name in (*VARIANTS, *CONTROLS):
            g = result.agreement[name]
            row.update({f"{name}_r": g["pearson"], f"{name}_p": g["pearson_p"]})
            if "heads_used" in g:
                row[f"{name}_heads"] = g["heads_used"]
        row["entropy"] = float(np.nanmean(result.entropy))
        rows.append(row)
    table = pd.DataFrame(rows)
    # one row per (run, step): last.ckpt and a step checkpoint of the same step are the same model
    return table.drop_duplicates(["run", "step"]).sort_values(["run", "step"]).reset_index(drop=True)


def write_agreement_over_training(table: pd.DataFrame, out: str | Path) -> str:
    """agreement_over_training.csv and .png under `out`; returns a short text summary."""
    out = Path(out)
    table.to_csv(out / "agreement_over_training.csv", index=False)
    plots.save(plots.agreement_over_training(table), out / "agreement_over_training.png")
    last = table.groupby("run").tail(1)
    lines = [f"agreement with BLOSUM62 of {len(table)} checkpoints written to {out}"]
    for _, r in last.iterrows():
        lines.append(f"  {r['run']} ({r['attention']}, step {r['step']}): weighted r = {_fmt(r['weighted_r'])} "
                     f"(p = {_fmt(r['weighted_p'], '.2g')}), threshold r = {_fmt(r['threshold_r'])} "
                     f"({r['threshold_heads']} heads), embedding r = {_fmt(r['embedding_r'])}")
    return "\n".join(lines)


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)
