"""Amino-acid similarity from attention (Vig et al. 2020) and its agreement with BLOSUM62.

For every head h and standard amino acid a, p_h(a) is the share of the head's attention that lands ON a
(the attended-to residue), counted over residue-to-residue attention only (BOS is left out, as Vig et al.
leave out [CLS]/[SEP]). Two variants:

- threshold (Vig et al., Eq. 1 and their code): count the attention weights >= threshold;
  p_h(a) = kept weights landing on a / all kept weights. Heads with fewer than `min_kept` kept weights
  over the whole run are dropped (Vig et al.'s code uses 100): their shares are too noisy to correlate.
  Query rows with at most 1/threshold keys (a causal model's first rows) are left out: one of their
  weights is >= threshold whatever the head does, so they would keep every head of a causal model.
- weighted (threshold-free): p_h(a) = sum of the weights landing on a / sum of all weights.

similarity(a, b) = Pearson correlation of p(a) and p(b) across the kept heads. Agreement with BLOSUM62 is
the Pearson and Spearman correlation over the off-diagonal pairs (190 for all 20 amino acids). Those pairs
are not independent, so the p-value comes from a permutation test over amino-acid labels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.stats import rankdata

from .. import vocab

AMINO_ACIDS = vocab.AMINO_ACIDS  # the 20 standard amino acids, in vocabulary (id) order
MIN_HEADS = 3  # a correlation across fewer heads is meaningless


@lru_cache(maxsize=1)
def blosum62() -> np.ndarray:
    """BLOSUM62 (Biopython) over the 20 standard amino acids in AMINO_ACIDS order, (20, 20) float."""
    from Bio.Align import substitution_matrices

    m = substitution_matrices.load("BLOSUM62")
    return np.array([[m[a][b] for b in AMINO_ACIDS] for a in AMINO_ACIDS], dtype=np.float64)


class AttentionToAminoAcids:
    """Running sums, per layer and head, of the attention landing on each amino acid.

    update() takes one protein's maps at a time, so memory stays at one protein's L x L maps however many
    proteins are analysed.
    """

    def __init__(self, n_layers: int, n_heads: int, threshold: float, causal: bool = False):
        self.threshold, self.causal = threshold, causal
        shape = (n_layers, n_heads)
        self.kept = np.zeros((*shape, vocab.NUM_AMINO_ACIDS))  # count of weights >= threshold landing on a
        self.kept_total = np.zeros(shape)  # count of weights >= threshold landing on any residue
        self.weight = np.zeros((*shape, vocab.NUM_AMINO_ACIDS))  # sum of weights landing on a
        self.weight_total = np.zeros(shape)
        self.entropy = np.zeros(shape)  # sum over query rows of the row's entropy (nats)
        self.uniform_entropy = np.zeros(shape)  # sum over the same rows of log(keys the row may attend to)

    @torch.no_grad()
    def update(self, maps: torch.Tensor, tokens: torch.Tensor) -> None:
        """maps (n_layers, H, L, L) of one protein whose model input is `tokens` (L,) = [BOS] + residues."""
        a = maps[..., 1:, 1:]  # residue -> residue (a view: no copy)
        residues = tokens[1:].to(a.device)
        # One-hot of the attended-to residue; non-standard letters (X, B, ...) count in the totals only.
        onehot = torch.zeros(residues.numel(), vocab.NUM_AMINO_ACIDS, dtype=torch.float64, device=a.device)
        standard = residues < vocab.NUM_AMINO_ACIDS
        onehot[standard.nonzero()[:, 0], residues[standard]] = 1.0
        # Keys each residue row may attend to (BOS included): all L, or for a causal model its prefix (2 .. L for
        # rows 1 .. L - 1). A row of n keys holds a weight >= 1/n, so rows with n <= 1/threshold (a causal
        # model's first rows) keep a weight whatever the head does: the threshold variant leaves them out.
        length = maps.shape[-1]
        n_keys = np.arange(2, length + 1) if self.causal else np.full(length - 1, length)
        forced = int((n_keys * self.threshold <= 1).sum())  # a prefix of the rows
        kept = (a[..., forced:, :] >= self.threshold).sum(-2, dtype=torch.float64)  # (n_layers, H, R) per key
        weight = a.sum(-2, dtype=torch.float64)
        self.kept += (kept @ onehot).cpu().numpy()
        self.kept_total += kept.sum(-1).cpu().numpy()
        self.weight += (weight @ onehot).cpu().numpy()
        self.weight_total += weight.sum(-1).cpu().numpy()
        # Entropy of each residue's row over all keys (BOS included), beside that of a uniform row over its keys.
        self.entropy += torch.special.entr(maps[..., 1:, :]).sum(-1, dtype=torch.float64).sum(-1).cpu().numpy()
        self.uniform_entropy += float(np.log(n_keys).sum())

    def mean_entropy(self) -> np.ndarray:
        """(n_layers, H): attention entropy relative to a uniform row, averaged over rows (0 = one key, 1 = uniform)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.entropy / self.uniform_entropy

    def shares(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """(p, totals): p (n_layers, H, 20) = p_h(a), totals (n_layers, H) the head's denominators."""
        num, den = (self.kept, self.kept_total) if variant == "threshold" else (self.weight, self.weight_total)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den[..., None], den

    def head_mask(self, variant: str, min_kept: float) -> np.ndarray:
        """(n_layers, H) bool: heads used by `variant` (threshold: at least min_kept kept weights)."""
        _, totals = self.shares(variant)
        return totals >= (min_kept if variant == "threshold" else np.finfo(float).tiny)


def embedding_similarity(rows: np.ndarray) -> np.ndarray:
    """(20, 20) Pearson correlation between the amino acids' rows of an embedding or output matrix (20, D):
    the control for attention similarity (a model that learned amino-acid chemistry shows it here first)."""
    return np.corrcoef(np.asarray(rows, dtype=np.float64))


def similarity_matrix(shares: np.ndarray) -> np.ndarray:
    """(20, 20) Pearson correlation across heads of p(a), p(b); shares (n_heads, 20).

    An amino acid whose share is constant across heads (e.g. never attended to) gets NaN: its correlation
    is undefined. NaN everywhere with fewer than MIN_HEADS heads.
    """
    n = vocab.NUM_AMINO_ACIDS
    if shares.shape[0] < MIN_HEADS:
        return np.full((n, n), np.nan)
    centred = shares - shares.mean(0)
    norm = np.sqrt((centred**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = (centred.T @ centred) / np.outer(norm, norm)
    constant = norm <= 1e-12 * max(1.0, float(np.abs(shares).max()))
    sim[constant, :] = sim[:, constant] = np.nan
    return np.clip(sim, -1.0, 1.0)


@lru_cache(maxsize=4)
def _permuted_pairs(k: int, permutations: int, seed: int) -> np.ndarray:
    """(permutations, k(k-1)/2) flat indices into a (k, k) matrix: its upper triangle under random label
    permutations."""
    iu, ju = np.triu_indices(k, 1)
    perms = np.argsort(np.random.default_rng(seed).random((permutations, k)), axis=1)  # one permutation per row
    return perms[:, iu] * k + perms[:, ju]


def agreement(similarity: np.ndarray, reference: np.ndarray | None = None, *, permutations: int = 10_000,
              seed: int = 0) -> dict:
    """Pearson and Spearman correlation of the off-diagonal pairs of `similarity` with `reference`
    (default BLOSUM62), with one-sided permutation p-values (H1: positive agreement).

    Amino acids whose similarity is undefined (NaN) are left out, so pairs = k(k-1)/2 of the k defined.
    Null distribution: the amino-acid labels of `similarity` are permuted (rows and columns together) and
    the correlation recomputed, `permutations` times (seeded, vectorised). p = (1 + #{r_perm >= r}) / (1 + n).
    Spearman is exact under this scheme: a label permutation permutes the set of off-diagonal values, so
    their ranks are computed once and permuted with them.
    """
    reference = blosum62() if reference is None else reference
    defined = ~np.isnan(np.diag(similarity))  # similarity_matrix marks an undefined amino acid's row, diagonal included
    aas = [a for a, d in zip(AMINO_ACIDS, defined) if d]
    k = len(aas)
    out = {"pearson": None, "spearman": None, "pearson_p": None, "spearman_p": None,
           "pairs": k * (k - 1) // 2, "amino_acids": "".join(aas), "permutations": permutations}
    if k < 4:  # fewer than 6 pairs: nothing to correlate
        return out
    sim, ref = similarity[np.ix_(defined, defined)], reference[np.ix_(defined, defined)]
    iu, ju = np.triu_indices(k, 1)
    x, y = sim[iu, ju], ref[iu, ju]
    rank_x = np.zeros((k, k))
    rank_x[iu, ju] = rankdata(x)
    rank_x += rank_x.T
    flat = _permuted_pairs(k, permutations, seed)
    for name, mat, target in (("pearson", sim, y), ("spearman", rank_x, rankdata(y))):
        values = mat[iu, ju]
        # A label permutation only reorders `values`: their mean and spread stay, so each permuted
        # correlation is one dot product with the centred target.
        tc = target - target.mean()
        scale = np.sqrt(((values - values.mean()) ** 2).sum() * (tc**2).sum())
        if scale == 0:  # a constant matrix: correlation undefined
            continue
        observed = float(values @ tc / scale)
        null = mat.ravel()[flat] @ tc / scale
        out[name] = observed
        out[f"{name}_p"] = float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))
    return out
