"""Command line: protein-performer-prep INPUT [INPUT ...] --out DIR [options] (or python -m protein_performer.prep),
generated from `prep`'s signature and docstring by protein_performer.commands."""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Literal

from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

from protein_performer import commands
from protein_performer.errors import UserError
from protein_performer.prep import PROG
from protein_performer.prep.inputs import Format
from protein_performer.prep.parallel import default_workers
from protein_performer.prep.pipeline import Settings, run
from protein_performer.prep.splits import PAPER_OOD_FAMILIES, normalize_family, read_family_file
from protein_performer.vocab import UnknownPolicy

Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<", 2**128)])


def prep(
    inputs: list[str],
    out: str,
    format: Format = "auto",
    pfam_labels: str | None = None,
    ood_families: list[str] | None = None,
    ood_families_file: str | None = None,
    valid_fraction: Fraction = 0.001,
    test_fraction: Fraction = 0.01,
    min_valid: NonNegativeInt = 100,
    min_test: NonNegativeInt = 100,
    seed: Seed = 0,
    workers: PositiveInt | None = None,
    unknown: UnknownPolicy = "reject",
    fasta_parser: Literal["fast", "biopython"] = "fast",
    block_size: PositiveInt = 4 << 20,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Tokenize, de-duplicate and split UniProt FASTA or flat files into a prepared data directory.

    Writes OUT/{train,valid,test,ood}/tokens.bin + offsets.npy and OUT/manifest.json. Sequences carrying a
    held-out Pfam family go to ood; the rest are split by a seeded hash of the sequence. Skipped records are
    counted by reason in the manifest and the first few of each reason are named on stderr.

    Args:
        inputs: UniProt FASTA (.fasta[.gz]) or flat files (.dat[.gz]), plain or gzipped; pipes work (<(zcat x.gz)).
        out: output directory; written beside it and renamed at the end, one run at a time.
        format: input format; auto looks at the first line.
        pfam_labels: accession -> Pfam families: 'accession n_domains families ...' TSV or Pfam's
            Pfam-A.regions.uniprot.tsv[.gz] (flat files also use their own 'DR   Pfam;' lines).
        ood_families: held-out Pfam families (default: the paper's 20).
        ood_families_file: file of held-out Pfam families (whitespace or comma separated, # comments).
        valid_fraction: share of non-OOD sequences for validation, in [0, 1).
        test_fraction: share of non-OOD sequences for test, in [0, 1).
        min_valid: minimum validation sequences (capped at a quarter of a tiny input).
        min_test: minimum test sequences (capped at a quarter of a tiny input).
        seed: salt of the split hash; a different seed gives a different split.
        workers: parser processes (default: 1 on up to 2 cores, where parsing in the main process while a thread
            decompresses is fastest, else one per core); the output is identical for any value.
        unknown: letters outside the vocabulary (J, *, digits): skip the record (reject), map to X (x), or stop (error).
        fasta_parser: fast: a block-level equivalent of Biopython's SimpleFastaParser (4x faster); biopython:
            SimpleFastaParser itself.
        block_size: bytes read from an input at a time; the output is identical for any value.
        overwrite: replace OUT if it is a prepared directory or empty (swapped in only when the run succeeds).
        progress: progress bar (default: on a terminal).
    """
    if ood_families is not None and ood_families_file is not None:
        raise UserError("give --ood_families or --ood_families_file, not both")
    if ood_families_file is not None:
        families = read_family_file(ood_families_file)
    else:
        families = [normalize_family(f) for f in (PAPER_OOD_FAMILIES if ood_families is None else ood_families)]
    if min(min_valid, min_test) < 0 or (workers is not None and workers < 1):
        raise UserError("--min_valid and --min_test must be >= 0, --workers >= 1")
    resolved = {**locals(), "ood_families": families,
                "workers": default_workers() if workers is None else workers}
    return run(Settings(**{f.name: resolved[f.name] for f in fields(Settings)}))


def main(argv: list[str] | None = None) -> int:
    """The console script: 0 on success; errors exit with status 2 (`PROG: error: ...`)."""
    commands.run(prep, sys.argv[1:] if argv is None else list(argv), PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
