"""Masking statistics, never-masked tokens, causal targets and collation."""

import numpy as np
import pytest

from protein_performer import vocab
from protein_performer.masking import IGNORE, MASK_SPLITS, Collator, causal_targets, mask_tokens

N = 200_000


def letters(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, len(vocab.LETTERS), n)


def test_selection_rate_is_binomial():
    tokens = letters()
    _, targets = mask_tokens(tokens, np.random.default_rng(1), prob=0.15)
    # Selected count ~ Binomial(N, 0.15): sd = sqrt(N p (1 - p)) ~ 160 tokens; allow 5 sd (p ~ 6e-7 to fail).
    sd = np.sqrt(N * 0.15 * 0.85)
    assert abs((targets != IGNORE).sum() - 0.15 * N) < 5 * sd
    assert (targets[targets != IGNORE] == tokens[targets != IGNORE]).all()


@pytest.mark.parametrize("split", sorted(MASK_SPLITS))
def test_replacement_split(split):
    p_mask, p_random, p_keep = MASK_SPLITS[split]
    tokens = np.random.default_rng(0).integers(0, vocab.NUM_AMINO_ACIDS, N)
    inputs, targets = mask_tokens(tokens, np.random.default_rng(2), prob=0.15, split=split)
    sel = targets != IGNORE
    n = sel.sum()
    masked = (inputs[sel] == vocab.MASK).mean()
    changed = ((inputs[sel] != vocab.MASK) & (inputs[sel] != tokens[sel])).mean()
    # A random replacement equals the original with probability 1/20: it then counts as "unchanged".
    expected = {"mask": p_mask, "changed": p_random * 19 / 20, "same": p_keep + p_random / 20}
    observed = {"mask": masked, "changed": changed, "same": 1 - masked - changed}
    for key, p in expected.items():  # each share ~ Binomial(n, p) / n: allow 5 sd
        assert abs(observed[key] - p) < 5 * np.sqrt(p * (1 - p) / n), (key, observed[key], p)
    # Unselected positions are untouched.
    assert (inputs[~sel] == tokens[~sel]).all()


def test_specials_and_pad_never_selected():
    rng = np.random.default_rng(3)
    tokens = rng.choice(np.array(vocab.SPECIAL_IDS), N)
    inputs, targets = mask_tokens(tokens, rng, prob=0.9)
    assert (targets == IGNORE).all() and (inputs == tokens).all()


def test_random_replacements_are_standard_amino_acids():
    tokens = np.full(N, vocab.X)
    inputs, targets = mask_tokens(tokens, np.random.default_rng(4), prob=0.5, split="authors")
    replaced = (targets != IGNORE) & (inputs != vocab.MASK) & (inputs != vocab.X)
    assert replaced.sum() > 0.3 * N
    assert inputs[replaced].max() < vocab.NUM_AMINO_ACIDS
    assert len(np.unique(inputs[replaced])) == vocab.NUM_AMINO_ACIDS


def test_causal_targets_shift_and_ignore_pad():
    tokens = np.array([vocab.BOS, 0, 1, 2, vocab.PAD])
    assert causal_targets(tokens).tolist() == [0, 1, 2, IGNORE, IGNORE]


def test_collator_pads_and_masks_deterministically():
    seqs = [np.array([vocab.BOS] + [5] * 30), np.array([vocab.BOS] + [7] * 10)]
    collate = Collator("masked", seed=0)
    batch = collate([((1, 0, 0), (0, 0), seqs[0]), ((1, 0, 1), (0, 0), seqs[1])])
    assert batch["tokens"].shape == (2, 32)  # 31 rounded up to a multiple of 8
    assert batch["padding_mask"].sum(1).tolist() == [31, 11]
    assert (batch["tokens"][1, 11:] == vocab.PAD).all() and (batch["targets"][1, 11:] == IGNORE).all()
    assert (batch["targets"][:, 0] == IGNORE).all()  # BOS
    again = collate([((1, 0, 0), (0, 0), seqs[0]), ((1, 0, 1), (0, 0), seqs[1])])
    assert (again["tokens"] == batch["tokens"]).all() and (again["targets"] == batch["targets"]).all()
    # Same example, same key -> same mask in any batch composition; a different key masks differently.
    alone = collate([((1, 0, 1), (0, 0), seqs[1])])
    assert (alone["targets"][0, :11] == batch["targets"][1, :11]).all()
    long = [np.array([vocab.BOS] + [5] * 400)]
    epoch0, epoch1 = (collate([((0, e, 0), (e, 0), long[0])])["targets"] for e in (0, 1))
    assert not (epoch0 == epoch1).all()


def test_collator_causal():
    batch = Collator("causal")([((0, 0, 0), (0, 0), np.array([vocab.BOS, 3, 4])),
                                ((0, 0, 1), (0, 0), np.array([vocab.BOS, 5]))])
    assert batch["targets"][0, :3].tolist() == [3, 4, IGNORE]
    assert batch["targets"][1, :2].tolist() == [5, IGNORE]
    assert (batch["tokens"][0, :3] == batch["tokens"].new_tensor([vocab.BOS, 3, 4])).all()


def test_collator_rejects_bad_settings():
    with pytest.raises(ValueError, match="mask_split"):
        Collator(mask_split="xlnet")
    with pytest.raises(ValueError, match="objective"):
        Collator(objective="denoise")
