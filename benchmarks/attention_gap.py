"""Where attention matters, and how much of it a conversion keeps (issue 26, section 2). The report of
scripts/reproduce_variants.sh, which trains the runs it reads (each a `protein-performer fit` run directory under
RUNS, saving a checkpoint at every validation):

    curve:       every checkpoint of each exact parent validated as trained and with uniform attention (q = k = 0:
                 each position averages what it sees), the *gap* = uniform's perplexity / the parent's - 1.
                 Writes RUNS/report/gap.csv (checkpoints already in it, by run and file time, are not validated
                 again), gap.md and a figure; --choose_from names the runs among which the one
                 with the largest final gap becomes the conversion's parent (written to RUNS/report/parent).
    conversion:  the parent's weights under favor-softmax (m = 32 .. 256, two feature draws) and favor-relu with
                 no training, the fine-tunes started from it and the Performers trained from scratch, each as the
                 share of the parent's gain over uniform attention it has (1: the parent's perplexity, 0: uniform's).
                 Writes RUNS/report/conversion_gap.md and a figure.

    python benchmarks/attention_gap.py curve runs/variants --parents causal-exact masked-exact \
        --choose_from causal-exact masked-exact --plot docs/attention_gap.png
    python benchmarks/attention_gap.py conversion runs/variants --converted converted-fs64 converted-relu \
        --scratch masked-fs64 masked-relu --plot docs/conversion_gap.png

Validation runs in this process through Lightning's Trainer (the run's own validation data and precision), so a
control costs seconds.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import yaml
from results_io import markdown, validations

from protein_performer.analysis import plots
from protein_performer.checkpoints import find_checkpoint
from protein_performer.machine import machine_line
from protein_performer.training.datamodule import ProteinDataModule
from protein_performer.training.lightning_cli import auto_precision
from protein_performer.training.module import ProteinLMModule

SWAP_FEATURES = (32, 64, 128, 256)
SWAP_SEEDS = (0, 1)


def precision(ckpt: Path) -> str:
    """The precision the run that wrote `ckpt` trained in (its config.yaml; null: what the machine picks)."""
    config = yaml.safe_load(next(ckpt.parent.parent.rglob("config.yaml")).read_text())
    return config["trainer"].get("precision") or auto_precision("cpu")[0]


def val_ppl(module: ProteinLMModule, ckpt: Path) -> float:
    """Validation perplexity of `module` on the validation data of the run that wrote `ckpt`, in its precision."""
    data = ProteinDataModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision(ckpt), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers, once per call
        return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/ppl"])


def trained(ckpt: Path) -> ProteinLMModule:
    return ProteinLMModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)


def uniform(module: ProteinLMModule) -> ProteinLMModule:
    """`module` with q = k = 0 in every layer (in place): all scores equal, so attention averages the values."""
    with torch.no_grad():
        for name, weight in module.model.named_parameters():
            if name.endswith("attn.qkv.weight"):  # rows: q, k, v, each d_model
                weight[: 2 * weight.shape[1]] = 0
    return module


def swapped(ckpt: Path, **config) -> ProteinLMModule:
    """A new module of the parent's hyper-parameters with other attention settings, its weights from `ckpt`."""
    hp = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    hp = {k: v for k, v in hp.items() if not k.startswith("_")}  # LightningCLI's own entries (_instantiator)
    return ProteinLMModule(**{**hp, "config": {**hp["config"], **config}, "init_from": str(ckpt)})


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, file) of a run's checkpoints (best, last, one per validation with save_top_k -1), one per step."""
    found = {}
    for path in sorted(run.glob("checkpoints/*.ckpt")):
        found.setdefault(int(torch.load(path, map_location="cpu", weights_only=True)["global_step"]), path)
    if not found:
        raise SystemExit(f"{run}: no checkpoints (a run of `protein-performer fit` writes them under checkpoints/)")
    return sorted(found.items())


