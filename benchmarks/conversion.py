"""Backward compatibility at CPU scale: a softmax Transformer's weights made a Performer, with no training and after
a short fine-tune, against a Performer trained from scratch for as many steps. The report of
scripts/reproduce_conversion.sh, which trains the runs it reads:

    RUNS/exact/                 the parent: an exact (softmax) causal Transformer
    RUNS/step0/m<M>-seed<S>/    `validate` of the parent's weights with favor-softmax attention of M random
                                features drawn from feature seed S, no training
    RUNS/step0/favor-relu/      the same with favor-relu attention
    RUNS/report/gap.csv         the parent with uniform attention (q = k = 0) at each of its checkpoints
                                (`attention_gap.py curve RUNS --parents exact`): what its perplexity owes to
                                where its attention looks, the yardstick of the swaps
    RUNS/converted/             favor-softmax fine-tuned from the parent (--model.init_from)
    RUNS/scratch/               favor-softmax trained from scratch, as many steps as the fine-tune

Writes RUNS/report/conversion.md (the tables), conversion.csv (every validation) and conversion.png (validation
perplexity against steps). With --held_out FASTA it also measures the attention's agreement with BLOSUM62 (the
similarity recipe's analysis) before the swap, right after it and after the fine-tune.

    python benchmarks/conversion.py runs/conversion --held_out UP000002717-S.elongatus.fasta.gz
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
from results_io import markdown, uniform_controls, validations

from protein_performer.analysis import plots
from protein_performer.analysis.compute import analyze_attention
from protein_performer.checkpoints import LoadedModel, find_checkpoint, init_from_checkpoint, load_model
from protein_performer.machine import machine_line
from protein_performer.model import ProteinLM
from protein_performer.proteins import read_proteins

WITHIN = 0.02  # "recovered": validation perplexity within 2% of the parent's


def first_within(frame: pd.DataFrame, target: float) -> int | None:
    """The first validated step whose perplexity is within WITHIN of target (None: never)."""
    hits = frame[frame["val/ppl"] <= (1 + WITHIN) * target]
    return int(hits["step"].iloc[0]) if len(hits) else None


def step0_table(runs: Path) -> pd.DataFrame:
    """features, seed, val/ppl of the parent's weights under favor-softmax, before any training."""
    rows = []
    for run in sorted((runs / "step0").glob("m*-seed*")):
        m, seed = map(int, re.fullmatch(r"m(\d+)-seed(\d+)", run.name).groups())
        rows.append({"features": m, "seed": seed, "val/ppl": float(validations(run)["val/ppl"].iloc[-1])})
    return pd.DataFrame(rows).sort_values(["features", "seed"])


def agreement_rows(runs: Path, held_out: str, features: int, num_sequences: int) -> pd.DataFrame:
    """Attention vs BLOSUM62 (weighted and threshold variants, windows from residue 51, 128 tokens) of the parent,
    of its weights under favor-softmax with no training, and of the fine-tuned model."""
    proteins, _ = read_proteins(held_out, num_sequences)
    parent = load_model(runs / "exact")
    swapped = ProteinLM(replace(parent.config, attention="favor-softmax", nb_features=features))
    path, _ = init_from_checkpoint(swapped, parent.objective, parent.path)
    models = {"exact parent": parent,
              "swapped to favor-softmax, no training": LoadedModel(swapped.eval(), swapped.cfg, parent.objective, 0,
                                                                   path),
              "fine-tuned": load_model(runs / "converted")}
    rows = []
    for name, loaded in models.items():
        result = analyze_attention(loaded, proteins, max_len=128, offset=50, per_layer=False, progress=False)
        w, t = result.agreement["weighted"], result.agreement["threshold"]
        rows.append({"model": name, "weighted r": w["pearson"], "weighted p": w["pearson_p"],
                     "threshold r": t["pearson"], "threshold heads": t["heads_used"]})
    return pd.DataFrame(rows)


