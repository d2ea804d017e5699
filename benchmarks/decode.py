"""Sampling speed against prefix length: FAVOR's recurrent state vs the exact model's key/value cache.

A causal model with the concatenated-task size (6 layers, d_model 512, 8 heads, d_ff 2048, m = 256) decodes
`--steps` tokens after a prefix of each length, batch 1. FAVOR carries a constant-size state, so its time
per token must not grow with the prefix; the exact model attends over its whole cache at every step. For FAVOR
the last column is one attention layer's decoding step alone (FavorAttention.decode: H = 8, d_head = 64, m = 256).

    python benchmarks/decode.py --prefixes 100 10000
    OMP_NUM_THREADS=1 python benchmarks/decode.py --cpu_time --rounds 3    # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from results_io import RESULTS, machine_line, parse_args, write_csv

from protein_performer.attention import FavorAttention
from protein_performer.model import Config, ProteinLM


@torch.no_grad()
def tokens_per_second(model: ProteinLM, prefix: int, steps: int, clock=time.perf_counter) -> float:
    tokens = torch.randint(0, 20, (1, prefix))
    logits, cache = model.decode(tokens)  # prefill (not timed)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    model.decode(nxt, cache)  # warm-up step
    start = clock()
    for _ in range(steps):
        logits, cache = model.decode(nxt, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return steps / (clock() - start)


@torch.no_grad()
def attention_step_us(kernel: str, steps: int, clock=time.perf_counter) -> float:
    """Microseconds per decoding step of one FAVOR layer (FavorAttention.decode), after a 100-token prefix."""
    attn = FavorAttention(64, 256, kernel=kernel, causal=True)
    _, state = attn.decode(*(torch.randn(1, 8, 100, 64) for _ in range(3)), None)
    x = [torch.randn(1, 8, 1, 64) for _ in range(3)]
    attn.decode(*x, state)  # warm-up step
    start = clock()
    for _ in range(steps):
        _, state = attn.decode(*x, state)
    return (clock() - start) / steps * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefixes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--attention", nargs="+", default=["favor-softmax", "favor-relu", "exact"])
    p.add_argument("--rounds", type=int, default=1, help="measurements per (attention, prefix); the fastest counts")
    p.add_argument("--cpu_time", action="store_true",
                   help="time with the process's CPU clock (for OMP_NUM_THREADS=1 runs on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS / "decode.csv")
    args = parse_args(p, argv)
    max_len = max(args.prefixes) + args.steps + 2
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    print(machine_line())
    print(f"batch 1, torch threads={torch.get_num_threads()}, {'CPU' if args.cpu_time else 'wall'} clock, fastest of "
          f"{args.rounds} round(s) of {args.steps} steps")
    print(f"{'attention':<15}{'prefix':>8}{'tokens/s':>10}{'op us/step':>12}")
    for attention in args.attention:
        torch.manual_seed(0)
        cfg = Config.from_name("paper-concat-6l", attention=attention, causal=True, max_len=max_len, dropout=0.0)
        model = ProteinLM(cfg).eval()
        op = None
        if attention.startswith("favor-"):
            kernel = attention.removeprefix("favor-")
            op = min(attention_step_us(kernel, 8 * args.steps, clock) for _ in range(args.rounds))
        for prefix in args.prefixes:
            rate = max(tokens_per_second(model, prefix, args.steps, clock) for _ in range(args.rounds))
            rows.append({"attention": attention, "prefix": prefix, "tokens_per_s": rate, "op_us_per_step": op})
            print(f"{attention:<15}{prefix:>8}{rate:>10.1f}{'' if op is None else f'{op:12.0f}'}", flush=True)
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
