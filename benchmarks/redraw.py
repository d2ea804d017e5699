"""Feature redrawing at CPU scale (issue 26, section 1): favor-softmax with its random features never redrawn or
redrawn every N steps, at small and large m, beside exact attention, all at equal steps on identical batches. The
report of scripts/reproduce_redraw.sh, which trains the runs it reads:

    RUNS/exact-seed<S>/             exact (softmax) attention
    RUNS/m<M>-never-seed<S>/        favor-softmax, M random features, never redrawn
    RUNS/m<M>-every<N>-seed<S>/     favor-softmax, M random features, redrawn every N steps
    RUNS/fresh/<run>-draw<D>/       (optional) `validate` of a trained run's weights with a fresh draw of features
    RUNS/report/gap.csv             (optional) the exact runs with uniform attention (q = k = 0), written by
                                    `benchmarks/attention_gap.py curve RUNS --parents exact-seed0 ...`

Prints and writes RUNS/report/redraw.md (validation perplexity at the end and at a few steps: mean +- half the
range over seeds; the paired change against never redrawing, same seed and m), redraw.csv (every validation) and
a figure of validation perplexity against steps (--plot, default RUNS/report/redraw.png).

    python benchmarks/redraw.py runs/redraw --plot docs/redraw.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd
from results_io import markdown, uniform_controls, validations

from protein_performer.analysis import plots
from protein_performer.analysis.overview import read_metrics
from protein_performer.machine import machine_line

RUN = re.compile(r"(?P<setting>exact|m(?P<m>\d+)-(?P<redraw>never|every\d+))-seed(?P<seed>\d+)")


def setting_order(setting: str) -> tuple[int, int, int]:
    """exact first, then by m, then never before every N (N descending: rarer redraws first)."""
    match = RUN.fullmatch(setting + "-seed0")
    if match is None or match["m"] is None:
        return (0, 0, 0)
    every = 0 if match["redraw"] == "never" else int(match["redraw"][len("every"):])
    return (1, int(match["m"]), 0 if every == 0 else 10**9 - every)


def collect(runs: Path) -> pd.DataFrame:
    """setting, seed, step, val/ppl of every validation of every run under RUNS (long form)."""
    frames = []
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        match = RUN.fullmatch(run.name)
        if match is None:
            continue
        if not list(run.rglob("metrics.csv")):  # started, nothing logged yet
            print(f"{run.name}: no metrics.csv yet, left out")
            continue
        frames.append(validations(run).assign(setting=match["setting"], seed=int(match["seed"])))
    if not frames:
        raise SystemExit(f"no runs named like exact-seed0 or m16-never-seed0 under {runs}")
    return pd.concat(frames, ignore_index=True)[["setting", "seed", "step", "val/ppl"]]


def cell(values: pd.Series) -> str:
    """mean +- half the range (over seeds) of a few perplexities."""
    return f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"


def summary(long: pd.DataFrame, steps: list[int]) -> pd.DataFrame:
    """One row per setting: seeds, the last step all its seeds reached, validation perplexity at each of `steps`
    and at that last step (mean +- half the range over seeds), and each seed's final value."""
    rows = []
    for setting in sorted(long["setting"].unique(), key=setting_order):
        runs = long[long["setting"] == setting]
        last = int(runs.groupby("seed")["step"].max().min())
        row = {"setting": setting, "seeds": runs["seed"].nunique(), "steps": last}
        for step in steps:
            at = runs[runs["step"] == step]["val/ppl"]
            row[f"step {step}"] = cell(at) if len(at) else "-"
        final = runs[runs["step"] == last].sort_values("seed")
        row["final"] = cell(final["val/ppl"])
        row["per seed"] = " / ".join(f"{v:.3f}" for v in final["val/ppl"])
        rows.append(row)
    return pd.DataFrame(rows)


def paired(long: pd.DataFrame) -> pd.DataFrame:
    """Final val/ppl of each redrawn setting minus never redrawn with the same m and seed (same weights at step 0,
    same first features, same batches), and of every favor-softmax setting minus exact with the same seed."""
    final = long.loc[long.groupby(["setting", "seed"])["step"].idxmax()].set_index(["setting", "seed"])["val/ppl"]
    rows = []
    for setting in sorted(final.index.get_level_values("setting").unique(), key=setting_order):
        match = RUN.fullmatch(setting + "-seed0")
        if match["m"] is None:
            continue
        against = {"exact": "exact"}
        if match["redraw"] != "never":
            against["never redrawn"] = f"m{match['m']}-never"
        for name, other in against.items():
            if other not in final.index.get_level_values("setting"):
                continue
            diff = (final[setting] - final[other]).dropna()
            if len(diff):
                rows.append({"setting": setting, "minus": name, "per seed": " / ".join(f"{d:+.3f}" for d in diff),
                             "mean": f"{diff.mean():+.3f}"})
    return pd.DataFrame(rows)


