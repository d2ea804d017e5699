"""The paper's Fig. 4: error of the FAVOR attention OUTPUT against exact softmax attention, against m.

Orthogonal vs IID projections, positive (softmax) vs trigonometric features; L = 4096, d = 16, 15 draws of
normalised inputs (docs/paper_notes.md section 4): every row of q and k has the same norm (one panel per --norms value,
the norm before FAVOR's d^-1/4 scaling), v ~ N(0, I). The error of a draw is the mean squared difference of the
two outputs; the figure shows the mean over draws and the band between the smallest and the largest draw.
Writes DIR/feature_error.csv and DIR/feature_error.png, and prints whether the expected orderings
(orthogonal < IID, positive < trig) show.

    python benchmarks/feature_error.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.ticker import NullLocator
from results_io import RESULTS, machine_line, parse_args, write_csv

from protein_performer.analysis import plots
from protein_performer.attention import favor_attention, orthogonal_gaussian_matrix, softmax_attention

KINDS = [("softmax", True), ("softmax", False), ("trig", True), ("trig", False)]  # (kernel, orthogonal)


def label(kernel: str, orthogonal: bool) -> str:
    return f"{'positive' if kernel == 'softmax' else 'trig'}, {'orthogonal' if orthogonal else 'IID'}"


def inputs(length: int, d: int, norm: float, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k with every row of norm `norm`, v ~ N(0, I): (1, 1, L, d) float64."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q * (norm / q.norm(dim=-1, keepdim=True)), k * (norm / k.norm(dim=-1, keepdim=True)), v


def measure(length: int, d: int, norm: float, features: list[int], draws: int) -> list[dict]:
    errors = {(kind, m): [] for kind in KINDS for m in features}
    for draw in range(draws):
        q, k, v = inputs(length, d, norm, seed=draw)
        exact = softmax_attention(q, k, v)
        for ((kernel, orthogonal), m), errs in errors.items():
            g = torch.Generator().manual_seed(10_000 + 1000 * draw + m)  # paired: same W for both kernels
            w = orthogonal_gaussian_matrix(m, d, orthogonal=orthogonal, generator=g, dtype=torch.float64)
            out = favor_attention(q, k, v, w, kernel=kernel)
            errs.append(((out - exact) ** 2).mean().item())
    rows = []
    for ((kernel, orthogonal), m), e in errors.items():
        t = torch.tensor(e, dtype=torch.float64)
        rows.append({"norm": norm, "kernel": kernel, "projection": "orthogonal" if orthogonal else "iid", "m": m,
                     "mse_mean": t.mean().item(), "mse_std": t.std().item() if draws > 1 else 0.0,
                     "mse_min": t.min().item(), "mse_max": t.max().item(), "draws": draws})
    return rows


def orderings(rows: list[dict]) -> list[str]:
    """For each norm: at how many m each expected ordering of the mean errors holds."""
    mean = {(r["norm"], r["kernel"], r["projection"], r["m"]): r["mse_mean"] for r in rows}
    lines = []
    for norm in sorted({r["norm"] for r in rows}):
        ms = sorted({r["m"] for r in rows if r["norm"] == norm})
        for name, pairs in (
            ("orthogonal < IID", [(("softmax", "orthogonal"), ("softmax", "iid"), "positive"),
                                  (("trig", "orthogonal"), ("trig", "iid"), "trig")]),
            ("positive < trig", [(("softmax", "orthogonal"), ("trig", "orthogonal"), "orthogonal"),
                                 (("softmax", "iid"), ("trig", "iid"), "IID")]),
        ):
            for better, worse, which in pairs:
                held = [m for m in ms if mean[(norm, *better, m)] < mean[(norm, *worse, m)]]
                verdict = "shows" if len(held) == len(ms) else "does not show" if not held else "partly shows"
                where = f" (m = {', '.join(map(str, held))})" if 0 < len(held) < len(ms) else ""
                lines.append(f"|q| = |k| = {norm:g}, {name} ({which}): {len(held)}/{len(ms)} values of m{where}: "
                             f"the run {verdict} it")
    return lines


def plot(rows: list[dict], path: Path, length: int, d: int) -> None:
    norms = sorted({r["norm"] for r in rows})
    fig = plots.new_figure(4.2 * len(norms), 3.8)
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    for ax, norm in zip(axes, norms):
        for kernel, orthogonal in KINDS:
            projection = "orthogonal" if orthogonal else "iid"
            pts = sorted((r["m"], r["mse_mean"], r["mse_min"], r["mse_max"]) for r in rows
                         if r["norm"] == norm and r["kernel"] == kernel and r["projection"] == projection)
            m, mean, low, high = zip(*pts)
            style = "-" if orthogonal else "--"
            color = "tab:blue" if kernel == "softmax" else "tab:red"
            ax.plot(m, mean, style, color=color, marker="o", ms=3, label=label(kernel, orthogonal))
            ax.fill_between(m, low, high, color=color, alpha=0.12 if orthogonal else 0.06, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="random features m", title=f"|q| = |k| = {norm:g}")
        ax.set_xticks(m, [str(x) for x in m])
        ax.xaxis.set_minor_locator(NullLocator())
    axes[0].set_ylabel("MSE of the attention output")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"FAVOR vs exact softmax attention, L = {length}, d = {d} (mean, band: min-max over draws)",
                 fontsize=9)
    plots.save(fig, path)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--nb_features", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--draws", type=int, default=15)
    p.add_argument("--norms", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="row norms of q and k; 2 = the scale of N(0, 0.5^2) entries at d = 16")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = parse_args(p, argv)
    print(machine_line())
    print(f"L={args.length} d={args.d} m={args.nb_features} draws={args.draws} norms={args.norms}")
    rows = []
    for norm in args.norms:
        rows += measure(args.length, args.d, norm, args.nb_features, args.draws)
        for r in rows[-len(KINDS) * len(args.nb_features):]:
            print(f"|q|={norm:<4g} {label(r['kernel'], r['projection'] == 'orthogonal'):<22} m={r['m']:<5} "
                  f"MSE {r['mse_mean']:.3e} (min {r['mse_min']:.1e}, max {r['mse_max']:.1e})", flush=True)
    write_csv(rows, args.out / "feature_error.csv")
    plot(rows, args.out / "feature_error.png", args.length, args.d)
    print("expected (paper, Fig. 4): orthogonal < IID and positive < trig")
    for line in orderings(rows):
        print(line)


if __name__ == "__main__":
    main()
