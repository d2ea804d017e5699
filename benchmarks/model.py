"""Whole-model training-step benchmark: tokens/s and peak memory against sequence length (paper Fig. 3).

One training step = forward + cross-entropy + backward + AdamW step, batch 1, in --precision (fp32, or bf16
autocast), for this project's exact Transformer (SDPA), Performer-softmax and Performer-ReLU, masked (bidirectional) and
causal, and performer-pytorch's PerformerLM at the same size when it is installed. Default size: the
concatenated-task model (6 layers, d_model 512, 8 heads, d_ff 2048, m = 256). Each (system, L) runs in a
fresh subprocess so its peak memory is its own. Beside each row: the compute floor (model FLOPs over the
machine's measured matmul rate in the same precision, on the same device) and the fraction of it reached.

A system stops growing L once a step takes longer than --skip_after seconds or more than --memory_limit_gib;
the last lines name the largest L measured within that memory for each system.

    python benchmarks/model.py                                              # 1K .. 64K, every system, both modes
    python benchmarks/model.py --lengths 8192 --modes masked --rounds 3     # one column of the issue's table
    python benchmarks/model.py --lengths 65536 --activation_checkpointing   # the longest length
    python benchmarks/model.py --lengths 8192 --modes masked --precision bf16 --rounds 3  # bf16 column
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from results_io import (
    RESULTS,
    default_device,
    fastest_of_rounds,
    machine_line,
    parse_args,
    performer_pytorch_installed,
    run_worker,
    time_memory_plot,
    write_csv,
)

SYSTEMS = ("exact", "favor-softmax", "favor-relu", "performer-pytorch")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build(system: str, causal: bool, length: int, size: dict):
    if system == "performer-pytorch":
        from performer_pytorch import PerformerLM

        return PerformerLM(num_tokens=29, max_seq_len=length, dim=size["d_model"], depth=size["n_layers"],
                           heads=size["n_heads"], dim_head=size["d_model"] // size["n_heads"],
                           ff_mult=size["d_ff"] // size["d_model"], nb_features=size["nb_features"], causal=causal)
    from protein_performer.model import Config, ProteinLM

    # dropout 0 as in PerformerLM's defaults, so both sides run the same arithmetic
    cfg = Config(attention=system, causal=causal, max_len=length, relu_random_features=system == "favor-relu",
                 dropout=0.0, **size)
    model = ProteinLM(cfg)
    return lambda tokens: model(tokens)["logits"], model


def step_flops(system: str, causal: bool, length: int, size: dict) -> float:
    """Matmul FLOPs of one training step (forward x 3): 6 N L for the weights plus the attention terms."""
    d, layers, heads, m = size["d_model"], size["n_layers"], size["n_heads"], size["nb_features"]
    weights = layers * (4 * d * d + 2 * d * size["d_ff"]) + d * 29
    flops = 6 * weights * length  # the floor counts no recomputation, also with activation checkpointing
    d_head = d // heads
    if system == "exact":
        attn = 4 * length * length * d_head * heads * (0.5 if causal else 1.0)  # QK^T and AV
    else:
        f = 2 * m if system == "performer-pytorch" else m  # (q, k features) + kv + out
        attn = 2 * length * f * d_head * heads * 2 + 2 * length * m * (d_head + 1) * heads * 2
        if causal and system != "performer-pytorch":  # our intra-chunk C x C products on top
            from protein_performer.attention import DEFAULT_CHUNK

            attn += 2 * length * DEFAULT_CHUNK * (m + d_head + 1) * heads
    return flops + 3 * layers * attn


def matmul_rate(device: str, precision: str) -> float:
    """FLOP/s of a large matrix product in `precision` on `device` (the roof for the compute floor)."""
    import torch

    n = 8192 if device == "cuda" else 2048  # large enough to reach the device's sustained rate
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, DTYPES[precision])) for _ in range(2))
    a @ b
    times = []
    for _ in range(11):  # the median product: the machine's sustained rate, not one lucky or unlucky moment
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[5]


def worker(system: str, causal: bool, length: int, size: dict, repeats: int, device: str, precision: str) -> dict:
    import resource

    import torch

    torch.manual_seed(0)
    built = build(system, causal, length, size)
    fn, module = (built, built) if system == "performer-pytorch" else built
    module.to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    tokens = torch.randint(0, 20, (1, length), device=device)
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for _ in range(repeats + 1):  # first step warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with amp:
            logits = fn(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if times[-1] > 60:
            break
    seconds = min(times[1:] or times)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_gib": peak}


def run_one(args, system, causal, length):
    return run_worker([sys.executable, __file__, "--worker", system, str(int(causal)), str(length),
                       "--size", json.dumps(args.size), "--repeats", str(args.repeats), "--device", args.device,
                       "--precision", args.precision],
                      args.timeout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--modes", nargs="+", default=["masked", "causal"], choices=["masked", "causal"])
    p.add_argument("--size", type=json.loads,
                   default={"d_model": 512, "n_heads": 8, "n_layers": 6, "d_ff": 2048, "nb_features": 256},
                   help="model size as JSON (default: the paper's concatenated-task Performer)")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block in backward (this project's models only)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per run, after one warm-up step")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every system per length, interleaved; the fastest counts (a shared machine's "
                        "slow spells then hit every system alike)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--skip_after", type=float, default=120, help="stop growing L once a step took this long")
    p.add_argument("--memory_limit_gib", type=float, default=16.0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="bf16: autocast, the roof in bf16 too")
    p.add_argument("--out", type=Path, default=RESULTS / "model.csv")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parse_args(p, argv)

    if args.worker:
        system, causal, length = args.worker[0], bool(int(args.worker[1])), int(args.worker[2])
        print(json.dumps(worker(system, causal, length, args.size, args.repeats, args.device, args.precision)))
        return

    if args.activation_checkpointing:
        args.size["activation_checkpointing"] = True
    systems = [s for s in args.systems if s != "performer-pytorch" or performer_pytorch_installed()]
    if args.activation_checkpointing and "performer-pytorch" in systems:
        systems.remove("performer-pytorch")  # it has no such option
    rate = matmul_rate(args.device, args.precision)
    print(machine_line())
    print(f"device={args.device}, precision={args.precision}, size={args.size}, {args.rounds} round(s) per length")
    print(f"{'mode':<8}{'system':<19}{'L':>7}{'s/step':>9}{'tokens/s':>10}{'peak GiB':>10}{'floor s':>9}{'of floor':>9}"
          f"{'roof GFLOP/s':>14}")

    def remeasure_roof():
        nonlocal rate
        rate = max(rate, matmul_rate(args.device, args.precision))

    keys = [(mode, system) for mode in args.modes for system in systems]
    runs = fastest_of_rounds(keys, args.lengths, args.rounds,
                             lambda key, length: run_one(args, key[1], key[0] == "causal", length),
                             stop=lambda r: r["seconds"] > args.skip_after or r["peak_gib"] > args.memory_limit_gib,
                             before_round=remeasure_roof)
    rows = []
    for (mode, system), length, r in runs:
        row = {"device": args.device, "precision": args.precision, "mode": mode, "system": system, "length": length,
               "seconds": r.get("seconds"), "tokens_per_s": length / r["seconds"] if "seconds" in r else None,
               "peak_gib": r.get("peak_gib"), "roof_gflop_s": rate / 1e9, "floor_seconds": None,
               "fraction_of_floor": None, "error": r.get("error", "")}
        rows.append(row)
        if row["error"]:
            print(f"{mode:<8}{system:<19}{length:>7}   {row['error']}", flush=True)
            continue
        floor = step_flops(system, mode == "causal", length, args.size) / rate
        row.update(floor_seconds=floor, fraction_of_floor=floor / row["seconds"])
        print(f"{mode:<8}{system:<19}{length:>7}{row['seconds']:>9.2f}{row['tokens_per_s']:>10.0f}"
              f"{row['peak_gib']:>10.2f}{floor:>9.2f}{row['fraction_of_floor']:>9.0%}{rate / 1e9:>14.0f}", flush=True)
    print(f"roof: the median of 11 square {args.precision} matrix products on {args.device}, the best of the rounds")
    write_csv(rows, args.out)
    largest = {}
    for r in rows:
        if r["seconds"] and r["peak_gib"] <= args.memory_limit_gib:
            key = (r["mode"], r["system"])
            largest[key] = max(largest.get(key, 0), r["length"])
    for (mode, system), length in sorted(largest.items()):
        print(f"largest L measured within {args.memory_limit_gib:g} GiB: {mode} {system}: {length}")
    time_memory_plot(rows, args.out.with_suffix(".png"), "system", "seconds per training step", "peak_gib",
                     "peak memory (GiB)")


if __name__ == "__main__":
    main()
