"""The analysis of one model on a set of proteins, as numbers: attention per amino acid, the similarity it implies
and the model's embeddings imply, their agreement with BLOSUM62, and one protein's maps. report.py writes it out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import vocab
from ..checkpoints import LoadedModel
from ..commands import progress_bar
from ..errors import UserError
from ..proteins import Protein
from .maps import identity_value_maps, model_input
from .similarity import AMINO_ACIDS, AttentionToAminoAcids, agreement, embedding_similarity, similarity_matrix

VARIANTS = ("threshold", "weighted")  # attention similarity (Vig et al.)
CONTROLS = ("embedding", "output")  # the model's token-embedding and output-layer rows


@dataclass
class Featured:
    """One protein's attention of every layer and head."""

    name: str
    entry: str
    letters: str  # model input as letters, "^" for BOS
    maps: np.ndarray  # (n_layers, H, L, L) float32
    head: tuple[int, int]  # (layer, head) drawn enlarged
    identity_trick_max_abs_diff: float  # the paper's identity-values route against the direct matrices


@dataclass
class AnalysisResult:
    model: dict  # checkpoint, attention, causal, objective, step, sizes
    num_sequences: int
    num_residues: int
    max_len: int
    cropped_sequences: int
    offset: int  # residues skipped at each protein's N-terminus
    short_sequences: int  # proteins left out: no residue after the offset
    threshold: float
    min_kept: int
    seed: int
    similarity: dict[str, np.ndarray]  # VARIANTS and CONTROLS -> (20, 20)
    agreement: dict[str, dict]  # same keys -> Pearson / Spearman with BLOSUM62, p-values, heads used
    by_layer: pd.DataFrame  # variant, layer, heads_used, agreement
    head_shares: pd.DataFrame  # variant, layer, head, total, used, p_h(a) per amino acid
    entropy: np.ndarray  # (n_layers, H) attention entropy relative to uniform rows
    featured: Featured | None = None
    timing: dict = field(default_factory=dict)


def most_focused_head(maps: torch.Tensor) -> tuple[int, int]:
    """(layer, head) whose residues attend most sharply: the highest mean of each row's largest weight."""
    focus = maps[..., 1:, :].amax(-1).mean(-1)  # (n_layers, H)
    layer, head = divmod(int(focus.argmax()), maps.shape[1])
    return layer, head


