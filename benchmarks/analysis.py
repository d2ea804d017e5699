"""Attention-analysis throughput: proteins/s of `analyze_attention`'s per-protein loop for each attention kind.

    python benchmarks/analysis.py [--preset tiny] [--length 256] [--proteins 20] [--out benchmarks/results/analysis.csv]

Random weights are enough here (speed does not depend on training); one protein at a time, as the CLI does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from results_io import RESULTS, write_csv

from protein_performer.analysis import AttentionToAminoAcids, model_input
from protein_performer.model import ATTENTION_KINDS, Config, ProteinLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--length", type=int, default=256, help="tokens per protein ([BOS] + residues)")
    p.add_argument("--proteins", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "analysis.csv"))
    args = p.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    proteins = [rng.integers(0, 20, args.length - 1) for _ in range(args.proteins)]
    rows = []
    for kind in ATTENTION_KINDS:
        for causal in (False, True):
            cfg = Config.from_name(args.preset, attention=kind, causal=causal, max_len=max(args.length, 2))
            model = ProteinLM(cfg).eval()
            stats = AttentionToAminoAcids(cfg.n_layers, cfg.n_heads, threshold=0.3, causal=causal)
            tokens = model_input(proteins[0], args.length)
            stats.update(model.attention_maps(tokens)[:, 0], tokens[0])
            start = time.perf_counter()
            for tokens in proteins:
                x = model_input(tokens, args.length)
                stats.update(model.attention_maps(x)[:, 0], x[0])
            elapsed = time.perf_counter() - start
            rows.append({"preset": args.preset, "attention": kind, "causal": causal, "length": args.length,
                         "threads": torch.get_num_threads(), "proteins_per_s": args.proteins / elapsed})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.2f"))
    write_csv(rows, Path(args.out))


if __name__ == "__main__":
    main()
