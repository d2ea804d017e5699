"""The 29-token protein alphabet of the Performer paper (docs/paper_notes.md section 1).

Ids 0-19 are the 20 standard amino acids, 20-24 the non-standard letters B O U X Z, then
BOS 25, EOS 26, PAD 27, MASK 28. Encoding is one table lookup over the bytes of the sequence
(no per-character Python loop), so tokenizing TrEMBL is bounded by I/O, not by Python.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # ids 0-19
NONSTANDARD = "BOUXZ"  # ids 20-24
LETTERS = AMINO_ACIDS + NONSTANDARD
SPECIALS = ("<bos>", "<eos>", "<pad>", "<mask>")
TOKENS: tuple[str, ...] = tuple(LETTERS) + SPECIALS

BOS, EOS, PAD, MASK = 25, 26, 27, 28
X = LETTERS.index("X")  # 23
VOCAB_SIZE = len(TOKENS)  # 29
NUM_AMINO_ACIDS = len(AMINO_ACIDS)
SPECIAL_IDS = (BOS, EOS, PAD, MASK)

UnknownPolicy = Literal["error", "x", "reject"]
"""What to do with a letter outside the vocabulary (J, '*', digits, ...):
"error" raises UnknownLetterError, "x" maps it to X, "reject" returns None (the caller skips the record)."""

NOT_A_LETTER = 255  # BYTE_TO_ID's value for bytes that are no letter of the vocabulary
BYTE_TO_ID = np.full(256, NOT_A_LETTER, dtype=np.uint8)  # byte of a letter (either case) -> token id
for _i, _c in enumerate(LETTERS):
    BYTE_TO_ID[ord(_c)] = _i
    BYTE_TO_ID[ord(_c.lower())] = _i
_LETTER_BYTES = np.frombuffer(LETTERS.encode() + b"^$_#", dtype=np.uint8)  # decode table, specials as 1 char


class UnknownLetterError(ValueError):
    """A sequence holds a letter outside the vocabulary (with policy "error")."""

    def __init__(self, letter: str, position: int):
        self.letter, self.position = letter, position  # position counts from 1, as biologists do
        super().__init__(f"letter {letter!r} at position {position} is not in the protein vocabulary "
                         f"({LETTERS}, any case)")


def encode(seq: str | bytes, unknown: UnknownPolicy = "error") -> np.ndarray | None:
    """Token ids (uint8, shape (len(seq),)) of a protein sequence; lowercase is accepted.

    Returns None only with unknown="reject" when the sequence holds a letter outside the vocabulary.
    """
    raw = seq.encode("latin-1") if isinstance(seq, str) else seq
    ids = BYTE_TO_ID[np.frombuffer(raw, dtype=np.uint8)]
    bad = ids == NOT_A_LETTER
    if bad.any():
        if unknown == "x":
            ids[bad] = X
        elif unknown == "reject":
            return None
        elif unknown == "error":
            pos = int(bad.argmax())
            raise UnknownLetterError(chr(raw[pos]), pos + 1)
        else:
            raise ValueError(f"unknown policy must be 'error', 'x' or 'reject', not {unknown!r}")
    return ids


def count_unknown(seq: str | bytes) -> int:
    """Number of letters of `seq` outside the vocabulary."""
    raw = seq.encode("latin-1") if isinstance(seq, str) else seq
    return int((BYTE_TO_ID[np.frombuffer(raw, dtype=np.uint8)] == NOT_A_LETTER).sum())


def decode(ids) -> str:
    """Letters of token ids; specials print as ^ (BOS), $ (EOS), _ (PAD), # (MASK)."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got range [{arr.min()}, {arr.max()}]")
    return _LETTER_BYTES[arr].tobytes().decode("ascii")