def curve(args) -> None:
    out = args.runs / "report"
    out.mkdir(parents=True, exist_ok=True)
    # a checkpoint validated by an earlier call (same run, step and file time) is not validated again
    done = pd.read_csv(out / "gap.csv") if (out / "gap.csv").exists() else pd.DataFrame(columns=["run", "mtime"])
    done = {(r["run"], r["mtime"]): r for r in done.to_dict("records")}
    rows = []
    for name in args.parents:
        for step, ckpt in checkpoints(args.runs / name):
            row = done.get((name, ckpt.stat().st_mtime))
            if row is None:
                module = trained(ckpt)
                ppl = val_ppl(module, ckpt)
                flat = val_ppl(uniform(module), ckpt)  # the same weights, q and k zeroed in place
                row = {"run": name, "step": step, "val/ppl": ppl, "uniform": flat, "gap": flat / ppl - 1,
                       "mtime": ckpt.stat().st_mtime}
            rows.append(row)
            print(f"{name} step {step}: {row['val/ppl']:.3f}, uniform attention {row['uniform']:.3f} "
                  f"(gap {row['gap']:+.2%})", flush=True)
        pd.DataFrame(rows).to_csv(out / "gap.csv", index=False)  # after each run: a stopped call keeps its work
    frame = pd.DataFrame(rows)
    final = frame.groupby("run", sort=False).last().reset_index()
    table = final.assign(**{"val/ppl": final["val/ppl"].round(3), "uniform": final["uniform"].round(3),
                            "gap": (100 * final["gap"]).round(2).astype(str) + "%",
                            "largest gap": [f"{100 * g:.2f}% (step {s})" for g, s in (
                                frame.loc[frame.groupby("run", sort=False)["gap"].idxmax(), ["gap", "step"]]
                                .itertuples(index=False))]})
    lines = ["# The uniform-attention gap over training\n", machine_line() + "\n",
             "Final checkpoint of each parent (validation perplexity as trained and with q = k = 0):\n",
             markdown(table[["run", "step", "val/ppl", "uniform", "gap", "largest gap"]])]
    if args.choose_from:
        last = final.set_index("run").loc[args.choose_from, "gap"]
        (out / "parent").write_text(str(last.idxmax()) + "\n")
        lines.append(f"\nConversion parent (largest final gap of {', '.join(args.choose_from)}): {last.idxmax()}")
    (out / "gap.md").write_text("\n".join(lines) + "\n")
    plots.save(gap_figure(frame), args.plot or out / "attention_gap.png")
    print("\n".join(lines) + f"\n\nwrote {out}/gap.csv, gap.md")


def gap_figure(frame: pd.DataFrame):
    fig = plots.new_figure(7, 4)
    ax = fig.subplots()
    for name, group in frame.groupby("run", sort=False):
        ax.plot(group["step"], 100 * group["gap"], marker=".", label=name)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set(xlabel="training steps", ylabel="uniform attention's perplexity over the parent's (%)",
           title="What perplexity owes to where attention looks")
    ax.legend(fontsize=8)
    return fig


def kept(ppl: float, parent: float, flat: float) -> float:
    """The share of the parent's gain over uniform attention that a model has (1: the parent's perplexity)."""
    return (flat - ppl) / (flat - parent)


