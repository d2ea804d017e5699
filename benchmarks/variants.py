"""Which attention for which task (issue 26, section 3): validation perplexity of each attention variant at equal
steps and at equal training CPU time, with steps per second. The report of scripts/reproduce_variants.sh, which
trains the runs it reads (`protein-performer fit` run directories under RUNS, one thread each):

    RUNS/<task>-<variant>/   task: causal or masked (128-token crops of single proteins), concat (the masked
                             concatenated view, L = 8192); variant: exact, fs<M> (favor-softmax with M features,
                             fixed), fs<M>-redraw (redrawn every 100 steps), relu (favor-relu); a name
                             ending in -seed<S> is another seed of the same setting (no suffix: seed 0), timed
                             as the seed-0 run and shown in the seeds table

Training time is CPU time: each run's model, data and precision timed here for a few steps of a fresh fit on one
thread (the process's CPU clock, so the figure does not depend on what else the machine runs; the runs themselves
shared the machine), times the steps; validation is not counted. Writes RUNS/report/variants.md, variants.csv
(every validation, with its time) and a figure (--plot, default RUNS/report/variants.png).

    python benchmarks/variants.py runs/variants --plot docs/variants.png
"""

from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from attention_gap import precision
from lightning.pytorch.callbacks import Callback
from results_io import markdown, validations

from protein_performer.analysis import plots
from protein_performer.checkpoints import find_checkpoint
from protein_performer.machine import machine_line
from protein_performer.training.datamodule import ProteinDataModule
from protein_performer.training.module import ProteinLMModule

RUN = re.compile(r"(?P<task>causal|masked|concat)-(?P<variant>exact|fs\d+(-redraw)?|relu)(-seed(?P<seed>\d+))?")
TASKS = {"causal": "causal LM, 128-token crops", "masked": "masked LM, 128-token crops",
         "concat": "masked LM, concatenated view, L = 8192"}
VARIANTS = ["exact", "fs64", "fs64-redraw", "fs256", "fs256-redraw", "relu"]


class StepClock(Callback):
    """CPU seconds of each training step, batch loading included (from one step's end to the next)."""

    def __init__(self):
        self.last: float | None = None
        self.seconds: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        now = time.process_time()
        if self.last is not None:
            self.seconds.append(now - self.last)
        self.last = now


def step_seconds(run: Path, steps: int) -> float:
    """Median CPU seconds of a training step of the run's model and data (its own precision and options), over
    `steps` steps of a fresh fit in this process after two of warm-up: one thread, so the process's CPU clock
    counts the step whatever else the machine runs."""
    ckpt = find_checkpoint(run)
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision(ckpt), max_steps=steps + 2,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    module = ProteinLMModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    data = ProteinDataModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers and validation
        trainer.fit(module, datamodule=data)
    return float(np.median(clock.seconds[1:]))


def timed(run: Path, seconds_per_step: float) -> pd.DataFrame:
    """step, val/ppl, minutes (training CPU time up to that step), steps/s of every validation of a run."""
    frame = validations(run)
    return frame.assign(minutes=frame["step"] * seconds_per_step / 60, **{"steps/s": 1 / seconds_per_step})


def collect(runs: Path, steps: int) -> pd.DataFrame:
    frames, seconds = [], {}
    for run in sorted(runs.iterdir(), key=lambda p: "-seed" in p.name):  # seed 0 first: it is the one timed
        match = RUN.fullmatch(run.name)
        if match is None or not (run / "DONE").exists():
            continue
        setting = (match["task"], match["variant"])
        if setting not in seconds:
            seconds[setting] = step_seconds(run, steps)
            print(f"{run.name}: {seconds[setting]:.3f} CPU s per training step", flush=True)
        frames.append(timed(run, seconds[setting]).assign(task=match["task"], variant=match["variant"],
                                                           seed=int(match["seed"] or 0)))
    if not frames:
        raise SystemExit(f"no finished runs named like causal-exact or concat-fs256-redraw under {runs}")
    return pd.concat(frames, ignore_index=True)


def at(frame: pd.DataFrame, column: str, value: float) -> float:
    """val/ppl interpolated at `value` of `column` (NaN outside the validated range)."""
    if value < frame[column].iloc[0] or value > frame[column].iloc[-1] + 1e-9:
        return float("nan")
    return float(np.interp(value, frame[column], frame["val/ppl"]))