def analyze_attention(loaded: LoadedModel, proteins: list[Protein], featured: Protein | None = None, *,
                      max_len: int = 512, offset: int = 0, threshold: float = 0.3, min_kept: int = 100,
                      head: tuple[int, int] | None = None, permutations: int = 10_000, seed: int = 0,
                      per_layer: bool = True, progress: bool | None = None) -> AnalysisResult:
    """Analyse the attention of `loaded`'s model on `proteins` (and draw `featured`, if given); per_layer=False
    leaves out the agreement of each layer and the shares of each head (by_layer and head_shares stay empty).

    Each protein's window is [BOS] + its residues from `offset` + 1 on, cropped to `max_len` tokens (also
    capped by the model's max_len); proteins are processed one at a time: memory is one protein's
    (n_layers, H, L, L) maps. An offset keeps residue 1, nearly always the initiator methionine, out of the
    windows: heads of untrained and of causal models attend to it in every protein, which swamps the similarity.
    The featured protein is drawn from its N-terminus.
    """
    start = time.perf_counter()
    model, cfg = loaded.model, loaded.config
    device = model.head.weight.device
    length = min(max_len, cfg.max_len)
    if length < 2:
        raise UserError(f"max_len {max_len}: need at least 2 tokens ([BOS] + one residue)")
    if offset < 0:
        raise UserError(f"offset {offset}: must be >= 0")
    windows = [p.tokens[offset:] for p in proteins if len(p.tokens) > offset]
    if not windows:
        raise UserError(f"offset {offset}: no protein is longer than that "
                        f"(the longest of {len(proteins)} has {max(len(p.tokens) for p in proteins)} residues)")
    if head is not None and not (0 <= head[0] < cfg.n_layers and 0 <= head[1] < cfg.n_heads):
        raise UserError(f"head {head} does not exist: the model has {cfg.n_layers} layers x {cfg.n_heads} heads "
                        "(0-based)")

    # 1. Attention per amino acid over all proteins, one protein at a time.
    stats = AttentionToAminoAcids(cfg.n_layers, cfg.n_heads, threshold, causal=cfg.causal)
    residues = cropped = 0
    for window in progress_bar(windows, "attention", "protein", progress):
        tokens = model_input(window, length).to(device)
        stats.update(model.attention_maps(tokens)[:, 0], tokens[0])
        residues += tokens.shape[1] - 1
        cropped += len(window) > length - 1
    elapsed_maps = time.perf_counter() - start

    # 2. Similarity of amino acids implied by attention (overall and per layer) and by the embeddings.
    similarity, results, by_layer, head_rows = {}, {}, [], []
    for variant in VARIANTS:
        shares, totals = stats.shares(variant)
        used = stats.head_mask(variant, min_kept)
        similarity[variant] = similarity_matrix(shares[used])
        results[variant] = agreement(similarity[variant], permutations=permutations, seed=seed)
        results[variant].update(heads_used=int(used.sum()), heads_total=int(used.size))
        for layer in range(cfg.n_layers if per_layer else 0):
            g = agreement(similarity_matrix(shares[layer][used[layer]]), permutations=permutations, seed=seed)
            by_layer.append({"variant": variant, "layer": layer, "heads_used": int(used[layer].sum()), **g})
            for h in range(cfg.n_heads):
                head_rows.append({"variant": variant, "layer": layer, "head": h, "total": totals[layer, h],
                                  "used": bool(used[layer, h]), **dict(zip(AMINO_ACIDS, shares[layer, h]))})
    aa = slice(0, vocab.NUM_AMINO_ACIDS)  # the 20 standard amino acids' ids
    rows = {"embedding": model.tok_emb.weight[aa], "output": model.head.weight[aa]}
    for name, weights in rows.items():
        similarity[name] = embedding_similarity(weights.detach().float().cpu().numpy())
        results[name] = agreement(similarity[name], permutations=permutations, seed=seed)

    # 3. The featured protein: every layer and head, and the identity-values trick as a cross-check.
    drawn = None
    if featured is not None:
        tokens = model_input(featured.tokens, length).to(device)
        maps = model.attention_maps(tokens)[:, 0]
        trick = float((identity_value_maps(model, tokens)[:, 0] - maps).abs().max())
        if head is None:
            head = most_focused_head(maps)
        drawn = Featured(featured.name, featured.entry, vocab.decode(tokens[0].cpu()), maps.cpu().numpy(),
                         tuple(head), trick)

    model_info = {"checkpoint": str(loaded.path), "attention": cfg.attention, "causal": cfg.causal,
                  "objective": loaded.objective, "step": loaded.step, "n_layers": cfg.n_layers,
                  "n_heads": cfg.n_heads, "d_model": cfg.d_model, "max_len": cfg.max_len,
                  "parameters": model.num_parameters()}
    elapsed = time.perf_counter() - start
    return AnalysisResult(
        model=model_info, num_sequences=len(windows), num_residues=residues, max_len=length,
        cropped_sequences=cropped, offset=offset, short_sequences=len(proteins) - len(windows), threshold=threshold,
        min_kept=min_kept, seed=seed, similarity=similarity,
        agreement=results, by_layer=pd.DataFrame(by_layer), head_shares=pd.DataFrame(head_rows),
        entropy=stats.mean_entropy(), featured=drawn,
        timing={"elapsed_s": elapsed, "sequences_per_s": len(windows) / max(elapsed_maps, 1e-9)},
    )
