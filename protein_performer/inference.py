"""Using trained models: embeddings, sequence scores and sampling (`protein-performer embed | score | generate`).

Inputs follow the single-sequence training format: [BOS] + residues, cropped to the model's max_len (its
learned position table ends there). Batches are length-sorted and filled up to a token budget, and padded
positions are masked out of attention, so results do not depend on how sequences were batched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from . import vocab
from .commands import progress_bar
from .data import model_tokens, token_budget_batches
from .errors import UserError
from .masking import pad_right
from .model import ProteinLM
from .proteins import Protein

log = logging.getLogger(__name__)


# ---- batching -----------------------------------------------------------------------------------------------

def _device(model: ProteinLM) -> torch.device:
    return model.tok_emb.weight.device


def _batched(seqs: list[np.ndarray], max_tokens: int, desc: str, progress: bool | None, device):
    """(indices, tokens, mask) of each token-budget batch on `device`, with a progress bar over sequences."""
    lengths = np.array([len(s) for s in seqs])
    bar = progress_bar(desc=desc, progress=progress, total=len(seqs))
    for idx in token_budget_batches(lengths, max_tokens):
        tokens = torch.from_numpy(pad_right([seqs[i] for i in idx])).to(device)
        yield idx, tokens, tokens != vocab.PAD  # mask: True = real token
        bar.update(len(idx))
    bar.close()


def _inputs(model: ProteinLM, proteins: list[Protein]) -> list[np.ndarray]:
    cropped = sum(len(p.tokens) + 1 > model.cfg.max_len for p in proteins)
    if cropped:
        log.warning(f"{cropped} sequences longer than the model's max_len ({model.cfg.max_len} tokens with BOS) are "
                    "cropped: its learned position embeddings end there")
    return [model_tokens(p.tokens, model.cfg.max_len) for p in proteins]


# ---- embeddings ---------------------------------------------------------------------------------------------

Pool = Literal["mean", "bos", "per-residue"]
POOLS = ("mean", "bos", "per-residue")


@torch.no_grad()
def embed(model: ProteinLM, proteins: list[Protein], layers: Sequence[int], pool: Pool = "mean",
          max_tokens: int = 8192, progress: bool | None = None) -> dict[int, list[np.ndarray]]:
    """Representations of each layer (0 = embeddings, n_layers = after the final LayerNorm) per protein.

    pool "mean": the mean over residues (D,); "bos": the BOS position (D,); "per-residue": (n_residues, D).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be mean, bos or per-residue, not {pool!r}")
    bad = [layer for layer in layers if not 0 <= layer <= model.cfg.n_layers]
    if bad:
        raise UserError(f"layers {bad} do not exist: the model has layers 0..{model.cfg.n_layers}")
    seqs = _inputs(model, proteins)
    out: dict[int, list] = {layer: [None] * len(seqs) for layer in layers}
    for idx, tokens, mask in _batched(seqs, max_tokens, "embed", progress, _device(model)):
        reps = model(tokens, mask, repr_layers=tuple(layers))["representations"]
        for layer in layers:
            r = reps[layer].float().cpu().numpy()
            for row, i in enumerate(idx):
                residues = r[row, 1 : len(seqs[i])]  # without BOS (read_proteins skips empty records)
                pooled = {"bos": r[row, 0], "mean": residues.mean(0)}.get(pool, residues)
                out[layer][i] = pooled.copy()
    return out


# ---- scores -------------------------------------------------------------------------------------------------

@torch.no_grad()
def score_causal(model: ProteinLM, proteins: list[Protein], max_tokens: int = 8192,
                 progress: bool | None = None) -> list[np.ndarray]:
    """log p(x_i | BOS, x_<i) of every residue, exactly (one forward pass per batch)."""
    seqs = _inputs(model, proteins)
    out: list = [None] * len(seqs)
    for idx, tokens, mask in _batched(seqs, max_tokens, "score", progress, _device(model)):
        logp = torch.log_softmax(model(tokens, mask)["logits"].float(), -1)[:, :-1]  # predicts tokens[:, 1:]
        per_token = logp.gather(-1, tokens[:, 1:, None])[..., 0].cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = per_token[row, : len(seqs[i]) - 1]
    return out


