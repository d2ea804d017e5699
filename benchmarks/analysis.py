"""Attention-analysis throughput: proteins/s of `analyze_attention`'s per-protein loop for each attention kind.

    python benchmarks/analysis.py [--preset tiny] [--max_len 256] [--num_sequences 20] [--out CSV]

Random weights are enough here (speed does not depend on training); one protein at a time, as the CLI does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from results_io import RESULTS, parse_args, write_csv

from protein_performer.analysis import AttentionToAminoAcids, model_input
from protein_performer.model import ATTENTION_KINDS, Config, ProteinLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max_len", type=int, default=256, help="tokens per protein ([BOS] + residues)")
    p.add_argument("--num_sequences", type=int, default=20, help="proteins analysed per attention kind")
    p.add_argument("--out", default=str(RESULTS / "analysis.csv"))
    args = parse_args(p, renamed={"--length": "--max_len"})
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    proteins = [rng.integers(0, 20, args.max_len - 1) for _ in range(args.num_sequences)]
    rows = []
    for kind in ATTENTION_KINDS:
        for causal in (False, True):
            cfg = Config.from_name(args.preset, attention=kind, causal=causal, max_len=max(args.max_len, 2))
            model = ProteinLM(cfg).eval()
            stats = AttentionToAminoAcids(cfg.n_layers, cfg.n_heads, threshold=0.3, causal=causal)
            tokens = model_input(proteins[0], args.max_len)
            stats.update(model.attention_maps(tokens)[:, 0], tokens[0])
            start = time.perf_counter()
            for tokens in proteins:
                x = model_input(tokens, args.max_len)
                stats.update(model.attention_maps(x)[:, 0], x[0])
            elapsed = time.perf_counter() - start
            rows.append({"preset": args.preset, "attention": kind, "causal": causal, "length": args.max_len,
                         "threads": torch.get_num_threads(), "proteins_per_s": args.num_sequences / elapsed})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.2f"))
    write_csv(rows, Path(args.out))


if __name__ == "__main__":
    main()
