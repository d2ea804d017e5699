"""Using trained models: embeddings, sequence scores and sampling (`protein-performer embed | score | generate`).

Inputs follow the single-sequence training format: [BOS] + residues, cropped to the model's max_len (its
learned position table ends there). Batches are length-sorted and filled up to a token budget, and padded
positions are masked out of attention, so results do not depend on how sequences were batched.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import vocab
from .data import model_tokens, token_budget_batches
from .inputs import InputError, LoadedModel, Protein, load_model, read_proteins
from .model import ProteinLM


# ---- batching -----------------------------------------------------------------------------------------------

def pad(seqs: Sequence[np.ndarray], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (B, L) and the padding mask (B, L), True = real token."""
    length = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), length), vocab.PAD, dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.from_numpy(s)
    tokens = tokens.to(device)
    return tokens, tokens != vocab.PAD


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A progress bar over sequences; progress None: shown on a terminal only."""
    return tqdm(total=total, desc=desc, unit="seq", disable=not progress if progress is not None else None)


def _device(model: ProteinLM) -> torch.device:
    return model.tok_emb.weight.device


def _batched(seqs: list[np.ndarray], tokens_per_batch: int, desc: str, progress: bool | None, device):
    """(indices, tokens, mask) of each token-budget batch on `device`, with a progress bar over sequences."""
    lengths = np.array([len(s) for s in seqs])
    bar = _bar(len(seqs), desc, progress)
    for idx in token_budget_batches(lengths, tokens_per_batch):
        yield idx, *pad([seqs[i] for i in idx], device)
        bar.update(len(idx))
    bar.close()


def _inputs(model: ProteinLM, proteins: list[Protein]) -> list[np.ndarray]:
    longest = max(len(p.tokens) + 1 for p in proteins)
    if longest > model.cfg.max_len:
        warnings.warn(f"sequences longer than the model's max_len ({model.cfg.max_len} tokens with BOS) are cropped: "
                      f"its learned position embeddings end there", stacklevel=3)
    return [model_tokens(p.tokens, model.cfg.max_len) for p in proteins]


# ---- embeddings ---------------------------------------------------------------------------------------------

Pool = Literal["mean", "bos", "per-residue"]


@torch.no_grad()
def embed(model: ProteinLM, proteins: list[Protein], layers: Sequence[int], pool: Pool = "mean",
          tokens_per_batch: int = 8192, progress: bool | None = None) -> dict[int, list[np.ndarray]]:
    """Representations of each layer (0 = embeddings, n_layers = after the final LayerNorm) per protein.

    pool "mean": the mean over residues (D,); "bos": the BOS position (D,); "per-residue": (n_residues, D).
    """
    if pool not in ("mean", "bos", "per-residue"):
        raise ValueError(f"pool must be mean, bos or per-residue, not {pool!r}")
    bad = [layer for layer in layers if not 0 <= layer <= model.cfg.n_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist: the model has layers 0..{model.cfg.n_layers}")
    seqs = _inputs(model, proteins)
    out: dict[int, list] = {layer: [None] * len(seqs) for layer in layers}
    for idx, tokens, mask in _batched(seqs, tokens_per_batch, "embed", progress, _device(model)):
        reps = model(tokens, mask, repr_layers=tuple(layers))["representations"]
        for layer in layers:
            r = reps[layer].float().cpu().numpy()
            for row, i in enumerate(idx):
                residues = r[row, 1 : len(seqs[i])]  # without BOS (read_proteins skips empty records)
                out[layer][i] = r[row, 0].copy() if pool == "bos" else residues.mean(0) if pool == "mean" else residues.copy()
    return out


# ---- scores -------------------------------------------------------------------------------------------------

@torch.no_grad()
def score_causal(model: ProteinLM, proteins: list[Protein], tokens_per_batch: int = 8192,
                 progress: bool | None = None) -> list[np.ndarray]:
    """log p(x_i | BOS, x_<i) of every residue, exactly (one forward pass per batch)."""
    seqs = _inputs(model, proteins)
    out: list = [None] * len(seqs)
    for idx, tokens, mask in _batched(seqs, tokens_per_batch, "score", progress, _device(model)):
        logp = torch.log_softmax(model(tokens, mask)["logits"].float(), -1)[:, :-1]  # predicts tokens[:, 1:]
        per_token = logp.gather(-1, tokens[:, 1:, None])[..., 0].cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = per_token[row, : len(seqs[i]) - 1]
    return out


@torch.no_grad()
def score_masked(model: ProteinLM, proteins: list[Protein], tokens_per_batch: int = 8192,
                 progress: bool | None = None) -> list[np.ndarray]:
    """Pseudo-log-likelihood terms log p(x_i | x without i), i masked: one masked copy per residue, batched."""
    seqs = _inputs(model, proteins)
    out: list = []
    bar = _bar(len(seqs), "score (pseudo-likelihood)", progress)
    for s in seqs:
        n = len(s) - 1
        positions = np.arange(1, len(s))
        rows_per_batch = max(1, tokens_per_batch // len(s))
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
def generate(model: ProteinLM, prompt: str = "", num: int = 1, max_length: int = 256, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[str]:
    """Sample `num` sequences from a causal model, each starting with `prompt`, up to max_length residues
    (prompt included) or EOS. FAVOR models decode with a constant-size state, exact ones with a KV cache."""
    if not model.cfg.causal:
        raise InputError("generate needs a causal model; this checkpoint is a masked (bidirectional) language model")
    if max_length + 1 > model.cfg.max_len:
        raise InputError(f"--max-length {max_length} exceeds the model's max_len {model.cfg.max_len} minus BOS")
    prompt_ids = vocab.encode(prompt, unknown="error")
    if len(prompt_ids) >= max_length:
        raise InputError(f"the prompt has {len(prompt_ids)} residues, not fewer than --max-length {max_length}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.from_numpy(np.concatenate([[vocab.BOS], prompt_ids]).astype(np.int64)).repeat(num, 1)
    logits, cache = model.decode(tokens.to(_device(model)))
    out = [list(prompt_ids) for _ in range(num)]
    done = torch.zeros(num, dtype=torch.bool)
    for _ in range(max_length - len(prompt_ids)):
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


# ---- command line -------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint written by `protein-performer fit`, or a run directory")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def _fasta_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fasta", required=True, help="input FASTA (.fasta or .fasta.gz)")
    p.add_argument("--unknown", choices=["error", "x", "reject"], default="error",
                   help="letters outside the vocabulary: stop, read as X, or skip the record")
    p.add_argument("--tokens-per-batch", type=int, default=8192, help="token budget of a batch (B x longest L)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal)")


def _load(args) -> tuple[LoadedModel, list[Protein] | None]:
    loaded = load_model(args.ckpt)
    loaded.model.to(args.device)
    proteins = read_proteins(args.fasta, unknown=args.unknown) if hasattr(args, "fasta") else None
    return loaded, proteins


def embed_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="protein-performer embed", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Per-residue or per-protein embeddings of a FASTA file.")
    _common(p)
    _fasta_args(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to save (default: the last)")
    p.add_argument("--pool", choices=["mean", "bos", "per-residue"], default="mean")

    def run(args):
        loaded, proteins = _load(args)
        layers = args.layers or [loaded.config.n_layers]
        reps = embed(loaded.model, proteins, layers, args.pool, args.tokens_per_batch, args.progress)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "index.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["row", "id", "length", "cropped_to"])
            for i, prot in enumerate(proteins):
                w.writerow([i, prot.name, len(prot.tokens), min(len(prot.tokens), loaded.config.max_len - 1)])
        for layer in layers:
            if args.pool == "per-residue":  # ragged: one array per protein, keyed by its row in index.tsv
                np.savez(args.out / f"layer{layer}_per_residue.npz", **{str(i): r for i, r in enumerate(reps[layer])})
            else:
                np.save(args.out / f"layer{layer}_{args.pool}.npy", np.stack(reps[layer]))
        print(f"wrote {len(proteins)} {args.pool} embeddings of layers {layers} to {args.out} (index.tsv lists the rows)")

    _run(p, run, argv)


def score_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="protein-performer score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Per-sequence log-likelihood and perplexity (causal: exact; masked: "
                                            "pseudo-log-likelihood, masking each position in turn).")
    _common(p)
    _fasta_args(p)
    p.add_argument("--out", required=True, type=Path, help="output TSV")
    p.add_argument("--per-position", type=Path, help="also write one row per residue to this TSV")

    def run(args):
        loaded, proteins = _load(args)
        terms = score(loaded.model, proteins, tokens_per_batch=args.tokens_per_batch, progress=args.progress)
        method = "causal" if loaded.config.causal else "pseudo"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["id", "length", "scored", "log_likelihood", "perplexity", "method"])
            for prot, t in zip(proteins, terms):
                w.writerow([prot.name, len(prot.tokens), len(t), f"{t.sum():.4f}", f"{math.exp(-t.mean()):.4f}", method])
        if args.per_position:
            with open(args.per_position, "w", newline="") as f:
                w = csv.writer(f, delimiter="\t")
                w.writerow(["id", "position", "residue", "log_prob"])
                for prot, t in zip(proteins, terms):
                    for pos, (res, lp) in enumerate(zip(prot.sequence, t), start=1):
                        w.writerow([prot.name, pos, res, f"{lp:.5f}"])
        print(f"scored {len(proteins)} sequences ({method} log-likelihood) -> {args.out}")

    _run(p, run, argv)


def generate_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="protein-performer generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Sample sequences from a causal model, written as FASTA.")
    _common(p)
    p.add_argument("--prompt", default="", help="residues every sequence starts with")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--max-length", type=int, default=200, help="residues per sequence, prompt included")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output FASTA (default: standard output)")

    def run(args):
        loaded, _ = _load(args)
        seqs = generate(loaded.model, args.prompt, args.num, args.max_length, args.temperature, args.top_k,
                        args.top_p, args.seed)
        text = "".join(f">generated_{i} seed={args.seed} temperature={args.temperature} top_k={args.top_k} "
                       f"top_p={args.top_p} length={len(s)}\n{s}\n" for i, s in enumerate(seqs))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            print(f"wrote {len(seqs)} sequences to {args.out}")
        else:
            sys.stdout.write(text)

    _run(p, run, argv)


def _run(parser: argparse.ArgumentParser, run: Callable, argv: Sequence[str]) -> None:
    args = parser.parse_args(argv)
    try:
        run(args)
    except (InputError, vocab.UnknownLetterError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
