"""Writing an AnalysisResult: figures, CSV matrices and summary.json under one directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .compute import CONTROLS, VARIANTS, AnalysisResult
from .similarity import AMINO_ACIDS, blosum62


def _aa_frame(m: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(m, index=pd.Index(list(AMINO_ACIDS), name="aa"), columns=list(AMINO_ACIDS))


def write_analysis(result: AnalysisResult, out: str | Path, **about) -> dict:
    """Write the figures and tables of `result` under `out`; returns the summary also written to summary.json.
    `about` (e.g. input=..., split=...) is recorded in the summary as given."""
    out = Path(out)
    files = {}

    def put(name: str, path: Path) -> None:
        files[name] = path.name

    if result.featured is not None:
        f = result.featured
        put("attention_grid", plots.save(plots.attention_grid(f.maps, f"{f.name}: attention of every layer and head"),
                                         out / "attention_grid.png"))
        put("attention_head", plots.save(plots.attention_head(f.maps[f.head], f.letters,
                                                              f"{f.name}: layer {f.head[0]}, head {f.head[1]}"),
                                         out / "attention_head.png"))
        np.savez_compressed(out / "attention_maps.npz", maps=f.maps.astype(np.float16), letters=f.letters, name=f.name)
        put("attention_maps", out / "attention_maps.npz")
    for name in (*VARIANTS, *CONTROLS):
        _aa_frame(result.similarity[name]).to_csv(out / f"similarity_{name}.csv")
        put(f"similarity_{name}", out / f"similarity_{name}.csv")
    _aa_frame(blosum62()).to_csv(out / "blosum62.csv")
    result.by_layer.to_csv(out / "agreement_by_layer.csv", index=False)
    result.head_shares.to_csv(out / "head_shares.csv", index=False)
    pd.DataFrame(result.entropy, index=pd.Index(range(len(result.entropy)), name="layer")).to_csv(
        out / "attention_entropy.csv")
    for name in ("blosum62", "agreement_by_layer", "head_shares", "attention_entropy"):
        put(name, out / f"{name}.csv")
    titles = {"threshold": f"attention, threshold {result.threshold:g}", "weighted": "attention, weighted",
              "embedding": "token embeddings (control)", "output": "output layer (control)"}
    heatmaps = {titles[k]: result.similarity[k] for k in (*VARIANTS, *CONTROLS)} | {"BLOSUM62": blosum62()}
    agreements = {titles[k]: result.agreement[k] for k in (*VARIANTS, *CONTROLS)}
    put("similarity", plots.save(plots.similarity_heatmaps(heatmaps, agreements, columns=3), out / "similarity.png"))
    put("agreement_by_layer_plot",
        plots.save(plots.agreement_by_layer(result.by_layer), out / "agreement_by_layer.png"))

    summary = {
        **about,
        "model": result.model,
        "num_sequences": result.num_sequences,
        "num_residues": result.num_residues,
        "max_len": result.max_len,
        "cropped_sequences": result.cropped_sequences,
        "offset": result.offset,
        "short_sequences": result.short_sequences,
        "threshold": result.threshold,
        "min_kept": result.min_kept,
        "seed": result.seed,
        **{f"{k}_similarity": result.agreement[k] for k in (*VARIANTS, *CONTROLS)},
        "mean_attention_entropy": float(np.nanmean(result.entropy)),
        "by_layer": result.by_layer.astype(object).where(result.by_layer.notna(), None).to_dict("records"),
        **result.timing,
        "files": files,
    }
    if result.featured is not None:
        f = result.featured
        summary["featured"] = {"name": f.name, "entry": f.entry, "length": len(f.letters) - 1,
                               "head": {"layer": f.head[0], "head": f.head[1]},
                               "identity_trick_max_abs_diff": f.identity_trick_max_abs_diff}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False, default=_plain) + "\n")
    return summary


def _plain(x):
    """JSON for numpy scalars (pandas records hold them)."""
    return x.item() if isinstance(x, np.generic) else str(x)


def headline(summary: dict, out: str | Path) -> str:
    """A few lines for the terminal: where the report is and how well attention agrees with BLOSUM62."""

    def line(name: str, g: dict) -> str:
        used = f"; {g['heads_used']}/{g['heads_total']} heads" if "heads_used" in g else ""
        if g["pearson"] is None:
            return f"  {name}: undefined ({g['pairs']} pairs{used})"
        return (f"  {name}: Pearson {g['pearson']:.3f} (p={g['pearson_p']:.2g}), Spearman {g['spearman']:.3f} "
                f"(p={g['spearman_p']:.2g}){used}")

    skipped = (f"; windows from residue {summary['offset'] + 1}, {summary['short_sequences']} proteins no longer "
               "than that left out") if summary["offset"] else ""
    return "\n".join([
        f"attention analysis of {summary['num_sequences']} proteins ({summary['num_residues']:,} residues, "
        f"cropped to {summary['max_len']} tokens: {summary['cropped_sequences']}{skipped}) written to {Path(out)}",
        "amino-acid similarity vs BLOSUM62 (one-sided permutation p-values):",
        line(f"attention, threshold {summary['threshold']:g} (Vig et al.)", summary["threshold_similarity"]),
        line("attention, weighted", summary["weighted_similarity"]),
        line("token embeddings (control)", summary["embedding_similarity"]),
        line("output layer (control)", summary["output_similarity"]),
    ])
