"""The evaluation report: accuracy and perplexity per split beside the unigram baseline (the paper's Table 2).

`protein-performer test --config ... --ckpt_path CKPT` fills it in (training.module.ProteinLMModule);
`protein-performer report A.json B.json ...` joins reports of several models into one table with a
column per attention kind, as in the paper.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .checkpoints import LEGACY_ATTENTION
from .errors import UserError

COLUMN = {"exact": "Transformer", "favor-relu": "Performer (ReLU)", "favor-softmax": "Performer (softmax)"}
# below every table of such cells: two bare numbers say nothing on a console
LEGEND = "cells: accuracy % / perplexity; baseline: unigram frequencies of train, Laplace alpha = 1"


def cell(results: dict[str, float]) -> str:
    """'accuracy % / perplexity', the paper's cell format."""
    return f"{100 * results['acc']:.2f} / {results['ppl']:.2f}"


def format_table(results: dict[str, dict[str, float]], meta: dict) -> str:
    """Markdown table of one model: a row per split, the model's column beside the unigram baseline."""
    column = COLUMN.get(meta["attention"], meta["attention"])
    lines = [
        f"| objective | set | {column} | unigram baseline | tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    for split, r in results.items():
        baseline = {"acc": r["baseline_acc"], "ppl": r["baseline_ppl"]}
        lines.append(f"| {meta['objective']} | {split} | {cell(r)} | {cell(baseline)} | {int(r['tokens']):,} |")
    return "\n".join(lines) + "\n\n" + LEGEND


def write_report(out_dir: str | Path, results: dict[str, dict[str, float]], meta: dict) -> Path:
    """Write report.json, report.md and report.csv under out_dir; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    (out / "report.md").write_text(format_table(results, meta) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["objective", "attention", "split", "accuracy", "perplexity", "baseline_accuracy",
                         "baseline_perplexity", "tokens"])
        for split, r in results.items():
            writer.writerow([meta["objective"], meta["attention"], split, r["acc"], r["ppl"], r["baseline_acc"],
                             r["baseline_ppl"], int(r["tokens"])])
    return out


def combine(reports: list[dict], names: list[str] | None = None) -> str:
    """One Table-2-shaped markdown table from several report.json contents: a row per (objective, task, split),
    a column per attention kind; two reports for the same cell are an error (`names` name them in it)."""
    names = names or [f"report {i + 1}" for i in range(len(reports))]
    kinds = [k for k in COLUMN if any(r["meta"]["attention"] == k for r in reports)]
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    filled: dict[tuple[str, str, str, str], str] = {}
    for name, report in zip(names, reports):
        meta = report["meta"]
        for split, r in report["results"].items():
            key = (meta["objective"], meta.get("task", "single, L = 1024"), split)  # 0.1 reports: no task
            if (*key, meta["attention"]) in filled:
                raise UserError(f"{name} and {filled[(*key, meta['attention'])]} both report {meta['attention']} "
                                f"attention on {' / '.join(key)}: one cell, two numbers")
            filled[(*key, meta["attention"])] = name
            row = rows.setdefault(key, {})
            row[meta["attention"]] = cell(r)
            row["baseline"] = cell({"acc": r["baseline_acc"], "ppl": r["baseline_ppl"]})
    lines = ["| objective | task | set | " + " | ".join(COLUMN[k] for k in kinds) + " | unigram baseline |",
             "| --- | --- | --- |" + " --- |" * (len(kinds) + 1)]
    for (objective, task, split), row in sorted(rows.items()):
        cells = " | ".join(row.get(k, "-") for k in kinds)
        lines.append(f"| {objective} | {task} | {split} | {cells} | {row['baseline']} |")
    return "\n".join(lines) + "\n\n" + LEGEND


def report_rows(reports: list[dict], names: list[str]) -> list[dict]:
    """One flat row per model and split (what `protein-performer report --json` prints for scripts to read)."""
    rows = []
    for name, report in zip(names, reports):
        meta = report["meta"]
        for split, r in report["results"].items():
            rows.append({"report": name, "objective": meta["objective"], "task": meta.get("task", "single, L = 1024"),
                         "attention": meta["attention"], "split": split, **r,
                         "beats_baseline": r["ppl"] < r["baseline_ppl"]})
    return rows


def read_report(path: str | Path) -> dict:
    """A report.json written by `protein-performer test` (reports of 0.1 name exact attention "softmax")."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
        meta = report["meta"]
        meta["attention"] = LEGACY_ATTENTION.get(meta["attention"], meta["attention"])
        report["results"].items()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a report.json of `protein-performer test` ({type(e).__name__}: {e})") from None
    return report
