"""Command line: protein-performer-prep INPUT [INPUT ...] --out DIR [options] (or python -m data_prep)."""

from __future__ import annotations

import argparse
import os
import sys

from data_prep import PrepError
from data_prep.pipeline import Settings, run
from data_prep.readers import FORMATS
from data_prep.splits import PAPER_OOD_FAMILIES, normalize_family, read_family_file


def default_workers() -> int:
    """1 on up to 2 cores (measured: a worker pool's pickling and pipe traffic cost more than it wins there), else all cores."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else cores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="protein-performer-prep",
        description=(
            "Tokenize, de-duplicate and split UniProt FASTA or flat files (plain or gzipped) into "
            "DIR/{train,valid,test,ood}/tokens.bin + offsets.npy and DIR/manifest.json. Sequences carrying a "
            "held-out Pfam family go to ood; the rest are split by a seeded hash of the sequence."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="UniProt FASTA (.fasta[.gz]) or flat file (.dat[.gz])")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (swapped in only when the run succeeds)")
    p.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="input format; auto looks at the first line")
    p.add_argument(
        "--pfam-labels",
        metavar="TSV",
        help="accession -> Pfam families: 'accession n_domains families ...' TSV or Pfam's Pfam-A.regions.uniprot.tsv[.gz] "
        "(flat files also use their own 'DR   Pfam;' lines)",
    )
    fams = p.add_mutually_exclusive_group()
    fams.add_argument("--ood-families", nargs="+", metavar="PF", help="held-out Pfam families (default: the paper's 20)")
    fams.add_argument("--ood-families-file", metavar="FILE", help="file of held-out Pfam families (whitespace/comma separated, # comments)")
    p.add_argument("--valid-fraction", type=float, default=0.001, help="share of non-OOD sequences for validation")
    p.add_argument("--test-fraction", type=float, default=0.01, help="share of non-OOD sequences for test")
    p.add_argument("--min-valid", type=int, default=100, help="minimum validation sequences (capped at a quarter of a tiny input)")
    p.add_argument("--min-test", type=int, default=100, help="minimum test sequences (capped at a quarter of a tiny input)")
    p.add_argument("--seed", type=int, default=0, help="salt of the split hash; a different seed gives a different split")
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="parser processes; 1 parses in the main process while a thread decompresses, which is fastest on "
        "machines of up to 2 cores (output is identical for any value)",
    )
    p.add_argument(
        "--unknown",
        choices=("reject", "x", "error"),
        default="reject",
        help="letters outside the vocabulary (J, *, digits): skip the record, map to X, or stop",
    )
    p.add_argument(
        "--fasta-parser",
        choices=("fast", "biopython"),
        default="fast",
        help="fast: block-level equivalent of Biopython's SimpleFastaParser (4x faster); biopython: SimpleFastaParser itself",
    )
    p.add_argument("--block-size", type=int, default=4 << 20, help=argparse.SUPPRESS)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.ood_families_file:
            families = read_family_file(args.ood_families_file)
        else:
            families = [normalize_family(f) for f in (args.ood_families or PAPER_OOD_FAMILIES)]
        if args.workers < 1:
            raise PrepError("--workers must be >= 1")
        settings = Settings(
            inputs=args.inputs,
            out=args.out,
            format=args.format,
            pfam_labels=args.pfam_labels,
            ood_families=families,
            valid_fraction=args.valid_fraction,
            test_fraction=args.test_fraction,
            min_valid=args.min_valid,
            min_test=args.min_test,
            seed=args.seed,
            unknown=args.unknown,
            fasta_parser=args.fasta_parser,
            workers=args.workers,
            overwrite=args.overwrite,
            block_size=args.block_size,
            progress=args.progress,
        )
        run(settings)
    except PrepError as e:
        print(f"protein-performer-prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("protein-performer-prep: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
