"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this module is importable)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from protein_performer.analysis.overview import read_metrics
from protein_performer.commands import option_strings, refuse_renamed
from protein_performer.machine import machine_info, machine_line  # noqa: F401 (the benchmarks import them from here)

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               renamed: dict[str, str] | None = None) -> argparse.Namespace:
    """parser.parse_args, after stopping in one line on a renamed flag (a dashed spelling, an old name of
    commands.RENAMED or of `renamed`), as every protein-performer command does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_renamed(argv, option_strings(parser), parser.prog, renamed)
    return parser.parse_args(argv)


def run_worker(cmd: list[str], timeout: float) -> dict:
    """Runs one benchmark worker process (its peak memory is then its own): the JSON dict of its last stdout
    line, or {"error": ...} for a timeout, a crash or a kill."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        return {"error": ("killed (out of memory?)" if res.returncode < 0 else last)[:120]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def performer_pytorch_installed() -> bool:
    return importlib.util.find_spec("performer_pytorch") is not None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fastest_of_rounds(keys: list, lengths: list[int], rounds: int, run: Callable[[object, int], dict],
                      stop: Callable[[dict], bool], before_round: Callable[[], None] = lambda: None,
                      ) -> Iterator[tuple[object, int, dict]]:
    """Yields (key, length, result) for every key and length, lengths in order.

    Each length runs every key still active `rounds` times, interleaved, so that the slow spells of a shared
    machine hit every key alike; the result is the fastest successful run (with the largest "peak*" values of
    its runs), or the first error. A key is not run again after an error (a timeout would only repeat), and stops
    growing the length after an error or when stop(result) is true.
    """
    active = list(keys)
    for length in lengths:
        runs = {key: [] for key in active}
        for _ in range(rounds):
            before_round()
            for key in active:
                if not any("error" in r for r in runs[key]):
                    runs[key].append(run(key, length))
        for key, results in runs.items():
            ok = [r for r in results if "seconds" in r]
            if ok and len(ok) < len(results):
                print(f"{key} at L={length}: a later round failed ({results[-1]['error']}); the rounds before it count")
            if ok:
                best = dict(min(ok, key=lambda r: r["seconds"]))
                best.update({k: max(r[k] for r in ok) for k in best if k.startswith("peak")})
            else:
                best = results[0]
            yield key, length, best
            if not ok or stop(best):
                active.remove(key)


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV, and machine_info() beside it (NAME.machine.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    info = machine_info()
    path.with_suffix(".machine.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {path} and {path.with_suffix('.machine.json').name} ({machine_line(info)})")


def time_memory_plot(rows: list[dict], path: Path, series: str, time_label: str, memory: str,
                     memory_label: str) -> None:
    """Log-log time and peak memory against sequence length, one line per (series, mode), like the paper's Fig. 3."""
    from protein_performer.analysis import plots  # the package's one figure style: Figure + Agg, no pyplot

    fig = plots.new_figure(11, 4)
    axes = fig.subplots(1, 2)
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
    plots.save(fig, path)
    print(f"wrote {path}")


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table of a small frame (pandas' to_markdown needs tabulate, which the project does not)."""
    rows = [list(frame.columns), ["---"] * frame.shape[1], *frame.astype(str).values.tolist()]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def validations(run: Path) -> pd.DataFrame:
    """steps trained, val/ppl at every validation of a run (CSVLogger's metrics.csv)."""
    frame = read_metrics(run).dropna(subset=["val/ppl"])[["step", "val/ppl"]].reset_index(drop=True)
    return frame.assign(step=frame["step"] + 1)  # Lightning logs the validation after N steps at step N - 1


def uniform_controls(runs: Path) -> pd.DataFrame:
    """run, step, val/ppl, uniform, gap of each run's last checkpoint in RUNS/report/gap.csv (written by
    `attention_gap.py curve`: the run as trained and with uniform attention); empty without that file."""
    path = runs / "report" / "gap.csv"
    if not path.exists():
        return pd.DataFrame(columns=["run", "step", "val/ppl", "uniform", "gap"])
    return pd.read_csv(path).groupby("run", sort=False).last().reset_index()