def conversion(args) -> None:
    out = args.runs / "report"
    gap = pd.read_csv(out / "gap.csv")
    name = args.parent or (out / "parent").read_text().strip()
    final = gap[gap["run"] == name].iloc[-1]
    parent, flat = float(final["val/ppl"]), float(final["uniform"])
    ckpt = find_checkpoint(args.runs / name)
    rows = [{"model": f"parent ({name}, {int(final['step'])} steps)", "val/ppl": parent},
            {"model": "parent with uniform attention", "val/ppl": flat}]
    for m in SWAP_FEATURES:
        for seed in SWAP_SEEDS:
            ppl = val_ppl(swapped(ckpt, attention="favor-softmax", nb_features=m, feature_seed=seed), ckpt)
            rows.append({"model": f"swap to favor-softmax m = {m}, draw {seed}, no training", "val/ppl": ppl})
    rows.append({"model": "swap to favor-relu, no training",
                 "val/ppl": val_ppl(swapped(ckpt, attention="favor-relu"), ckpt)})
    curves = {}
    for run in args.converted:
        curves[f"{run} (fine-tuned from the parent)"] = frame = validations(args.runs / run)
        for step in sorted({int(frame["step"].iloc[0]), 100, int(frame["step"].iloc[-1])} & set(frame["step"])):
            rows.append({"model": f"{run}, fine-tuned {step} steps",
                         "val/ppl": float(frame.loc[frame["step"] == step, "val/ppl"].iloc[0])})
    reach = []
    for run in args.scratch:
        curves[f"{run} (from scratch)"] = frame = validations(args.runs / run)
        hit = frame[frame["val/ppl"] <= parent]
        best = frame.loc[frame["val/ppl"].idxmin()]
        reach.append({"run": run, "steps run": int(frame["step"].iloc[-1]),
                      "first step at or below the parent": int(hit["step"].iloc[0]) if len(hit) else "not reached",
                      "best val/ppl (step)": f"{best['val/ppl']:.3f} ({int(best['step'])})",
                      "share kept at the end": f"{kept(float(frame['val/ppl'].iloc[-1]), parent, flat):.0%}"})
    table = pd.DataFrame(rows)
    table["share of the gain kept"] = [f"{kept(p, parent, flat):.0%}" for p in table["val/ppl"]]
    table["val/ppl"] = table["val/ppl"].round(3)
    lines = [f"# Conversion from {name}: the share of attention's gain kept\n", machine_line() + "\n",
             f"Parent {parent:.3f}, uniform attention {flat:.3f} (gap {flat / parent - 1:.2%}).\n",
             markdown(table), "\nTrained from scratch (same data; each run with its own warm-up and schedule):\n",
             markdown(pd.DataFrame(reach)) if reach else "(none given)"]
    (out / "conversion_gap.md").write_text("\n".join(lines) + "\n")
    table.to_csv(out / "conversion_gap.csv", index=False)
    fig = plots.new_figure(7, 4.2)
    ax = fig.subplots()
    span = max(abs(flat - parent), 0.05)  # the curves near both lines; their first validations off the top
    for label, frame in curves.items():
        ax.plot(frame["step"], frame["val/ppl"], marker=".", label=label)
    swaps = table[table["model"].str.startswith("swap")]["val/ppl"]
    ax.scatter([0] * len(swaps), swaps, marker="x", color="k", zorder=3,
               label="the parent's weights swapped, no training")
    ax.axhline(parent, color="C2", linestyle="--", label=f"the parent ({parent:.2f})")
    ax.axhline(flat, color="C3", linestyle="--", label=f"the parent with uniform attention ({flat:.2f})")
    ax.set(xlabel="training steps of this run", ylabel="validation perplexity",
           ylim=(min(parent, flat) - span / 2, max(parent, flat) + 2 * span), title=f"{name} made a Performer")
    ax.legend(fontsize=8)
    plots.save(fig, args.plot or out / "conversion_gap.png")
    print("\n".join(lines) + f"\n\nwrote {out}/conversion_gap.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("curve", "conversion"):
        sub = commands.add_parser(command)
        sub.add_argument("runs", type=Path, help="the OUT_DIR of scripts/reproduce_variants.sh")
        sub.add_argument("--plot", type=Path, help="the figure (default: RUNS/report/<report>.png)")
    commands.choices["curve"].add_argument("--parents", nargs="+", required=True, help="exact runs under RUNS")
    commands.choices["curve"].add_argument("--choose_from", nargs="*", default=[],
                                           help="runs among which the largest final gap names the parent")
    conv = commands.choices["conversion"]
    conv.add_argument("--parent", help="the parent run (default: the one `curve` chose)")
    conv.add_argument("--converted", nargs="*", default=[], help="runs fine-tuned from the parent")
    conv.add_argument("--scratch", nargs="*", default=[], help="Performers trained from scratch like the parent")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric"):  # one Trainer per validation: no banners
        logging.getLogger(name).setLevel(logging.WARNING)
    curve(args) if args.command == "curve" else conversion(args)


if __name__ == "__main__":
    main()