def summary(long: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for task in [t for t in TASKS if t in set(long["task"])]:
        runs = long[long["task"] == task]
        groups = dict(list(runs.groupby("variant")))
        equal_steps = min(int(g["step"].iloc[-1]) for g in groups.values())
        equal_minutes = min(float(g["minutes"].iloc[-1]) for g in groups.values())
        for variant in sorted(groups, key=VARIANTS.index):
            g = groups[variant]
            rows.append({"task": TASKS[task], "attention": variant, "steps": int(g["step"].iloc[-1]),
                         "steps/s": round(float(g["steps/s"].iloc[0]), 2),
                         "train min": round(float(g["minutes"].iloc[-1]), 1),
                         "ppl at equal steps": round(at(g, "step", equal_steps), 3),
                         "(steps)": equal_steps,
                         "ppl at equal time": round(at(g, "minutes", equal_minutes), 3),
                         "(min)": round(equal_minutes, 1),
                         "final ppl": round(float(g["val/ppl"].iloc[-1]), 3)})
    return pd.DataFrame(rows)


def seeds(long: pd.DataFrame) -> pd.DataFrame:
    """Final validation perplexity of each seed, where a setting has more than one, at the last step all reached."""
    rows = []
    for (task, variant), runs in long.groupby(["task", "variant"], sort=False):
        if runs["seed"].nunique() < 2:
            continue
        step = runs.groupby("seed")["step"].max().min()
        final = runs[runs["step"] == step].set_index("seed")["val/ppl"].sort_index()
        rows.append({"task": TASKS[task], "attention": variant, "steps": int(step),
                     "per seed": " / ".join(f"{v:.3f}" for v in final), "mean": round(final.mean(), 3),
                     "half range": round((final.max() - final.min()) / 2, 3)})
    return pd.DataFrame(rows)


def figure(long: pd.DataFrame):
    tasks = [t for t in TASKS if t in set(long["task"])]
    fig = plots.new_figure(4 * len(tasks), 7)
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for col, task in enumerate(tasks):
        runs = long[long["task"] == task]
        for i, variant in enumerate(VARIANTS):
            g = runs[runs["variant"] == variant]
            if len(g):
                style = {"color": f"C{i}", "marker": ".", "label": variant}
                axes[0, col].plot(g["step"], g["val/ppl"], **style)
                axes[1, col].plot(g["minutes"], g["val/ppl"], **style)
        axes[0, col].set(title=TASKS[task], xlabel="training steps", ylabel="validation perplexity")
        axes[1, col].set(xlabel="training CPU minutes (one thread)", ylabel="validation perplexity")
        top = runs["val/ppl"].quantile(0.9)
        for ax in axes[:, col]:
            ax.set_ylim(runs["val/ppl"].min() - 0.2, top)
        axes[0, col].legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the OUT_DIR of scripts/reproduce_variants.sh")
    parser.add_argument("--plot", type=Path, help="the figure (default: RUNS/report/variants.png)")
    parser.add_argument("--timed_steps", type=int, default=8, help="steps timed per run, after 2 of warm-up")
    args = parser.parse_args()
    out = args.runs / "report"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # timed as the runs trained: one thread each
    for name in ("lightning.pytorch", "lightning.fabric"):  # one Trainer per run timed: no banners
        logging.getLogger(name).setLevel(logging.WARNING)
    long = collect(args.runs, args.timed_steps)
    first = long[long["seed"] == 0]
    table = summary(first)
    long.to_csv(out / "variants.csv", index=False)
    plots.save(figure(first), args.plot or out / "variants.png")
    lines = ["# Attention variants at equal steps and equal training time\n", machine_line() + "\n",
             "Equal steps: the fewest steps any run of the task made; equal time: the shortest run's training "
             "minutes (interpolated between validations; blank where a run had not yet validated).\n",
             markdown(table.astype(object).where(table.notna(), ""))]
    spread = seeds(long)
    if len(spread):
        lines += ["\n## Settings trained with more than one seed (final validation perplexity)\n", markdown(spread)]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwrote {out}/variants.md, variants.csv")


if __name__ == "__main__":
    main()
