"""Masking and collation: lists of token sequences -> padded (inputs, targets, padding_mask) batches.

Every random choice is drawn from a generator seeded by the example's key (seed, stream, epoch, index),
never from global state: the same example is masked the same way in any worker, on any number of ranks,
and after a resume. Validation keys carry no epoch, so validation masks the same positions every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import vocab

IGNORE = -100  # target id that F.cross_entropy(ignore_index=-100) skips
# The first field of an example's key: masking seeds of training and evaluation examples never collide, and
# FILLER examples (an evaluation batch for a rank that has none, see training.sampler) carry no targets.
TRAIN_STREAM, EVAL_STREAM, FILLER_STREAM = 0, 1, 2
Objective = Literal["masked", "causal"]

# Replacement of a selected token: (MASK, random amino acid, unchanged) probabilities.
MASK_SPLITS: dict[str, tuple[float, float, float]] = {
    "bert": (0.8, 0.1, 0.1),  # Devlin et al.
    "authors": (0.1, 0.8, 0.1),  # the default of the authors' protein_lm code (docs/paper_notes.md section 1)
}
# Tokens that may be selected: the 20 standard and 5 non-standard letters; BOS/EOS/PAD/MASK never.
_SELECTABLE = np.zeros(vocab.VOCAB_SIZE, dtype=bool)
_SELECTABLE[: len(vocab.LETTERS)] = True


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    prob: float = 0.15,
    split: str = "bert",
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style masking of one sequence: (inputs, targets), targets = IGNORE where not selected.

    Each letter is selected with probability `prob`; specials and PAD never are. A selected token becomes
    MASK, a random amino acid or stays unchanged with the probabilities of MASK_SPLITS[split]. Random
    replacements are drawn uniformly from the 20 standard amino acids only: a rare letter (X, B, ...) as
    a corruption would teach the model that noise looks like an unknown residue.
    """
    p_mask, p_random, _ = MASK_SPLITS[split]
    tokens = np.asarray(tokens, dtype=np.int64)
    selected = _SELECTABLE[tokens] & (rng.random(tokens.shape) < prob)
    targets = np.where(selected, tokens, IGNORE)
    action = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[selected & (action < p_mask)] = vocab.MASK
    randomise = selected & (action >= p_mask) & (action < p_mask + p_random)
    inputs[randomise] = rng.integers(0, vocab.NUM_AMINO_ACIDS, size=int(randomise.sum()))
    return inputs, targets


def causal_targets(tokens: np.ndarray) -> np.ndarray:
    """Next-token targets of one sequence: targets[i] = tokens[i + 1], IGNORE at the end and at PAD."""
    tokens = np.asarray(tokens, dtype=np.int64)
    targets = np.full_like(tokens, IGNORE)
    targets[:-1] = tokens[1:]
    targets[targets == vocab.PAD] = IGNORE
    return targets


@dataclass
class Collator:
    """Turns [(key, position, tokens), ...] into a padded batch dict for `objective`.

    key = (stream, epoch, index) seeds the masking of that example together with `seed`; examples of
    FILLER_STREAM get no targets (a batch that counts zero, see training.sampler). Output: "tokens" (B, L)
    int64 model inputs, "targets" (B, L) int64 with IGNORE where no loss is taken, "padding_mask" (B, L) bool,
    True at real tokens, or None when the batch has no padding (exact attention then takes SDPA's fused
    kernels), and "position" (epoch, batch number) for resuming. L is the longest sequence of the batch rounded
    up to `pad_to_multiple` (steady shapes for kernels and chunked causal FAVOR).
    """

    objective: Objective = "masked"
    mask_prob: float = 0.15
    mask_split: str = "bert"
    seed: int = 0
    pad_to_multiple: int = 8

    def __post_init__(self):
        if self.objective not in ("masked", "causal"):
            raise ValueError(f"objective must be 'masked' or 'causal', not {self.objective!r}")
        if self.mask_split not in MASK_SPLITS:
            raise ValueError(f"mask_split must be one of {sorted(MASK_SPLITS)}, not {self.mask_split!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1), got {self.mask_prob}")

    def __call__(self, examples: Sequence[tuple[tuple[int, ...], tuple[int, int], np.ndarray]]) -> dict:
        inputs, targets = [], []
        for key, _, tokens in examples:
            if self.objective == "masked":
                x, y = mask_tokens(tokens, np.random.default_rng((self.seed, *key)), self.mask_prob, self.mask_split)
            else:
                x, y = tokens, causal_targets(tokens)
            inputs.append(x)
            targets.append(np.full_like(y, IGNORE) if key[0] == FILLER_STREAM else y)
        inputs_t = torch.from_numpy(pad_right(inputs, vocab.PAD, self.pad_to_multiple))
        mask = inputs_t != vocab.PAD
        return {"tokens": inputs_t, "targets": torch.from_numpy(pad_right(targets, IGNORE, self.pad_to_multiple)),
                "padding_mask": None if bool(mask.all()) else mask, "position": examples[0][1]}


def pad_right(rows: Sequence[np.ndarray], fill: int = vocab.PAD, multiple: int = 1) -> np.ndarray:
    """Rows of ids right-padded with `fill` to one length, the longest rounded up to a multiple: (B, L) int64.
    The one padder of training batches and inference inputs."""
    longest = max(len(r) for r in rows)
    out = np.full((len(rows), -(-longest // multiple) * multiple), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
