"""Attention op benchmark: forward+backward time and peak memory against sequence length.

Compares exact attention (torch SDPA), FAVOR softmax and FAVOR ReLU from protein_performer, bidirectional and
causal, and performer-pytorch's FastAttention (when `pip install performer-pytorch==1.1.4` is present),
at B=1, H=8, d_head=64, m=256 by default. Each (method, length) runs in a fresh subprocess so that its
peak memory (max RSS above the process's baseline) is its own. Prints a table and writes CSV (and the machine,
see results_io.machine_info).

    python benchmarks/attention.py                      # 1K .. 32K, all methods
    python benchmarks/attention.py --lengths 1024 8192 --methods favor-softmax exact
    python benchmarks/attention.py --precision bf16     # under bf16 autocast
    python benchmarks/attention.py --baseline DIR       # also FAVOR from another checkout (before / after)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from results_io import (
    RESULTS,
    default_device,
    fastest_of_rounds,
    machine_line,
    performer_pytorch_installed,
    run_worker,
    time_memory_plot,
    write_csv,
)

METHODS = ("exact", "favor-softmax", "favor-relu", "performer-pytorch")
BASELINE = "@baseline"  # method suffix: the same method imported from --baseline DIR


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(method: str, causal: bool, d: int, m: int):
    if method == "exact":
        from protein_performer.attention import softmax_attention

        return lambda q, k, v: softmax_attention(q, k, v, causal=causal)
    if method.startswith("favor-"):
        from protein_performer.attention import FavorAttention

        kernel = method.removeprefix("favor-")
        # favor-relu: the paper's Performer-ReLU with random features, so both FAVOR rows use m features
        return FavorAttention(d, m, kernel=kernel, causal=causal).eval()
    if method == "performer-pytorch":
        from performer_pytorch import FastAttention

        return FastAttention(dim_heads=d, nb_features=m, causal=causal).eval()
    raise ValueError(f"unknown method {method!r}")


def worker(method: str, length: int, causal: bool, batch: int, heads: int, d: int, m: int, repeats: int,
           device: str, precision: str = "fp32", baseline: str | None = None, cpu_time: bool = False) -> dict:
    """Runs in the child process: times forward+backward, returns seconds and peak MiB above baseline."""
    if method.endswith(BASELINE):
        # results_io has imported this checkout's protein_performer: forget it, or the baseline's would never load
        for name in [n for n in sys.modules if n.split(".")[0] == "protein_performer"]:
            del sys.modules[name]
        sys.path.insert(0, baseline)
        method = method.removesuffix(BASELINE)
    import torch

    torch.manual_seed(0)
    fn = _build(method, causal, d, m)
    if isinstance(fn, torch.nn.Module):
        fn.to(device)
    q, k, v = (torch.randn(batch, heads, length, d, device=device, requires_grad=True) for _ in range(3))
    baseline = _rss_mib() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocator and kernels
        _sync(device)
        start = clock()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = fn(q, k, v)
        out.float().sum().backward()
        _sync(device)
        times.append(clock() - start)
        q.grad = k.grad = v.grad = None
        if times[-1] > 20:  # slow rows: one warm-up and one measurement are enough
            break
    if device == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        peak = torch.cuda.max_memory_allocated() / 2**20
    measured = times[1:] or times
    return {"seconds": min(measured), "peak_mib": peak - baseline}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_one(args, method: str, length: int, causal: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(length), str(int(causal)), "--batch", str(args.batch),
           "--heads", str(args.heads), "--d_head", str(args.d_head), "--nb_features", str(args.nb_features),
           "--repeats", str(args.repeats), "--device", args.device, "--precision", args.precision]
    if args.baseline:
        cmd += ["--baseline", str(args.baseline)]
    if args.cpu_time:
        cmd.append("--cpu_time")
    return run_worker(cmd, args.timeout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--modes", nargs="+", default=["bidirectional", "causal"], choices=["bidirectional", "causal"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_head", type=int, default=64)
    p.add_argument("--nb_features", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process, after one warm-up run")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per (method, mode, length), interleaved across methods and modes; the fastest "
                        "counts (a shared machine's slow spells then hit every method alike)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: under bf16 autocast")
    p.add_argument("--cpu_time", action="store_true",
                   help="time with the process's CPU clock instead of the wall clock: for OMP_NUM_THREADS=1 runs on "
                        "a machine shared with other work, where waiting for a core would otherwise count")
    p.add_argument("--baseline", type=Path,
                   help="a checkout of protein_performer (e.g. `git worktree add DIR OLD_COMMIT`): its FAVOR methods "
                        "run too, as METHOD@baseline, interleaved with this checkout's")
    p.add_argument("--timeout", type=float, default=300, help="seconds per (method, length) before giving up")
    p.add_argument("--skip_after", type=float, default=60,
                   help="stop growing L for a method once one run took longer than this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "attention.csv")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "LENGTH", "CAUSAL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        method, length, causal = args.worker[0], int(args.worker[1]), bool(int(args.worker[2]))
        print(json.dumps(worker(method, length, causal, args.batch, args.heads, args.d_head, args.nb_features,
                                args.repeats, args.device, args.precision, args.baseline and str(args.baseline),
                                args.cpu_time)))
        return

    methods = [m for m in args.methods if m != "performer-pytorch" or performer_pytorch_installed()]
    if len(methods) < len(args.methods):
        print("performer-pytorch is not installed: skipping it (pip install performer-pytorch==1.1.4)")
    if args.baseline:
        methods += [m + BASELINE for m in methods if m.startswith("favor-")]
    rows = []
    print(machine_line())
    print(f"B={args.batch} H={args.heads} d_head={args.d_head} m={args.nb_features}, forward+backward, "
          f"device={args.device}, precision={args.precision}, torch threads={_threads()}, {args.rounds} round(s), "
          f"{'CPU' if args.cpu_time else 'wall'} clock")
    print(f"{'mode':<14}{'method':<27}{'L':>7}{'seconds':>10}{'peak MiB':>10}")
    keys = [(mode, method) for mode in args.modes for method in methods]
    runs = fastest_of_rounds(keys, args.lengths, args.rounds,
                             lambda key, length: run_one(args, key[1], length, key[0] == "causal"),
                             stop=lambda r: r["seconds"] > args.skip_after)
    for (mode, method), length, r in runs:
        row = {"mode": mode, "method": method, "length": length, "precision": args.precision,
               "seconds": r.get("seconds"), "peak_mib": r.get("peak_mib"), "error": r.get("error", "")}
        rows.append(row)
        if row["error"]:
            print(f"{mode:<14}{method:<27}{length:>7}   {row['error']}", flush=True)
        else:
            print(f"{mode:<14}{method:<27}{length:>7}{row['seconds']:>10.3f}{row['peak_mib']:>10.0f}", flush=True)
    write_csv(rows, args.out)
    time_memory_plot(rows, args.out.with_suffix(".png"), "method", "seconds (forward + backward)", "peak_mib",
                     "peak memory above baseline (MiB)")
    _summary(rows)


def _summary(rows):
    """Ratios the issue asks for, where the rows exist."""
    t = {(r["mode"], r["method"], r["length"]): r["seconds"] for r in rows if r["seconds"]}
    for (mode, method, length), seconds in sorted(t.items()):
        pp, base = t.get((mode, "performer-pytorch", length)), t.get((mode, method + BASELINE, length))
        if pp and method.startswith("favor-"):
            print(f"{mode} L={length}: {method} is {pp / seconds:.2f}x faster than performer-pytorch")
        if base:
            print(f"{mode} L={length}: {method} takes {seconds / base:.2f}x the time of {method}{BASELINE}")
    for mode in ("bidirectional", "causal"):
        lengths = sorted(n for (mo, me, n) in t if mo == mode and me == "favor-softmax")
        wins = [n for n in lengths if (mode, "exact", n) in t and t[(mode, "favor-softmax", n)] < t[(mode, "exact", n)]]
        if wins:
            print(f"{mode}: FAVOR softmax beats exact SDPA from L={wins[0]}")
    for length in sorted({r["length"] for r in rows}):
        c, b = t.get(("causal", "favor-softmax", length)), t.get(("bidirectional", "favor-softmax", length))
        if c and b:
            print(f"L={length}: FAVOR causal / bidirectional time = {c / b:.2f}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
