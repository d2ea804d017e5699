"""`protein-performer analyze`: attention maps and amino-acid similarity vs BLOSUM62 for a checkpoint."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..inputs import DEFAULT_SPLIT, InputError
from .report import headline, run_analysis


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="protein-performer analyze",
        description=(
            "Per-layer, per-head attention maps of a trained model and the amino-acid similarity its attention "
            "implies (Vig et al. 2020), compared with BLOSUM62. Writes PNG figures, CSV matrices and summary.json to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by `protein-performer fit`, or a run directory (its newest last.ckpt)")
    p.add_argument("--input", required=True, help="FASTA file (.fasta[.gz]) or prepared data directory")
    p.add_argument("--out", required=True, help="output directory (created; files in it are overwritten)")
    p.add_argument("--num-sequences", type=int, default=800, help="analyse the first N proteins (the paper used 800)")
    p.add_argument("--max-length", type=int, default=512,
                   help="crop each protein to this many tokens ([BOS] + residues; also capped by the model's max_len)")
    p.add_argument("--threshold", type=float, default=0.3, help="attention weights >= this count (Vig et al.)")
    p.add_argument("--min-kept", type=int, default=100,
                   help="threshold variant: drop heads with fewer kept attention weights over all proteins")
    p.add_argument("--accession", help="protein to draw (accession, entry name, or SPLIT/INDEX for a prepared dir); default: the first")
    p.add_argument("--head", type=int, nargs=2, metavar=("LAYER", "HEAD"),
                   help="head to enlarge (0-based); default: the most focused head of the drawn protein")
    p.add_argument("--split", default=DEFAULT_SPLIT, help="split of a prepared directory")
    p.add_argument("--permutations", type=int, default=10_000, help="label permutations of the significance test")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = run_analysis(
            args.ckpt, args.input, args.out, num_sequences=args.num_sequences, max_length=args.max_length,
            threshold=args.threshold, min_kept=args.min_kept, accession=args.accession,
            head=tuple(args.head) if args.head else None, split=args.split, permutations=args.permutations,
            seed=args.seed, device=args.device, progress=args.progress,
        )
    except InputError as e:
        sys.exit(f"protein-performer analyze: error: {e}")
    print(headline(summary, args.out))


if __name__ == "__main__":
    main()
