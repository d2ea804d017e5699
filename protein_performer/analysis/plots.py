"""Figures. Built on matplotlib.figure.Figure with the Agg canvas: no pyplot state, no GUI backend, safe
in scripts, tests and notebooks alike (a notebook shows a returned Figure with IPython's display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .similarity import AMINO_ACIDS


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    fig.savefig(path, dpi=dpi)
    return Path(path)


def _contrast_max(a: np.ndarray) -> float:
    # A few very large weights (often on the first token) would wash out the rest of the map.
    return float(max(np.quantile(a, 0.99), 1e-6))


def attention_grid(maps: np.ndarray, title: str) -> Figure:
    """Layers x heads grid of one protein's attention maps; maps (n_layers, H, L, L)."""
    n_layers, n_heads = maps.shape[:2]
    fig = new_figure(1.6 * n_heads + 0.5, 1.6 * n_layers + 0.6)
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            a = maps[layer, head]
            ax.imshow(a, cmap="Blues", vmin=0, vmax=_contrast_max(a), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    fig.suptitle(f"{title} (colour scale per map: 0 to its 99th percentile)", fontsize=10)
    return fig


def attention_head(a: np.ndarray, letters: str, title: str) -> Figure:
    """One head's (L, L) map with the residue letters on both axes (every k-th when L is long)."""
    length = len(letters)
    size = float(np.clip(length * 0.09, 5, 14))
    fig = new_figure(size + 1.2, size)
    ax = fig.subplots()
    im = ax.imshow(a, cmap="Blues", vmin=0, vmax=_contrast_max(a), interpolation="nearest")
    step = max(1, int(np.ceil(length / 120)))
    ticks = np.arange(0, length, step)
    labels = [letters[i] if step == 1 else f"{letters[i]}{i}" for i in ticks]
    fontsize = 5 if step == 1 and length > 60 else 7
    ax.set_xticks(ticks, labels, fontsize=fontsize, rotation=90 if step > 1 else 0)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("attended-to residue (key)")
    ax.set_ylabel("attending residue (query)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")
    return fig


def fmt(x: float | None, spec: str = ".2f") -> str:
    """A number for a title or a line of text; "n/a" when undefined (None or NaN)."""
    return "n/a" if x is None or x != x else format(x, spec)


def similarity_heatmaps(matrices: dict[str, np.ndarray], agreements: dict[str, dict], columns: int = 3) -> Figure:
    """20 x 20 heatmaps (diagonal blank) in a grid; titles carry each matrix's agreement with BLOSUM62."""
    rows = -(-len(matrices) // columns)
    fig = new_figure(5.2 * min(columns, len(matrices)), 4.8 * rows)
    axes = fig.subplots(rows, min(columns, len(matrices)), squeeze=False).ravel()
    for ax in axes[len(matrices):]:
        ax.set_visible(False)
    for ax, (name, m) in zip(axes, matrices.items()):
        m = np.where(np.eye(len(m), dtype=bool), np.nan, m)
        limit = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
        sns.heatmap(pd.DataFrame(m, index=list(AMINO_ACIDS), columns=list(AMINO_ACIDS)), ax=ax, cmap="RdBu_r",
                    vmin=-limit, vmax=limit, square=True, xticklabels=True, yticklabels=True, cbar_kws={"shrink": 0.7})
        if not np.isfinite(m).any():
            ax.text(0.5, 0.5, "undefined:\ntoo few heads kept", transform=ax.transAxes, ha="center", va="center")
        ax.tick_params(labelsize=8, rotation=0)
        title = name
        if name in agreements:
            g = agreements[name]
            title += (f"\nvs BLOSUM62: Pearson {fmt(g['pearson'])} (p={fmt(g['pearson_p'], '.2g')}), "
                      f"Spearman {fmt(g['spearman'])} (p={fmt(g['spearman_p'], '.2g')})")
        ax.set_title(title, fontsize=9)
    return fig


def agreement_over_training(table: pd.DataFrame) -> Figure:
    """Against the training step, one line per run: Pearson r with BLOSUM62 of the attention variants (top) and
    of the controls (bottom), filled where the permutation p-value is below 0.001, and the heads' mean attention
    entropy (1 = uniform rows)."""
    panels = [("weighted", "attention, weighted"), ("threshold", "attention, threshold"),
              ("entropy", "attention entropy (1 = uniform)"),
              ("embedding", "token embeddings (control)"), ("output", "output layer (control)")]
    fig = new_figure(13, 7.2)
    first = fig.add_subplot(2, 3, 1)
    axes = [first] + [fig.add_subplot(2, 3, i, sharex=first, sharey=None if i == 3 else first)  # r on one scale
                      for i in (2, 3, 4, 5)]
    for ax, (key, title) in zip(axes, panels):
        column = key if key == "entropy" else f"{key}_r"
        for (run, kind), rows in table.groupby(["run", "attention"], sort=False):
            rows = rows.dropna(subset=[column])
            line, = ax.plot(rows["step"], rows[column], marker="o", mfc="none", ms=4,
                            label=f"{kind} ({Path(str(run)).name})")
            if key != "entropy":
                strong = rows[rows[f"{key}_p"] < 1e-3]
                ax.plot(strong["step"], strong[column], "o", ms=4, color=line.get_color())
        if key != "entropy":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("Pearson r with BLOSUM62")
    axes[3].set_ylabel("Pearson r with BLOSUM62")
    legend = fig.add_subplot(2, 3, 6)
    legend.axis("off")
    legend.legend(*first.get_legend_handles_labels(), loc="center", fontsize=8)
    fig.suptitle("Amino-acid similarity vs BLOSUM62 along training (filled: permutation p < 0.001)", fontsize=10)
    return fig


def agreement_by_layer(table: pd.DataFrame) -> Figure:
    """Pearson agreement with BLOSUM62 per layer for each variant; filled markers where p < 0.05."""
    fig = new_figure(6.5, 3.8)
    ax = fig.subplots()
    for variant, rows in table.groupby("variant", sort=False):
        line, = ax.plot(rows["layer"], rows["pearson"], marker="o", mfc="none", label=variant)
        significant = rows[rows["pearson_p"] < 0.05]
        ax.plot(significant["layer"], significant["pearson"], "o", color=line.get_color())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("Pearson r with BLOSUM62 (190 pairs)")
    ax.set_title("Agreement by layer (filled: permutation p < 0.05)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def length_histograms(lengths: dict[str, np.ndarray], bins: int = 50) -> Figure:
    """Sequence-length histogram of every split (log-spaced bins: protein lengths span orders of magnitude)."""
    fig = new_figure(4 * len(lengths), 3.2)
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    for ax, (split, n) in zip(axes, lengths.items()):
        if n.size:
            ax.hist(n, bins=np.geomspace(max(n.min(), 1), n.max() + 1, bins))
            ax.set_xscale("log")
            ax.axvline(np.median(n), color="k", ls="--", lw=0.8, label=f"median {np.median(n):.0f}")
            ax.legend(fontsize=8)
        ax.set_title(f"{split} ({n.size:,} sequences)", fontsize=10)
        ax.set_xlabel("residues")
    axes[0].set_ylabel("sequences")
    return fig


def composition_bars(shares: pd.DataFrame) -> Figure:
    """Amino-acid composition of each split as grouped bars (letters on the x axis)."""
    fig = new_figure(12, 3.6)
    ax = fig.subplots()
    shares.T.plot.bar(ax=ax, width=0.8, rot=0)
    ax.set_ylabel("share of residues")
    ax.set_title("Amino-acid composition per split", fontsize=10)
    return fig


def training_curves(metrics: pd.DataFrame) -> Figure:
    """Loss, perplexity, accuracy and learning rate against the step, train and validation together."""
    panels = [("loss", ["train/loss", "val/loss"]), ("perplexity", ["train/ppl", "val/ppl", "val/baseline_ppl"]),
              ("accuracy", ["train/acc", "val/acc", "val/baseline_acc"]), ("learning rate", ["train/lr"])]
    panels = [(name, [c for c in cols if c in metrics]) for name, cols in panels]
    panels = [(name, cols) for name, cols in panels if cols]
    if not panels:
        raise ValueError(f"no known metric columns among {list(metrics.columns)}")
    fig = new_figure(4 * len(panels), 3.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, cols) in zip(axes, panels):
        for col in cols:
            rows = metrics[["step", col]].dropna()
            ax.plot(rows["step"], rows[col], marker="o" if len(rows) < 30 else None, ms=3, label=col)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return fig
