"""Where a training step's time goes, fp32 against bf16 autocast: what bf16 can gain on a CPU with fast bf16
matrix units (AMX), measured on any CPU.

One step = forward + cross-entropy + backward + gradient clipping + AdamW, as `protein-performer fit` runs it,
for the `small` preset (4 layers, d_model 256, d_ff 1024), masked, favor-relu, 32 sequences of L = 256 (8,192
tokens). torch.profiler's self time of every operator is summed into categories: matrix products, dtype casts,
FAVOR's feature maps and sums, LayerNorm / GELU / softmax / dropout, the optimizer, the rest. The last lines
answer the question: if the matrix products ran `--matmul_speedup` times faster in bf16 (AMX: a 2048 x 2048
product measured 6.9x, 453 vs 66 GFLOP/s) and everything else took what it takes here under bf16, what would
bf16 gain end to end?

    python benchmarks/precision_profile.py --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from protein_performer.machine import machine_line
from protein_performer.model import Config, ProteinLM

CATEGORIES = {  # first match wins, on the operator's name
    "matrix products": ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "einsum",
                        "_linear_pointwise"),
    "dtype casts": ("to", "_to_copy", "copy_", "_copy_from", "clone", "contiguous"),
    "optimizer": ("_foreach", "adamw", "lerp", "addcdiv", "addcmul", "sqrt"),
    "norms and activations": ("layer_norm", "native_layer_norm", "gelu", "softmax", "log_softmax", "dropout",
                              "native_dropout", "bernoulli", "random", "bitwise_and", "ge", "where", "nll_loss",
                              "cross_entropy", "gelu_backward", "native_layer_norm_backward",
                              "nll_loss_backward", "log_softmax_backward_data", "gelu_and_grad"),
    # layers.Dropout: random and bitwise_and above; its rsub and shift fall to the rest, its product to "mul"
    "FAVOR maps and sums": ("exp", "relu", "threshold", "threshold_backward", "sum", "cumsum", "cummax", "amax",
                            "max", "div", "mul", "add", "sub", "clamp", "masked_fill", "neg", "pow", "exp2",
                            "exp2_rows", "max_rows", "relu_eps"),  # the last three: cpu_kernels.cpp's
}


def category(name: str) -> str:
    op = name.split("::")[-1].lower()  # aten::mm, mkldnn::_linear_pointwise
    for cat, ops in CATEGORIES.items():
        if op in ops or op.rstrip("_") in ops or any(op.startswith(o + "_") for o in ops if o.startswith("_")):
            return cat
    return "rest"


def step_fn(model: ProteinLM, optimizer, tokens, targets, precision: str):
    def step():
        autocast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            logits = model(tokens)["logits"]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(precision: str, steps: int, length: int, batch: int) -> tuple[float, dict[str, float]]:
    """(seconds per step, {category: seconds per step}) for one precision."""
    torch.manual_seed(0)
    model = ProteinLM(Config.from_name("small", attention="favor-relu", max_len=length)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
    tokens = torch.randint(0, 20, (batch, length))
    targets = torch.where(torch.rand(batch, length) < 0.15, tokens, -100)
    step = step_fn(model, optimizer, tokens, targets, precision)
    step()  # warm-up: allocations, oneDNN kernel selection
    start = time.process_time()  # CPU clock: one thread, so other work on a shared machine does not count
    for _ in range(steps):
        step()
    per_step = (time.process_time() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    parts: dict[str, float] = {}
    for event in prof.key_averages():
        cat = category(event.key)
        parts[cat] = parts.get(cat, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return per_step, parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max_len", type=int, default=256, help="tokens per sequence (L)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--matmul_speedup", type=float, default=6.9, help="bf16 / fp32 matrix-product rate on AMX")
    args = p.parse_args()
    torch.set_num_threads(1)  # the CPU clock times one thread's work
    print(machine_line())
    results = {prec: measure(prec, args.steps, args.max_len, args.batch_size) for prec in ("fp32", "bf16")}
    cats = [*CATEGORIES, "rest"]
    # The profiler's times carry its own overhead and, on a shared machine, other work: only their shares are used,
    # scaled by each precision's CPU-clock step time.
    seconds = {prec: {c: per_step * parts.get(c, 0.0) / sum(parts.values()) for c in cats}
               for prec, (per_step, parts) in results.items()}
    print(f"\nCPU seconds per step by category ({args.batch_size} x {args.max_len} tokens, small preset, masked, "
          "favor-relu, 1 thread; profiler shares x CPU-clock step time)")
    print(f"{'':24} {'fp32':>8} {'bf16':>8}")
    for cat in cats:
        print(f"{cat:24} {seconds['fp32'][cat]:8.3f} {seconds['bf16'][cat]:8.3f}")
    fp32_step, bf16_step = results["fp32"][0], results["bf16"][0]
    print(f"{'step':24} {fp32_step:8.3f} {bf16_step:8.3f}   (bf16: {fp32_step / bf16_step:.2f}x fp32)")
    rest = bf16_step - seconds["bf16"]["matrix products"]
    projected = seconds["fp32"]["matrix products"] / args.matmul_speedup + rest
    print(f"\nbf16 with matrix products {args.matmul_speedup}x faster than fp32's and the rest as here: "
          f"{projected:.3f} s per step, {fp32_step / projected:.2f}x fp32; the rest alone ({rest:.3f} s) caps bf16 "
          f"at {fp32_step / rest:.2f}x")


if __name__ == "__main__":
    main()
