"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this module is importable)."""

from __future__ import annotations

import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def time_memory_plot(rows: list[dict], path: Path, series: str, time_label: str, memory: str, memory_label: str) -> None:
    """Log-log time and peak memory against sequence length, one line per (series, mode), like the paper's Fig. 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, name in sorted({(r["mode"], r[series]) for r in rows}):
        pts = [r for r in rows if r["mode"] == mode and r[series] == name and r["seconds"]]
        if not pts:
            continue
        style = "--" if mode == "causal" else "-"
        lengths = [r["length"] for r in pts]
        axes[0].loglog(lengths, [r["seconds"] for r in pts], style, marker="o", label=f"{name} ({mode})")
        axes[1].loglog(lengths, [r[memory] for r in pts], style, marker="o", label=f"{name} ({mode})")
    axes[0].set(xlabel="sequence length L", ylabel=time_label, title="time")
    axes[1].set(xlabel="sequence length L", ylabel=memory_label, title="memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
