"""Split assignment: held-out Pfam families -> OOD; the rest train/valid/test by a hash of the sequence.

Every kept sequence has a 128-bit BLAKE2b digest of its tokens, salted with the seed: the first 64 bits are the
de-duplication key, the last 64 bits, read as u in [0, 1), choose the split: u < test_fraction -> test,
u < test_fraction + valid_fraction -> valid, else train. That is a pure function of (sequence, seed, fractions):
duplicates and re-runs land in the same split, and shards prepared on different machines agree.

Minimum counts: when the threshold rule leaves test or valid below its minimum (small inputs), the sequences with
the smallest u are promoted: test takes the n_test smallest u, valid the next n_valid (see `promotion_targets`).
Only then does a sequence's split depend on the rest of the input.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from protein_performer.errors import UserError
from protein_performer.fasta import open_text
from protein_performer.prepared import SPLITS

# docs/paper_notes.md section 1 (App. C.1 of arXiv 2009.14794).
# fmt: off
PAPER_OOD_FAMILIES = (
    "PF18369", "PF04680", "PF17988", "PF12325", "PF03272", "PF03938", "PF17724", "PF10696", "PF11968", "PF04153",
    "PF06173", "PF12378", "PF04420", "PF10841", "PF06917", "PF03492", "PF06905", "PF15340", "PF17055", "PF05318",
)
# fmt: on

_PFAM_ID = re.compile(r"^PF\d{5}$")
TRAIN, VALID, TEST, OOD = (SPLITS.index(name) for name in ("train", "valid", "test", "ood"))  # split codes


def normalize_family(family: str) -> str:
    """PF00001.21 -> PF00001; a UserError for something that is not a Pfam accession."""
    fam = family.strip().split(".")[0].upper()
    if not _PFAM_ID.match(fam):
        raise UserError(f"{family!r} is not a Pfam family accession (PFnnnnn)")
    return fam


def read_family_file(path: str | Path) -> list[str]:
    """Pfam accessions from a text file: whitespace or comma separated, '#' starts a comment."""
    try:
        with open_text(path, "OOD family file") as f:
            text = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read OOD family file ({e})") from None
    words = re.split(r"[\s,]+", re.sub(r"#.*", "", text))
    return [normalize_family(w) for w in words if w]


def _label_columns(path: Path, header: list[str]) -> tuple[int, int, bool]:
    """(accession column, families column, header present) of a labels TSV by its first line."""
    if "families" in header and "accession" in header:
        return header.index("accession"), header.index("families"), True
    if "pfamA_acc" in header:
        return header.index("uniprot_acc") if "uniprot_acc" in header else 0, header.index("pfamA_acc"), True
    if len(header) == 7 and _PFAM_ID.match(header[4].split(".")[0]):
        return 0, 4, False
    raise UserError(
        f"{path}: line 1: unrecognised Pfam labels header {header[:7]!r}; expected columns "
        "'accession ... families' or Pfam-A.regions.uniprot.tsv columns (uniprot_acc ... pfamA_acc ...)"
    )


def read_ood_accessions(path: str | Path, families: set[str]) -> set[str]:
    """Accessions carrying any of `families`, from a labels TSV (streamed; only matches are kept).

    Two layouts are recognised by their header: this project's `accession n_domains families ...` (families
    comma-separated) and Pfam's `Pfam-A.regions.uniprot.tsv` (`uniprot_acc seq_version crc64 md5 pfamA_acc
    seq_start seq_end`, one domain per line; accepted with or without header). Plain or gzipped, file or pipe.
    """
    found: set[str] = set()
    line_no = 0
    with open_text(path, "Pfam labels file") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if "\0" in line:
                    raise UserError(f"{path}: line {line_no}: binary data (NUL byte); not a Pfam labels TSV")
                cols = line.rstrip("\n").split("\t")
                if line_no == 1:
                    acc_col, fam_col, has_header = _label_columns(Path(path), cols)
                    if has_header:
                        continue
                if len(cols) <= max(acc_col, fam_col):
                    if line.strip():
                        raise UserError(
                            f"{path}: line {line_no}: expected at least {max(acc_col, fam_col) + 1} "
                            "tab-separated columns"
                        )
                    continue
                if any(fam.split(".")[0] in families for fam in cols[fam_col].split(",")):
                    found.add(cols[acc_col])
        except (EOFError, OSError) as e:  # igzip: EOFError on truncation, OSError on corrupt data
            raise UserError(f"{path}: line {line_no + 1}: truncated or corrupt gzip stream ({e})") from None
    if line_no == 0:
        raise UserError(f"{path}: empty Pfam labels file")
    return found


def split_thresholds(valid_fraction: float, test_fraction: float) -> tuple[np.uint64, np.uint64]:
    """uint64 thresholds on the split key: key < t_test -> test; key < t_valid -> valid."""
    if not (valid_fraction >= 0 and test_fraction >= 0 and valid_fraction + test_fraction < 1):
        raise UserError("--valid_fraction and --test_fraction must be >= 0 and sum to less than 1")
    t_test = int(test_fraction * 2**64)
    t_valid = min(int((test_fraction + valid_fraction) * 2**64), 2**64 - 1)
    return np.uint64(t_test), np.uint64(t_valid)


def assign_split(split_keys: np.ndarray, t_test: np.uint64, t_valid: np.uint64) -> np.ndarray:
    """Split code (TRAIN, VALID, TEST) of each key by the fraction thresholds."""
    return np.where(split_keys < t_test, TEST, np.where(split_keys < t_valid, VALID, TRAIN)).astype(np.int8)


def promotion_targets(n: int, n_valid: int, n_test: int, min_valid: int, min_test: int) -> tuple[int, int]:
    """Final (valid, test) counts for n non-OOD sequences of which the thresholds gave n_valid, n_test.

    Minimums are capped at a quarter of the input (at least 1) so a tiny input keeps most of it for training; a
    minimum never lowers what the thresholds gave.
    """
    cap = max(1, n // 4)
    test = max(n_test, min(min_test, cap))
    valid = max(n_valid, min(min_valid, cap))
    test = min(test, n)
    return min(valid, n - test), test