@torch.no_grad()
def score_masked(model: ProteinLM, proteins: list[Protein], max_tokens: int = 8192,
                 progress: bool | None = None) -> list[np.ndarray]:
    """Pseudo-log-likelihood terms log p(x_i | x without i), i masked: one masked copy per residue, batched."""
    seqs = _inputs(model, proteins)
    out: list = []
    bar = progress_bar(desc="score (pseudo-likelihood)", progress=progress, total=len(seqs))
    for s in seqs:
        n = len(s) - 1
        positions = np.arange(1, len(s))
        rows_per_batch = max(1, max_tokens // len(s))
        terms = np.empty(n, dtype=np.float32)
        for start in range(0, n, rows_per_batch):
            pos = positions[start : start + rows_per_batch]
            rows, cols = torch.arange(len(pos)), torch.from_numpy(pos)
            tokens = torch.from_numpy(np.repeat(s[None], len(pos), 0))
            tokens[rows, cols] = vocab.MASK
            logits = model(tokens.to(_device(model)))["logits"].float().cpu()[rows, cols]  # (rows, V)
            terms[start : start + len(pos)] = torch.log_softmax(logits, -1)[rows, torch.from_numpy(s[pos])].numpy()
        out.append(terms)
        bar.update(1)
    bar.close()
    return out


def score(model: ProteinLM, proteins: list[Protein], **kw) -> list[np.ndarray]:
    """Per-residue log-probabilities: exact for causal models, pseudo-likelihood terms for masked ones."""
    return (score_causal if model.cfg.causal else score_masked)(model, proteins, **kw)


# ---- generation ---------------------------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row from logits (B, V) with temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float().clone()
    logits[:, [vocab.BOS, vocab.PAD, vocab.MASK]] = -math.inf  # never valid in a generated sequence
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
        outside = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, torch.where(outside, -math.inf, logits.gather(-1, order)))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: ProteinLM, prompt: str = "", num_sequences: int = 1, max_len: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0) -> list[str]:
    """Sample `num_sequences` sequences from a causal model, each starting with `prompt`, until EOS or max_len
    tokens ([BOS] + residues, prompt included, as the model's max_len counts them; default: the model's).
    FAVOR models decode with a constant-size state, exact ones with a KV cache."""
    max_len = model.cfg.max_len if max_len is None else max_len
    if not model.cfg.causal:
        raise UserError("generate needs a causal model; this checkpoint is a masked (bidirectional) language model")
    if num_sequences < 1 or max_len < 2 or temperature < 0 or (top_k is not None and top_k < 1) or (
            top_p is not None and not 0 < top_p <= 1):
        raise UserError(f"need num_sequences >= 1, max_len >= 2, temperature >= 0, top_k >= 1 and 0 < top_p <= 1; "
                        f"got num_sequences={num_sequences}, max_len={max_len}, temperature={temperature}, "
                        f"top_k={top_k}, top_p={top_p}")
    if max_len > model.cfg.max_len:
        raise UserError(f"max_len {max_len} exceeds the model's max_len {model.cfg.max_len}")
    try:
        prompt_ids = vocab.encode(prompt, unknown="error")
    except vocab.UnknownLetterError as e:
        raise UserError(f"prompt: {e}") from None
    if len(prompt_ids) + 1 >= max_len:
        raise UserError(f"the prompt has {len(prompt_ids)} residues: with BOS, no room left below max_len {max_len}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.from_numpy(np.concatenate([[vocab.BOS], prompt_ids]).astype(np.int64)).repeat(num_sequences, 1)
    logits, cache = model.decode(tokens.to(_device(model)))
    out = [list(prompt_ids) for _ in range(num_sequences)]
    done = torch.zeros(num_sequences, dtype=torch.bool)
    for _ in range(max_len - 1 - len(prompt_ids)):
        nxt = sample_next(logits[:, -1].cpu(), temperature, top_k, top_p, generator)  # the generator is on the CPU
        for row in (~done).nonzero()[:, 0].tolist():
            if nxt[row] == vocab.EOS:
                done[row] = True
            else:
                out[row].append(int(nxt[row]))
        if done.all():
            break
        logits, cache = model.decode(nxt[:, None].to(_device(model)), cache)
    return [vocab.decode(np.array(s, dtype=np.int64)) for s in out]
