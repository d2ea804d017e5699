"""Quality at small scale: models of every attention kind and objective, equal steps (or wall time) each; and
bf16-mixed against fp32 at equal steps, over seeds.

Data: reference proteomes from UniProtKB (the project's experiments used the four of ../shared/data/proteomes,
from the public repository skinnider/CFdb-searches; pass --data DIR for your own copy). Three proteomes train
(E. coli, S. cerevisiae, P. falciparum by default); 20 Pfam families of pfam_labels.tsv are held out of them as
the OOD split; the fourth proteome (S. elongatus) is a second out-of-distribution set. Each model trains for
--steps (or --minutes of wall time, whichever comes first), then is evaluated on validation, test, OOD and the
fourth proteome, beside the unigram baseline of the training split.

    # the README's table: every attention kind and objective, 800 steps each (about 20 minutes on 2 cores)
    python benchmarks/quality.py --minutes 5 --steps 800 --d_model 128 --d_ff 256 --max_len 128 --max_tokens 2048
    # bf16-mixed against fp32 at equal steps, two seeds (the noise between seeds is the yardstick)
    python benchmarks/quality.py --objectives masked --attention favor-softmax --precisions fp32 bf16 --seeds 0 1 \\
        --minutes 30 --steps 600 --d_model 128 --d_ff 256 --max_len 128 --max_tokens 2048

Writes OUT/results.csv and OUT/results.md (default OUT: benchmarks/results/quality) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from results_io import RESULTS, machine_line, parse_args, write_csv

from protein_performer.prepared import is_prepared_dir
from protein_performer.training import ProteinDataModule, ProteinLMModule

ROOT = Path(__file__).resolve().parents[1]
PROTEOMES = {
    "E.coli": "UP000000625-E.coli.fasta.gz",
    "S.cerevisiae": "UP000002311-S.cerevisiae.fasta.gz",
    "P.falciparum": "UP000001450-P.falciparum.fasta.gz",
    "S.elongatus": "UP000002717-S.elongatus.fasta.gz",
}
KINDS = ("exact", "favor-relu", "favor-softmax")
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
SPLITS = ("valid", "test", "ood", "fourth")


def held_out_families(labels: Path, n: int = 20, seed: int = 0) -> list[str]:
    """n families with 10-40 labelled sequences each, drawn with a fixed seed (mid-sized: OOD but measurable)."""
    counts: dict[str, int] = {}
    with open(labels) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            for fam in set(row["families"].split(",")):
                counts[fam] = counts.get(fam, 0) + 1
    candidates = sorted(f for f, c in counts.items() if 10 <= c <= 40)
    return sorted(np.random.default_rng(seed).choice(candidates, size=n, replace=False).tolist())


def prepare(data: Path, work: Path, eval_proteome: str) -> tuple[Path, Path, list[str]]:
    """Prepared dirs: the three training proteomes (train/valid/test/ood) and the fourth (its 'train' split)."""
    families = held_out_families(data / "pfam_labels.tsv")
    train_dir, fourth_dir = work / "three", work / "fourth"
    inputs = [str(data / f) for name, f in PROTEOMES.items() if name != eval_proteome]
    prep = [sys.executable, "-m", "protein_performer.prep", "--no_progress"]
    if not is_prepared_dir(train_dir):
        subprocess.run([*prep, *inputs, "--out", str(train_dir), "--overwrite", "--pfam_labels",
                        str(data / "pfam_labels.tsv"), "--ood_families", *families, "--valid_fraction", "0.02",
                        "--test_fraction", "0.05"], check=True, cwd=ROOT)
    if not is_prepared_dir(fourth_dir):
        subprocess.run([*prep, str(data / PROTEOMES[eval_proteome]), "--out", str(fourth_dir), "--overwrite"],
                       check=True, cwd=ROOT)
    return train_dir, fourth_dir, families


def evaluate(module, data_dir: Path, splits: tuple[str, ...], args) -> dict[str, dict]:
    dm = ProteinDataModule(str(data_dir), objective=module.hparams.objective, max_len=args.max_len,
                           max_tokens=args.max_tokens, test_splits=splits, num_workers=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=args.out / "eval")
    trainer.test(module, dm, verbose=False)
    return module.test_results


def run_one(objective: str, attention: str, precision: str, seed: int, train_dir: Path, fourth_dir: Path,
            args) -> dict:
    name = f"{objective}-{attention}-{precision}-seed{seed}"
    L.seed_everything(seed)
    module = ProteinLMModule("small", objective=objective, lr=args.lr, warmup_steps=100, redraw_every=args.redraw_every,
                             seed=seed, config={"attention": attention, "d_model": args.d_model, "d_ff": args.d_ff})
    dm = ProteinDataModule(str(train_dir), objective=objective, max_len=args.max_len, max_tokens=args.max_tokens,
                           num_workers=1, seed=seed)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_time={"minutes": args.minutes}, max_steps=args.steps, gradient_clip_val=0.5,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, limit_val_batches=args.val_batches,
        precision=PRECISIONS[precision], logger=L.pytorch.loggers.CSVLogger(args.out / "logs", name=name),
        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
        default_root_dir=args.out,
    )
    start = time.perf_counter()
    trainer.fit(module, dm)
    wall = time.perf_counter() - start
    results = evaluate(module, train_dir, ("valid", "test", "ood"), args)
    results["fourth"] = evaluate(module, fourth_dir, ("train",), args)["train"]
    return {"objective": objective, "attention": attention, "precision": precision, "seed": seed,
            "steps": trainer.global_step, "wall_s": round(wall), "results": results}


def table(runs: list[dict]) -> str:
    """Markdown: accuracy % / perplexity per split, the unigram baseline, and validation perplexity against the
    exact Transformer's of the same objective, precision and seed."""
    lines = ["| objective | attention | precision | seed | steps (wall s) | " + " | ".join(SPLITS)
             + " | baseline (valid) | valid ppl vs Transformer |", "| --- | --- | --- | --- | --- |"
             + " --- |" * (len(SPLITS) + 2)]
    for run in runs:
        r = run["results"]
        same = ("objective", "precision", "seed")
        exact = next((x for x in runs if x["attention"] == "exact" and all(x[k] == run[k] for k in same)), None)
        ratio = f"{r['valid']['ppl'] / exact['results']['valid']['ppl'] - 1:+.1%}" if exact else "-"
        cells = " | ".join(f"{100 * r[s]['acc']:.2f} / {r[s]['ppl']:.2f}" for s in SPLITS)
        base = r["valid"]
        lines.append(f"| {run['objective']} | {run['attention']} | {run['precision']} | {run['seed']} | "
                     f"{run['steps']} ({run['wall_s']}) | {cells} | {100 * base['baseline_acc']:.2f} / "
                     f"{base['baseline_ppl']:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/proteomes",
                   help="folder of the four proteomes and pfam_labels.tsv (see above)")
    p.add_argument("--out", type=Path, default=RESULTS / "quality")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per model")
    p.add_argument("--steps", type=int, default=-1,
                   help="also stop at this many steps (-1: time only); equal steps compare more fairly")
    p.add_argument("--objectives", nargs="+", default=["masked", "causal"], choices=["masked", "causal"])
    p.add_argument("--attention", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(PRECISIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of weights, batches and masking")
    p.add_argument("--eval_proteome", default="S.elongatus", choices=sorted(PROTEOMES))
    p.add_argument("--max_len", type=int, default=256,
                   help="tokens per example, [BOS] included (256 rather than 1024: more steps on CPU)")
    p.add_argument("--max_tokens", type=int, default=4096, help="padded tokens per batch")
    p.add_argument("--d_model", type=int, default=256, help="model width ('small': 4 layers, 8 heads)")
    p.add_argument("--d_ff", type=int, default=1024, help="MLP width")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (paper: 1e-3, at far more steps)")
    p.add_argument("--val_every", type=int, default=200, help="steps between validations")
    p.add_argument("--val_batches", type=int, default=20, help="validation batches during training")
    p.add_argument("--redraw_every", type=int, default=100, help="favor-softmax feature redraw interval (steps)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads (1 on a machine shared with other work: waiting threads spin)")
    args = parse_args(p)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    train_dir, fourth_dir, families = prepare(args.data, args.out / "prepared", args.eval_proteome)
    runs = []
    for objective in args.objectives:
        for attention in args.attention:
            for precision in args.precisions:
                for seed in args.seeds:
                    print(f"== {objective} {attention} {precision} seed {seed}", flush=True)
                    runs.append(run_one(objective, attention, precision, seed, train_dir, fourth_dir, args))
                    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))
    budget = f"{args.minutes} min" + (f" or {args.steps} steps, whichever came first," if args.steps > 0 else "")
    md = (f"{table(runs)}\n\naccuracy % / perplexity. {budget} of training per model on {machine_line()}; model "
          f"'small' (4 layers, 8 heads, d_model {args.d_model}, d_ff {args.d_ff}), L = {args.max_len}, "
          f"{args.max_tokens} tokens per batch, lr {args.lr}. OOD: held-out Pfam families {' '.join(families)}; "
          f"fourth: {args.eval_proteome}.")
    (args.out / "results.md").write_text(md + "\n")
    write_csv([{k: run[k] for k in ("objective", "attention", "precision", "seed", "steps", "wall_s")}
               | {"split": split, "accuracy": r["acc"], "perplexity": r["ppl"], "baseline_accuracy": r["baseline_acc"],
                  "baseline_perplexity": r["baseline_ppl"], "tokens": int(r["tokens"])}
               for run in runs for split, r in run["results"].items()], args.out / "results.csv")
    print(md)


if __name__ == "__main__":
    main()