def fresh_table(runs: Path) -> pd.DataFrame:
    """Trained weights validated with fresh features (RUNS/fresh/<run>-draw<D>): the run's own final val/ppl
    beside the fresh draw's, i.e. how much a model depends on the particular features it was trained with; and
    exact runs with uniform attention (RUNS/report/gap.csv): what their perplexity owes to attention at all."""
    rows = []
    for run in sorted(p for p in (runs / "fresh").glob("*-draw*") if p.is_dir()):
        name, draw = run.name.rsplit("-draw", 1)
        own = validations(runs / name)["val/ppl"].iloc[-1] if (runs / name).is_dir() else float("nan")
        rows.append({"run": name, "validated with": f"fresh features (feature seed {draw})",
                     "own": round(float(own), 3), "changed": round(float(validations(run)["val/ppl"].iloc[-1]), 3)})
    for row in uniform_controls(runs).to_dict("records"):
        rows.append({"run": row["run"], "validated with": "uniform attention (q = k = 0)",
                     "own": round(float(row["val/ppl"]), 3), "changed": round(float(row["uniform"]), 3)})
    return pd.DataFrame(rows)


def label(setting: str) -> str:
    """The legend entry of a setting within its panel (of one m)."""
    if setting == "exact":
        return "exact attention"
    redraw = setting.split("-", 1)[1]
    return "never redrawn" if redraw == "never" else "redrawn every " + redraw.removeprefix("every") + " steps"


def figure(long: pd.DataFrame):
    fig = plots.new_figure(11, 4.4)
    ms = sorted({int(s[1:].split("-")[0]) for s in long["setting"] if s.startswith("m")})
    axes = fig.subplots(1, len(ms), sharey=True, squeeze=False)[0]
    colors = {"never": "C3", "every100": "C0", "every10": "C2"}
    for ax, m in zip(axes, ms):
        for setting in sorted(long["setting"].unique(), key=setting_order):
            if not (setting == "exact" or setting.startswith(f"m{m}-")):
                continue
            stats = long[long["setting"] == setting].groupby("step")["val/ppl"].agg(["mean", "min", "max"])
            color = "k" if setting == "exact" else colors.get(setting.split("-", 1)[1], "C4")
            ax.plot(stats.index, stats["mean"], marker=".", color=color, label=label(setting))
            ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15)
        ax.set(xlabel="training steps", title=f"favor-softmax, m = {m}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation perplexity (mean; band: min-max over seeds)")
    later = long[long["step"] >= long["step"].max() / 4]["val/ppl"]  # the first validations would flatten the rest
    axes[0].set_ylim(later.min() - 0.05, later.max() + 0.05)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the OUT_DIR of scripts/reproduce_redraw.sh")
    parser.add_argument("--plot", type=Path, help="where the figure goes (default RUNS/report/redraw.png)")
    parser.add_argument("--steps", type=int, nargs="*", help="steps shown beside the final value "
                        "(default: a quarter, half and three quarters of the way)")
    args = parser.parse_args()
    out = args.runs / "report"
    out.mkdir(parents=True, exist_ok=True)

    long = collect(args.runs)
    validated = sorted(long["step"].unique())
    steps = args.steps or sorted({validated[min(len(validated) - 1, round(f * len(validated)) - 1)]
                                  for f in (0.25, 0.5, 0.75)})
    table = summary(long, steps)
    lines = [f"# Feature redrawing\n\n{machine_line()}\n",
             f"Validation perplexity (unigram baseline {baseline(args.runs):.2f}); each cell is the mean ± half "
             "the range over seeds.\n", markdown(table),
             "\n## Paired differences in final validation perplexity (same seed)\n", markdown(paired(long))]
    fresh = fresh_table(args.runs)
    if len(fresh):
        lines += ["\n## Trained weights validated with their attention changed (no training)\n", markdown(fresh)]
    long.to_csv(out / "redraw.csv", index=False)
    plot = plots.save(figure(long), args.plot or out / "redraw.png")
    (out / "redraw.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwrote {out}/redraw.md, redraw.csv and {plot}")


def baseline(runs: Path) -> float:
    """The unigram baseline's validation perplexity, logged beside every validation."""
    for run in sorted(p for p in runs.iterdir() if RUN.fullmatch(p.name)):
        frame = read_metrics(run)
        if "val/baseline_ppl" in frame:
            return float(frame["val/baseline_ppl"].dropna().iloc[-1])
    return float("nan")


if __name__ == "__main__":
    main()
