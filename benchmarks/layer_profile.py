"""One layer under the profiler: how many operators it launches and how much of the FAVOR op's time is not matrix
products, fp32 against bf16 autocast, this checkout against another (--baseline DIR).

Operators: the kernels one Block of the concatenated-task model (d_model 512, 8 heads, d_ff 2048, m = 256, dropout
0.1) runs in forward + backward at L = 8192, counted by torch.profiler on the CPU: every aten operator that does
work itself (the leaves of the profiler's tree, less the ones that only make views, empty tensors or no-op
conversions). On a GPU each is a kernel launch. Counted for the CPU's blocking (blocks of 512 rows) and for the
plan a CUDA device gets (one block, spans of 4096 rows, torch's operators where the CPU has fused kernels), which
the CPU can run too.

Op time: favor_attention alone (B 1, H 8, d 64, m 256, fwd + bwd), one thread, CPU clock, fastest of --rounds
processes interleaved with the baseline's; the profiler's share of matrix products (benchmarks/precision_profile.py's
categories) splits it into products and the rest.

    python benchmarks/layer_profile.py --baseline /tmp/main_before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_io import machine_line, parse_args

HERE = Path(__file__).resolve().parent
NO_KERNEL = {  # operators that launch nothing: views, allocation, metadata
    "view", "as_strided", "transpose", "slice", "select", "unsqueeze", "squeeze", "expand", "reshape",
    "_reshape_alias", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "permute",
    "t", "unflatten", "flatten", "unbind", "split", "chunk", "narrow", "diagonal", "detach", "detach_", "alias",
    "_unsafe_view", "lift_fresh", "resolve_conj", "resolve_neg", "result_type", "promote_types", "to", "item",
    "_local_scalar_dense", "is_nonzero", "contiguous", "numpy_T",
}


def kernel_ops(events) -> int:
    """Profiler events that launch a kernel: operators (aten, mkldnn's fused products, the project's fused CPU
    kernels) none of whose descendants does."""
    launches = {}

    def launches_below(e) -> bool:
        if id(e) not in launches:
            launches[id(e)] = any(is_kernel(c) or launches_below(c) for c in e.cpu_children)
        return launches[id(e)]

    def is_kernel(e) -> bool:
        namespace, _, op = e.name.partition("::")
        return namespace in ("aten", "mkldnn", "protein_performer") and op not in NO_KERNEL

    return sum(1 for e in events if is_kernel(e) and not launches_below(e))


def worker(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from protein_performer.attention import Blocking, favor_attention, orthogonal_gaussian_matrix

    torch.set_num_threads(1)
    bf16 = args.precision == "bf16"
    if args.what == "ops":
        from protein_performer.attention import blocking
        from protein_performer.model import Block, Config

        if args.plan == "cuda":  # what blocking_for gives a CUDA device, on the CPU, and no CPU kernels
            blocking.CPU_BLOCKING = blocking.CPU_BF16_BLOCKING = Blocking(
                block=args.length, span=blocking.CUDA_SPAN, scan="matmul")
            try:  # a GPU runs torch's operators; checkouts from before the kernels have none
                from protein_performer import cpu_kernels

                cpu_kernels.load = lambda: None
            except ImportError:
                pass
        cfg = Config(d_model=512, n_heads=8, d_ff=2048, max_len=args.length, attention=args.attention,
                     causal=args.causal, dropout=0.1)
        layer = Block(cfg, 0).train()
        x = torch.randn(1, args.length, 512, requires_grad=True)

        def run():
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                y, _ = layer(x)
            y.float().sum().backward()

        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return {"ops": kernel_ops(prof.events())}
    sys.path.insert(0, str(HERE))
    from precision_profile import category

    gen = torch.Generator().manual_seed(0)
    w = orthogonal_gaussian_matrix(256, 64, generator=gen)
    qkv = torch.randn(1, args.length, 3, 8, 64, generator=gen)
    qkv = (qkv.bfloat16() if bf16 else qkv).requires_grad_()

    def run():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the model's strided views of one projection
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = favor_attention(q, k, v, w, causal=args.causal)
        out.float().sum().backward()

    run()
    start = time.process_time()
    for _ in range(3):
        run()
    seconds = (time.process_time() - start) / 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    products = sum(e.self_cpu_time_total for e in prof.key_averages() if category(e.key) == "matrix products")
    return {"seconds": seconds, "products": seconds * products / total}


def run_in(checkout: Path, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # the package of that checkout, not the installed one
    cmd = [sys.executable, str(HERE / "layer_profile.py"), "--worker", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another checkout to measure beside this one")
    p.add_argument("--length", type=int, default=8192, help="tokens (L)")
    p.add_argument("--rounds", type=int, default=3, help="op-time processes per checkout, interleaved")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", choices=("ops", "time"), help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    p.add_argument("--attention", default="favor-softmax", help=argparse.SUPPRESS)
    p.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", choices=("cpu", "cuda"), default="cpu", help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    checkouts = {"this": HERE.parent, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(machine_line())
    print(f"\nOperators one layer launches, forward + backward, L = {args.length} (masked / causal)")
    print(f"{'checkout':10}{'attention':15}{'plan':6}{'fp32':>14}{'bf16':>14}")
    for name, checkout in checkouts.items():
        for attention in ("favor-softmax", "favor-relu", "exact"):
            for plan in ("cpu", "cuda") if attention != "exact" else ("cpu",):
                cells = []
                for precision in ("fp32", "bf16"):
                    counts = [run_in(checkout, ["--what", "ops", "--precision", precision, "--attention", attention,
                                                "--plan", plan, "--length", str(args.length), *causal])["ops"]
                              for causal in ([], ["--causal"])]
                    cells.append(" / ".join(map(str, counts)))
                print(f"{name:10}{attention:15}{plan:6}{cells[0]:>14}{cells[1]:>14}", flush=True)
    print(f"\nfavor_attention (favor-softmax, B 1, H 8, d 64, m 256, L = {args.length}), forward + backward, 1 thread, "
          f"CPU s, fastest of {args.rounds}: all / matrix products / the rest")
    best: dict = {}
    for _ in range(args.rounds):
        for causal in ([], ["--causal"]):
            for precision in ("fp32", "bf16"):
                for name, checkout in checkouts.items():
                    r = run_in(checkout, ["--what", "time", "--precision", precision, "--length", str(args.length),
                                          *causal])
                    key = (name, "causal" if causal else "bidirectional", precision)
                    if key not in best or r["seconds"] < best[key]["seconds"]:
                        best[key] = r
    for (name, mode, precision), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        rest = r["seconds"] - r["products"]
        print(f"{mode:14}{precision:6}{name:10}{r['seconds']:8.3f}{r['products']:8.3f}{rest:8.3f}")


if __name__ == "__main__":
    main()