def figure(curves: dict[str, pd.DataFrame], step0: pd.DataFrame, parent_ppl: float, fine_tune_features: int,
           uniform: float | None):
    fig = plots.new_figure(7, 4.2)
    ax = fig.subplots()
    for (name, frame), color in zip(curves.items(), ("C0", "C1", "C7")):
        ax.plot(frame["step"], frame["val/ppl"], marker=".", color=color, label=name)
    at0 = step0.groupby("features")["val/ppl"].mean()
    ax.scatter([0] * len(at0), at0.values, color="C0", marker="x", zorder=3,
               label="no training, m = " + ", ".join(map(str, at0.index)))
    if uniform is not None:
        ax.axhline(uniform, color="C3", linestyle="--", label=f"the parent with uniform attention ({uniform:.2f})")
    ax.axhspan(parent_ppl, (1 + WITHIN) * parent_ppl, color="C2", alpha=0.25,
               label=f"within {WITHIN:.0%} of the exact parent ({parent_ppl:.2f})")
    ax.set(xlabel="training steps of this run", ylabel="validation perplexity",
           title=f"softmax Transformer -> Performer (favor-softmax, m = {fine_tune_features})")
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the OUT_DIR of scripts/reproduce_conversion.sh")
    parser.add_argument("--held_out", help="FASTA of proteins for the BLOSUM62 agreement (none: skip it)")
    parser.add_argument("--num_sequences", type=int, default=300, help="proteins of --held_out analysed")
    args = parser.parse_args()
    out = args.runs / "report"
    out.mkdir(parents=True, exist_ok=True)

    parent = validations(args.runs / "exact")
    parent_ppl = float(parent["val/ppl"].iloc[-1])
    converted, scratch = validations(args.runs / "converted"), validations(args.runs / "scratch")
    features = load_model(args.runs / "converted").config.nb_features
    step0 = step0_table(args.runs)
    start = step0[(step0["features"] == features) & (step0["seed"] == 0)]["val/ppl"]  # the fine-tune's own draw
    if len(start):
        converted = pd.concat([pd.DataFrame({"step": [0], "val/ppl": start.values[:1]}), converted],
                              ignore_index=True)
    curves = {"converted from the exact parent": converted, "favor-softmax from scratch": scratch,
              "exact parent (from scratch)": parent}

    controls = {}
    if (args.runs / "step0" / "favor-relu").is_dir():
        controls["favor-relu"] = float(validations(args.runs / "step0" / "favor-relu")["val/ppl"].iloc[-1])
    uniform = uniform_controls(args.runs).set_index("run")["uniform"]
    if "exact" in uniform:
        controls["uniform"] = float(uniform["exact"])
    notes = []
    if "favor-relu" in controls:
        notes.append(f"\nSwapped to favor-relu, no training: {controls['favor-relu']:.3f}.")
    if "uniform" in controls:
        kept = (controls["uniform"] - step0["val/ppl"].mean()) / (controls["uniform"] - parent_ppl)
        notes.append(f"\nThe parent with uniform attention (q = k = 0), the yardstick: {controls['uniform']:.3f}. "
                     f"The favor-softmax swap keeps {kept:.0%} of the parent's gain over it (mean over m and seeds).")
    lines = [f"# Softmax Transformer -> Performer by fine-tuning\n\n{machine_line()}\n",
             f"Exact parent: {find_checkpoint(args.runs / 'exact')}, {int(parent['step'].iloc[-1])} steps, "
             f"validation perplexity **{parent_ppl:.3f}**.\n",
             "## Swapped to favor-softmax, no training (validation perplexity over feature seeds)\n",
             markdown(step0.groupby("features")["val/ppl"].agg(["mean", "min", "max", "count"]).round(3).reset_index()),
             *notes,
             f"\n## Steps to come within {WITHIN:.0%} of the parent ({(1 + WITHIN) * parent_ppl:.3f})\n",
             "| run | steps run | first step within 2% | first step below the uniform-attention parent | "
             "final validation perplexity |", "| --- | --- | --- | --- | --- |"]
    for name, frame in curves.items():
        hit = first_within(frame, parent_ppl)
        below = first_within(frame, controls["uniform"] / (1 + WITHIN)) if "uniform" in controls else None
        lines.append(f"| {name} | {int(frame['step'].iloc[-1])} | {'not reached' if hit is None else hit} | "
                     f"{'-' if below is None else below} | {frame['val/ppl'].iloc[-1]:.3f} |")
    if args.held_out:
        table = agreement_rows(args.runs, args.held_out, features, args.num_sequences)
        lines += [f"\n## Attention vs BLOSUM62 ({args.num_sequences} proteins of {Path(args.held_out).name}, "
                  "128-token windows from residue 51)\n", markdown(table.round(4))]
    pd.concat([f.assign(run=n) for n, f in curves.items()]).to_csv(out / "conversion.csv", index=False)
    plots.save(figure(curves, step0, parent_ppl, features, controls.get("uniform")), out / "conversion.png")
    (out / "conversion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwrote {out}/conversion.md, conversion.csv, conversion.png")


if __name__ == "__main__":
    main()
