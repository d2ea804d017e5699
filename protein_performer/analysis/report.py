"""The whole analysis of one checkpoint on a set of proteins: figures, CSV matrices and summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import vocab
from . import plots
from ..inputs import DEFAULT_SPLIT, InputError, find_protein, is_prepared_dir, load_model, read_proteins
from .maps import identity_value_maps, model_input
from .similarity import AMINO_ACIDS, AttentionToAminoAcids, agreement, blosum62, similarity_matrix

VARIANTS = ("threshold", "weighted")


def most_focused_head(maps: torch.Tensor) -> tuple[int, int]:
    """(layer, head) whose residues attend most sharply: the highest mean of each row's largest weight."""
    focus = maps[..., 1:, :].amax(-1).mean(-1)  # (n_layers, H)
    layer, head = divmod(int(focus.argmax()), maps.shape[1])
    return layer, head


def _aa_frame(m: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(m, index=pd.Index(list(AMINO_ACIDS), name="aa"), columns=list(AMINO_ACIDS))


def run_analysis(
    ckpt: str | Path,
    input: str | Path,
    out: str | Path,
    *,
    num_sequences: int = 800,
    max_length: int = 512,
    threshold: float = 0.3,
    min_kept: int = 100,
    accession: str | None = None,
    head: tuple[int, int] | None = None,
    split: str = DEFAULT_SPLIT,
    permutations: int = 10_000,
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
) -> dict:
    """Analyse the attention of the model in `ckpt` on the first `num_sequences` proteins of `input`.

    Proteins are cropped to `max_length` tokens ([BOS] + max_length - 1 residues; also capped by the
    model's max_len) and processed one at a time: memory is one protein's (n_layers, H, L, L) maps.
    Returns the summary also written to out/summary.json. progress=None shows a bar on a terminal only.
    """
    start = time.perf_counter()
    if num_sequences < 1 or max_length < 2 or not 0 < threshold <= 1 or permutations < 1:
        raise InputError("need num_sequences >= 1, max_length >= 2, 0 < threshold <= 1 and permutations >= 1")
    loaded = load_model(ckpt)
    model, cfg = loaded.model.to(device), loaded.config
    length = min(max_length, cfg.max_len)
    proteins = read_proteins(input, num_sequences, split)
    featured = find_protein(input, accession, split) if accession else proteins[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Aggregate attention per amino acid over all proteins, one protein at a time.
    stats = AttentionToAminoAcids(cfg.n_layers, cfg.n_heads, threshold)
    residues = cropped = 0
    for protein in tqdm(proteins, desc="attention", unit="protein", disable=None if progress is None else not progress):
        tokens = model_input(protein.tokens, length).to(device)
        stats.update(model.attention_maps(tokens)[:, 0], tokens[0])
        residues += tokens.shape[1] - 1
        cropped += len(protein.tokens) > length - 1
    elapsed_maps = time.perf_counter() - start

    # 2. The featured protein: every layer and head, and the identity-values trick as a cross-check.
    tokens = model_input(featured.tokens, length).to(device)
    maps = model.attention_maps(tokens)[:, 0]
    trick_diff = float((identity_value_maps(model, tokens)[:, 0] - maps).abs().max())
    if head is None:
        head = most_focused_head(maps)
    elif not (0 <= head[0] < cfg.n_layers and 0 <= head[1] < cfg.n_heads):
        raise InputError(f"head {head} does not exist: the model has {cfg.n_layers} layers x {cfg.n_heads} heads (0-based)")
    letters = vocab.decode(tokens[0].cpu())
    maps = maps.cpu().numpy()
    files = {
        "attention_grid": plots.save(plots.attention_grid(maps, f"{featured.name}: attention of every layer and head"),
                                     out / "attention_grid.png"),
        "attention_head": plots.save(plots.attention_head(maps[head], letters, f"{featured.name}: layer {head[0]}, head {head[1]}"),
                                     out / "attention_head.png"),
    }
    np.savez_compressed(out / "attention_maps.npz", maps=maps.astype(np.float16), tokens=tokens[0].cpu().numpy(),
                        name=featured.name)
    files["attention_maps"] = out / "attention_maps.npz"

    # 3. Amino-acid similarity, overall and per layer, and its agreement with BLOSUM62.
    results, matrices, by_layer, head_rows = {}, {}, [], []
    for variant in VARIANTS:
        shares, totals = stats.shares(variant)
        used = stats.head_mask(variant, min_kept)
        matrices[variant] = similarity_matrix(shares[used])
        results[variant] = agreement(matrices[variant], permutations=permutations, seed=seed)
        results[variant].update(heads_used=int(used.sum()), heads_total=int(used.size))
        for layer in range(cfg.n_layers):
            g = agreement(similarity_matrix(shares[layer][used[layer]]), permutations=permutations, seed=seed)
            by_layer.append({"variant": variant, "layer": layer, "heads_used": int(used[layer].sum()), **g})
            for h in range(cfg.n_heads):
                head_rows.append({"variant": variant, "layer": layer, "head": h, "total": totals[layer, h],
                                  "used": bool(used[layer, h]), **dict(zip(AMINO_ACIDS, shares[layer, h]))})
    layer_table = pd.DataFrame(by_layer)
    for variant in VARIANTS:
        _aa_frame(matrices[variant]).to_csv(out / f"similarity_{variant}.csv")
        files[f"similarity_{variant}"] = out / f"similarity_{variant}.csv"
    _aa_frame(blosum62()).to_csv(out / "blosum62.csv")
    layer_table.to_csv(out / "agreement_by_layer.csv", index=False)
    pd.DataFrame(head_rows).to_csv(out / "head_shares.csv", index=False)
    heatmaps = {f"attention similarity, threshold {threshold:g}": matrices["threshold"],
                "attention similarity, weighted": matrices["weighted"], "BLOSUM62": blosum62()}
    names = dict(zip(heatmaps, VARIANTS))
    files.update(
        blosum62=out / "blosum62.csv", agreement_by_layer=out / "agreement_by_layer.csv", head_shares=out / "head_shares.csv",
        similarity=plots.save(plots.similarity_heatmaps(heatmaps, {k: results[v] for k, v in names.items()}), out / "similarity.png"),
        agreement_by_layer_plot=plots.save(plots.agreement_by_layer(layer_table), out / "agreement_by_layer.png"),
    )

    elapsed = time.perf_counter() - start
    summary = {
        "checkpoint": str(loaded.path),
        "model": {"attention": cfg.attention, "causal": cfg.causal, "objective": loaded.objective, "step": loaded.step,
                  "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model, "max_len": cfg.max_len,
                  "parameters": model.num_parameters()},
        "input": str(input),
        "split": split if is_prepared_dir(Path(input)) else None,
        "num_sequences": len(proteins),
        "num_residues": residues,
        "max_length": length,
        "cropped_sequences": cropped,
        "threshold": threshold,
        "min_kept": min_kept,
        "seed": seed,
        "featured": {"name": featured.name, "entry": featured.entry, "length": len(letters) - 1,
                     "head": {"layer": head[0], "head": head[1]}, "identity_trick_max_abs_diff": trick_diff},
        **{f"{v}_similarity": results[v] for v in VARIANTS},
        "by_layer": by_layer,
        "elapsed_s": elapsed,
        "sequences_per_s": len(proteins) / max(elapsed_maps, 1e-9),
        "files": {k: p.name for k, p in files.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def headline(summary: dict, out: str | Path) -> str:
    """A few lines for the terminal: where the report is and how well attention agrees with BLOSUM62."""

    def line(name: str, g: dict) -> str:
        if g["pearson"] is None:
            return f"  {name}: undefined ({g['heads_used']}/{g['heads_total']} heads used, {g['pairs']} pairs)"
        return (f"  {name}: Pearson {g['pearson']:.3f} (p={g['pearson_p']:.2g}), Spearman {g['spearman']:.3f} "
                f"(p={g['spearman_p']:.2g}); {g['heads_used']}/{g['heads_total']} heads, {g['pairs']} pairs")

    return "\n".join([
        f"attention analysis of {summary['num_sequences']} proteins ({summary['num_residues']:,} residues, "
        f"cropped to {summary['max_length']} tokens: {summary['cropped_sequences']}) written to {Path(out)}",
        "amino-acid similarity from attention vs BLOSUM62 (one-sided permutation p-values):",
        line(f"threshold {summary['threshold']:g} (Vig et al.)", summary["threshold_similarity"]),
        line("attention-weighted", summary["weighted_similarity"]),
    ])
