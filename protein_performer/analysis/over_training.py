"""Agreement with BLOSUM62 along training: the analysis of a series of checkpoints, one row per checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoints import load_model, read_checkpoint
from ..errors import UserError
from ..outputs import by_age
from ..proteins import Protein
from . import plots
from .compute import CONTROLS, VARIANTS, analyze_attention
from .plots import fmt


def checkpoint_steps(paths: list[str]) -> dict[tuple[str, int], Path]:
    """(run, step) -> checkpoint, for every *.ckpt given or found under the run directories given. One per step:
    last.ckpt repeats a step that a step checkpoint holds too (the newer file wins). A run is the folder that
    holds checkpoints/ (or the checkpoint's own folder)."""
    found: dict[tuple[str, int], Path] = {}
    for p in map(Path, paths):
        files = by_age(p, "*.ckpt") if p.is_dir() else [p]
        if not files:
            raise UserError(f"{p}: no checkpoint (*.ckpt) there")
        for f in files:
            run = f.parent.parent if f.parent.name == "checkpoints" else f.parent
            found[(str(run), int(read_checkpoint(f).get("global_step", -1)))] = f  # mmap: reads the step only
    return dict(sorted(found.items()))


def agreement_over_training(ckpts: list[str], proteins: list[Protein], *, device: str = "cpu",
                            progress: bool | None = None, **analysis) -> pd.DataFrame:
    """One row per checkpoint: run, attention kind, step, and per similarity (attention variants, controls)
    its Pearson r with BLOSUM62, p-value and heads used, plus the mean attention entropy. `analysis` goes to
    analyze_attention (max_len, offset, threshold, min_kept, permutations, seed)."""
    rows = []
    for (run, step), path in checkpoint_steps(ckpts).items():
        loaded = load_model(path, device)
        result = analyze_attention(loaded, proteins, per_layer=False, progress=progress, **analysis)
        row = {"run": run, "checkpoint": path.name, "attention": loaded.config.attention, "step": step}
        for name in (*VARIANTS, *CONTROLS):
            g = result.agreement[name]
            row.update({f"{name}_r": g["pearson"], f"{name}_p": g["pearson_p"]})
            if "heads_used" in g:
                row[f"{name}_heads"] = g["heads_used"]
        row["entropy"] = float(np.nanmean(result.entropy))
        rows.append(row)
    return pd.DataFrame(rows)


def write_agreement_over_training(table: pd.DataFrame, out: str | Path) -> str:
    """agreement_over_training.csv and .png under `out`; returns a short text summary."""
    out = Path(out)
    plots.save(plots.agreement_over_training(table), out / "agreement_over_training.png")
    table.to_csv(out / "agreement_over_training.csv", index=False)  # the command's marker: last
    last = table.groupby("run").tail(1)
    lines = [f"agreement with BLOSUM62 of {len(table)} checkpoints written to {out}"]
    for _, r in last.iterrows():
        lines.append(f"  {r['run']} ({r['attention']}, step {r['step']}): weighted r = {fmt(r['weighted_r'])} "
                     f"(p = {fmt(r['weighted_p'], '.2g')}), threshold r = {fmt(r['threshold_r'])} "
                     f"({r['threshold_heads']} heads), embedding r = {fmt(r['embedding_r'])}, "
                     f"output layer r = {fmt(r['output_r'])}")
    return "\n".join(lines)
