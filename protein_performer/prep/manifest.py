"""What manifest.json holds: everything a later step needs to trust and describe a prepared directory (written
last by protein_performer.prepared.write_manifest, so its presence marks a complete directory)."""

from __future__ import annotations

import platform
from collections import Counter

import numpy as np

import protein_performer
from protein_performer.fasta import NUCLEOTIDE_RULE
from protein_performer.prep.inputs import InputFile
from protein_performer.prepared import FORMAT_VERSION, OFFSETS_FILE, TOKENS_FILE
from protein_performer.vocab import BOS, EOS, MASK, PAD, TOKENS

REJECT_REASONS = (
    "empty",
    "no_sequence",
    "malformed",
    "unknown_letter",
    "duplicate_accession",
    "duplicate_sequence",
)
CHANGE_REASONS = ("lowercase", "unknown_to_x")
FLAG_REASONS = ("nucleotide_like",)  # kept, but worth a look
HASH = (
    "d = blake2b(token ids, digest_size=16); de-duplication key = d[:8] (little-endian uint64); "
    "split key = splitmix64(d[8:] xor blake2b(seed as 16 bytes little-endian, digest_size=8)); "
    "test if key < test_fraction * 2**64, valid if below (test_fraction + valid_fraction) * 2**64"
)


def _versions() -> dict:
    import Bio
    import isal

    return {
        "protein_performer": protein_performer.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "biopython": Bio.__version__,
        "isal": isal.__version__,
    }


def build_manifest(
    parameters: dict,
    files: list[InputFile],
    stats: dict,
    records: dict,
    rejected: Counter,
    changed: Counter,
    flagged: Counter,
) -> dict:
    """The manifest; deterministic (no timestamps, no --workers). `parameters`: what decided the output;
    `records`: read, residues_read and moved_to_ood_by_duplicate counts."""
    return {
        "format_version": FORMAT_VERSION,
        "layout": {
            "tokens": f"<split>/{TOKENS_FILE}: uint8 token ids, every sequence followed by EOS",
            "offsets": f"<split>/{OFFSETS_FILE}: int64 start of each sequence in {TOKENS_FILE}",
        },
        "vocabulary": {"tokens": list(TOKENS), "bos": BOS, "eos": EOS, "pad": PAD, "mask": MASK},
        "splits": stats,
        "records": {
            "read": records["read"],
            "residues_read": records["residues_read"],
            "kept": sum(st["count"] for st in stats.values()),
            "rejected": {reason: rejected.get(reason, 0) for reason in REJECT_REASONS},
            "changed": {reason: changed.get(reason, 0) for reason in CHANGE_REASONS},
            "flagged": {reason: flagged.get(reason, 0) for reason in FLAG_REASONS},
            "moved_to_ood_by_duplicate": records["moved_to_ood_by_duplicate"],
        },
        "inputs": [
            {
                "path": str(f.path),
                "format": f.format,
                "gzip": f.gzipped,
                "size": f.size,
                "sha256": f.sha256,
                "records": f.records,
            }
            for f in files
        ],
        "parameters": {**parameters, "hash": HASH, "nucleotide": NUCLEOTIDE_RULE},
        "versions": _versions(),
    }
