"""`protein-performer`: one entry point for training, evaluation, analysis and using trained models.

    protein-performer fit | validate | test --config CONFIG.yaml [--trainer.max_steps 10 --model.config.d_model 128 ...]
    protein-performer report    RUN_A/report/report.json RUN_B/report/report.json
    protein-performer analyze   --ckpt_path CKPT --input FASTA_OR_DIR --out DIR
    protein-performer agreement RUN [RUN ...] --input FASTA_OR_DIR --out DIR
    protein-performer embed | score | generate --ckpt_path CKPT ...

fit/validate/test are LightningCLI (training/lightning_cli.py). The other subcommands are the functions below: their
command lines are generated from the signatures and docstrings (commands.py), they read what the user gives,
call the library, and write through outputs.py. Bad input: `PROG: error: ...` and exit status 2.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

from . import commands
from .errors import UserError
from .inference import Pool
from .outputs import atomic_write, check_output_dir, fresh_output_dir, output_file
from .proteins import DEFAULT_SPLIT
from .vocab import UnknownPolicy


def report(reports: list[str], json: bool = False) -> None:
    """Join the reports of several `protein-performer test` runs into the paper's Table 2 layout.

    Args:
        reports: report.json files (RUN/.../report/report.json).
        json: print one JSON row per model and split instead (report, objective, task, attention, split, acc, ppl,
            baseline_acc, baseline_ppl, tokens, beats_baseline: ppl below the unigram baseline's), for scripts.
    """
    import json as json_lib

    from .evaluate import combine, read_report, report_rows

    contents, names = [read_report(p) for p in reports], list(reports)
    table = combine(contents, names)  # also when printing JSON: refuses two numbers for one cell
    print(json_lib.dumps(report_rows(contents, names), indent=1) if json else table)


def analyze(ckpt_path: str, input: str, out: str, num_sequences: PositiveInt = 800, max_len: PositiveInt = 512,
            offset: NonNegativeInt = 0, threshold: float = 0.3, min_kept: int = 100, accession: str | None = None,
            head: tuple[int, int] | None = None, split: str = DEFAULT_SPLIT, permutations: PositiveInt = 10_000,
            seed: int = 0, device: str = "cpu", overwrite: bool = False, progress: bool | None = None) -> None:
    """Attention of a trained model against amino-acid similarity (BLOSUM62), after Vig et al. 2020.

    Writes to --out the attention maps of every layer and head for one protein, the amino-acid similarity its
    attention implies (threshold and attention-weighted variants) and that of its embeddings, with their
    agreement with BLOSUM62 (permutation p-values): PNG figures, CSV matrices and summary.json.

    Args:
        ckpt_path: checkpoint written by `protein-performer fit`, or a run directory (its newest last.ckpt).
        input: FASTA file (.fasta[.gz], or a pipe) or prepared data directory.
        out: output directory.
        num_sequences: analyse the first N proteins (the paper used 800).
        max_len: tokens per protein, [BOS] + residues (the unit of the model's max_len, which also caps it).
        offset: skip this many residues at each protein's N-terminus (e.g. 50: the initiator methionine at
            residue 1 draws attention in every protein, which swamps the similarity of untrained and causal models).
        threshold: attention weights >= this count in the threshold variant (Vig et al.).
        min_kept: threshold variant: drop heads with fewer kept weights over all proteins.
        accession: protein to draw (accession, entry name, or SPLIT/INDEX of a prepared directory); default the first.
        head: LAYER HEAD to enlarge (0-based); default the most focused head of the drawn protein.
        split: split of a prepared directory.
        permutations: amino-acid label permutations of the significance test.
        seed: seed of the permutations.
        device: torch device, e.g. cuda.
        overwrite: replace the files of an earlier analysis in --out.
        progress: progress bar (default: on a terminal).
    """
    from .analysis import analyze_attention, headline, write_analysis
    from .checkpoints import load_model
    from .prepared import is_prepared_dir
    from .proteins import read_proteins

    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must lie in (0, 1], not {threshold}")
    out_path = check_output_dir(out, overwrite, "summary.json")
    loaded = load_model(ckpt_path, device)
    proteins, featured = read_proteins(input, num_sequences, split, also=accession)
    result = analyze_attention(loaded, proteins, featured or proteins[0], max_len=max_len, offset=offset,
                               threshold=threshold, min_kept=min_kept, head=head, permutations=permutations, seed=seed,
                               progress=progress)
    with fresh_output_dir(out_path, ANALYSIS_FILES):  # summary.json, the marker, is written last
        summary = write_analysis(result, out_path, input=str(input), split=split if is_prepared_dir(input) else None)
    print(headline(summary, out_path))


ANALYSIS_FILES = ("*.png", "*.csv", "attention_maps.npz", "summary.json")


def agreement(ckpts: list[str], input: str, out: str, num_sequences: PositiveInt = 300, max_len: PositiveInt = 256,
              offset: NonNegativeInt = 0, threshold: float = 0.3, min_kept: int = 100, split: str = DEFAULT_SPLIT,
              permutations: PositiveInt = 10_000, seed: int = 0, device: str = "cpu", overwrite: bool = False,
              progress: bool | None = None) -> None:
    """Agreement with BLOSUM62 along training: the analysis of every checkpoint given, against its step.

    Writes agreement_over_training.csv (one row per checkpoint: step, attention kind, Pearson r and p of the
    weighted and threshold variants, heads used, the embedding control, mean attention entropy) and a plot.

    Args:
        ckpts: checkpoint files or run directories (all their *.ckpt), of one or several runs.
        input: FASTA file or prepared data directory of the proteins to analyse.
        out: output directory.
        num_sequences: proteins analysed per checkpoint.
        max_len: tokens per protein, [BOS] + residues (capped by the model's max_len).
        offset: skip this many residues at each protein's N-terminus (see `analyze`).
        threshold: threshold variant's weight cut-off.
        min_kept: threshold variant: drop heads with fewer kept weights.
        split: split of a prepared directory.
        permutations: label permutations per significance test.
        seed: seed of the permutations.
        device: torch device.
        overwrite: replace the files of an earlier run of this command in --out.
        progress: progress bar (default: on a terminal).
    """
    from .analysis import agreement_over_training, write_agreement_over_training
    from .proteins import read_proteins

    out_path = check_output_dir(out, overwrite, "agreement_over_training.csv")
    proteins, _ = read_proteins(input, num_sequences, split)
    table = agreement_over_training(ckpts, proteins, max_len=max_len, offset=offset, threshold=threshold,
                                    min_kept=min_kept, permutations=permutations, seed=seed, device=device,
                                    progress=progress)
    with fresh_output_dir(out_path, ("agreement_over_training.*",)):
        print(write_agreement_over_training(table, out_path))


def embed(ckpt_path: str, input: str, out: str, layers: list[int] | None = None, pool: Pool = "mean",
          unknown: UnknownPolicy = "reject", max_tokens: PositiveInt = 8192, device: str = "cpu",
          overwrite: bool = False, progress: bool | None = None) -> None:
    """Per-protein or per-residue embeddings of the proteins of a FASTA file.

    Writes index.tsv (row, id, length, cropped length) and one array per layer: layerN_mean.npy or layerN_bos.npy
    (proteins x d_model), or layerN_per_residue.npz (one array per row of index.tsv).

    Args:
        ckpt_path: checkpoint written by `protein-performer fit`, or a run directory.
        input: FASTA file (.fasta[.gz], or a pipe) or prepared data directory (its test split).
        out: output directory.
        layers: layers to save (0 = embeddings; default: the last).
        pool: mean over residues, the BOS position, or per-residue.
        unknown: letters outside the vocabulary: skip the record (reject), read as X (x), or stop (error).
        max_tokens: padded tokens per batch (B x longest L), as --data.max_tokens in training.
        device: torch device, e.g. cuda.
        overwrite: replace the files of an earlier embed in --out.
        progress: progress bar (default: on a terminal).
    """
    import numpy as np

    from .checkpoints import load_model
    from .inference import embed as embed_proteins
    from .proteins import read_proteins

    out_path = check_output_dir(out, overwrite, "index.tsv")
    loaded = load_model(ckpt_path, device)
    proteins, _ = read_proteins(input, unknown=unknown)
    layers = layers or [loaded.config.n_layers]
    reps = embed_proteins(loaded.model, proteins, layers, pool, max_tokens, progress)
    with fresh_output_dir(out_path, ("index.tsv", "layer*_*.npy", "layer*_per_residue.npz")):
        for layer in layers:
            if pool == "per-residue":  # ragged: one array per protein, keyed by its row in index.tsv
                with atomic_write(out_path / f"layer{layer}_per_residue.npz", "wb") as f:
                    np.savez(f, **{str(i): r for i, r in enumerate(reps[layer])})
            else:
                with atomic_write(out_path / f"layer{layer}_{pool}.npy", "wb") as f:
                    np.save(f, np.stack(reps[layer]))
        with atomic_write(out_path / "index.tsv", newline="") as f:  # last: its presence marks a complete output
            w = csv.writer(f, delimiter="\t")
            w.writerow(["row", "id", "length", "cropped_to"])
            for i, prot in enumerate(proteins):
                w.writerow([i, prot.name, len(prot.tokens), min(len(prot.tokens), loaded.config.max_len - 1)])
    print(f"wrote {len(proteins)} {pool} embeddings of layers {layers} to {out_path} (index.tsv lists the rows)")


def score(ckpt_path: str, input: str, out: str, per_position: str | None = None, unknown: UnknownPolicy = "reject",
          max_tokens: PositiveInt = 8192, device: str = "cpu", overwrite: bool = False,
          progress: bool | None = None) -> None:
    """Per-sequence log-likelihood and perplexity: exact for causal models, pseudo-log-likelihood for masked ones
    (each position masked in turn).

    Args:
        ckpt_path: checkpoint written by `protein-performer fit`, or a run directory.
        input: FASTA file (.fasta[.gz], or a pipe) or prepared data directory (its test split).
        out: output TSV (id, length, scored, log_likelihood, perplexity, method).
        per_position: also write one row per residue (id, position counted from 1, residue, log_prob) to this TSV.
        unknown: letters outside the vocabulary: skip the record (reject), read as X (x), or stop (error).
        max_tokens: padded tokens per batch (B x longest L), as --data.max_tokens in training.
        device: torch device, e.g. cuda.
        overwrite: replace existing output files.
        progress: progress bar (default: on a terminal).
    """
    from .checkpoints import load_model
    from .inference import score as score_proteins
    from .proteins import read_proteins

    out_path = output_file(out, overwrite)
    per_position_path = output_file(per_position, overwrite) if per_position else None
    loaded = load_model(ckpt_path, device)
    proteins, _ = read_proteins(input, unknown=unknown)
    terms = score_proteins(loaded.model, proteins, max_tokens=max_tokens, progress=progress)
    method = "causal" if loaded.config.causal else "pseudo"
    with atomic_write(out_path, newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "length", "scored", "log_likelihood", "perplexity", "method"])
        for prot, t in zip(proteins, terms):
            w.writerow([prot.name, len(prot.tokens), len(t), f"{t.sum():.4f}", f"{math.exp(-t.mean()):.4f}", method])
    if per_position_path:
        with atomic_write(per_position_path, newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["id", "position", "residue", "log_prob"])
            for prot, t in zip(proteins, terms):
                for pos, (res, lp) in enumerate(zip(prot.sequence, t), start=1):
                    w.writerow([prot.name, pos, res, f"{lp:.5f}"])
    print(f"scored {len(proteins)} sequences ({method} log-likelihood) -> {out_path}")


def generate(ckpt_path: str, prompt: str = "", num_sequences: PositiveInt = 4, max_len: PositiveInt | None = None,
             temperature: NonNegativeFloat = 1.0, top_k: PositiveInt | None = None, top_p: float | None = None,
             seed: int = 0, out: str | None = None, device: str = "cpu", overwrite: bool = False) -> None:
    """Sample sequences from a causal model, written as FASTA.

    Args:
        ckpt_path: checkpoint of a causal model, or its run directory.
        prompt: residues every sequence starts with.
        num_sequences: sequences to sample.
        max_len: tokens per sequence, [BOS] + residues (prompt included): at most max_len - 1 residues
            (default: the model's max_len).
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens.
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p, in (0, 1].
        seed: seed of the sampling.
        out: output FASTA (default: standard output).
        device: torch device, e.g. cuda.
        overwrite: replace an existing --out file.
    """
    from .checkpoints import load_model
    from .inference import generate as sample

    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top_p must lie in (0, 1], not {top_p}")
    out_path = output_file(out, overwrite) if out else None
    loaded = load_model(ckpt_path, device)
    seqs = sample(loaded.model, prompt, num_sequences, max_len, temperature, top_k, top_p, seed)
    text = "".join(f">generated_{i} seed={seed} temperature={temperature} top_k={top_k} top_p={top_p} "
                   f"length={len(s)}\n{s}\n" for i, s in enumerate(seqs))
    if out_path is None:
        sys.stdout.write(text)
        return
    with atomic_write(out_path) as f:
        f.write(text)
    print(f"wrote {len(seqs)} sequences to {out_path}")


COMMANDS = {f.__name__: f for f in (report, analyze, agreement, embed, score, generate)}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        commands.run(COMMANDS[args[0]], args[1:], f"protein-performer {args[0]}")
        return
    from .training.lightning_cli import build_cli
    from .training.module import RENAMED_FLAGS

    if args and args[0] in ("fit", "validate", "test"):
        commands.refuse_renamed(args[1:], set(RENAMED_FLAGS.values()), f"protein-performer {args[0]}", RENAMED_FLAGS)
    try:
        build_cli(None if argv is None else args, other_commands=list(COMMANDS))
    except UserError as e:  # a missing or broken data directory or checkpoint, a diverged run
        prog = f"protein-performer {args[0]}" if args and not args[0].startswith("-") else "protein-performer"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
