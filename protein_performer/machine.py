"""What the machine offers: the CPU's model, its bf16 instructions and how fast its bf16 matrix products run, the GPU.
Read by the precision choice (training/cli.py) and recorded by every benchmark (benchmarks/results_io.py).

`cpu_bf16()` is the one reader of the capability that choice needs: do bf16 matrix products beat fp32 on this
CPU? Yes with AMX-BF16 matrix units (6.9x fp32 measured on an Intel Xeon); otherwise it is measured, because the
instruction flags do not tell: with AVX512-BF16 alone an Intel Xeon ran them at 0.58x fp32 and an AMD EPYC (Zen 4)
at 2.1-2.8x. The environment variable PROTEIN_PERFORMER_CPU_BF16=fast (or slow) overrides the answer, so that any
machine can run what `precision: null` does on the other kind (the tests; subprocesses inherit it);
machine_info() and machine_line() then say it is forced.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time

import torch

from .errors import UserError


def cpu() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) from /proc/cpuinfo; the flags are empty where it does not exist."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


BF16_ENV = "PROTEIN_PERFORMER_CPU_BF16"
FAST_BF16 = 1.5  # bf16 / fp32 product rate from which bf16 pays: between 0.58x (slow kinds) and 2.1x (fast ones)


def has_amx_bf16(flags: set[str] | None = None) -> bool:
    """AMX-BF16 matrix units (`flags`: those already read from cpu())."""
    return "amx_bf16" in (cpu()[1] if flags is None else flags)


MEASURED_ENV = "PROTEIN_PERFORMER_BF16_SPEEDUP"  # the measurement, inherited by the processes this one starts


@functools.cache
def bf16_matmul_speedup(n: int = 512) -> float:
    """bf16 / fp32 rate of an (n x n) @ (n x n) product on this CPU: one thread, the fastest of 5 by the process's
    CPU clock, so other work on a shared machine does not skew it (about 0.15 s, once per process). The result is
    left in the environment for the processes this one starts (DDP ranks), so that they all choose alike."""
    if os.environ.get(MEASURED_ENV):
        return float(os.environ[MEASURED_ENV])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            a @ b  # warm-up: kernel selection
            best = math.inf
            for _ in range(5):
                start = time.process_time()
                a @ b
                best = min(best, time.process_time() - start)
            seconds[dtype] = max(best, 1e-9)
    finally:
        torch.set_num_threads(threads)
    speedup = seconds[torch.float32] / seconds[torch.bfloat16]
    os.environ[MEASURED_ENV] = repr(speedup)
    return speedup


def bf16_forced() -> bool | None:
    """What PROTEIN_PERFORMER_CPU_BF16 forces (fast: True, slow: False), or None where it is unset or empty."""
    value = os.environ.get(BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("fast", "slow"):
        raise UserError(f"{BF16_ENV}={value!r}: use fast (act as a CPU whose bf16 products beat fp32), slow, "
                         "or leave it unset")
    return value == "fast"


def cpu_bf16(flags: set[str] | None = None) -> tuple[bool, str]:
    """(fast, why): whether bf16 matrix products beat fp32 on this CPU, and the reason, for the log."""
    forced = bf16_forced()
    if forced is not None:
        return forced, f"forced by {BF16_ENV}={os.environ[BF16_ENV].strip()}"
    if has_amx_bf16(flags):
        return True, "AMX-BF16 matrix units"
    speedup = bf16_matmul_speedup()
    verdict = "faster" if speedup >= FAST_BF16 else "not faster"
    return speedup >= FAST_BF16, f"bf16 matrix products measured at {speedup:.2f}x fp32 ({verdict})"


def machine_info() -> dict:
    """CPU model, cores, the bf16 instructions, torch version and threads, CUDA device, the fused CPU kernels."""
    from . import cpu_kernels  # it reads cpu() from here

    name, flags = cpu()
    return {
        "cpu": name,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "amx_bf16": has_amx_bf16(flags),
        "avx512_bf16": "avx512_bf16" in flags,
        "bf16_matmul_speedup": round(bf16_matmul_speedup(), 2),  # measured, one thread
        "bf16_fast": cpu_bf16(flags)[0],  # what `precision: null` reads: AMX, the measurement or BF16_ENV
        "bf16_forced": bf16_forced() is not None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_kernels": cpu_kernels.state(),  # the fused bf16 CPU kernels: on, off or unavailable
    }


def machine_line(info: dict | None = None) -> str:
    """machine_info() in one line."""
    info = info or machine_info()
    yes = {True: "yes", False: "no"}
    bf16 = f"bf16 products {info['bf16_matmul_speedup']}x fp32" if "bf16_matmul_speedup" in info else ""
    if info.get("bf16_forced"):
        bf16 += f" (taken as {'fast' if info['bf16_fast'] else 'slow'}: forced by {BF16_ENV})"
    return (f"machine: {info['cpu']}, {info['cores']} cores, AMX-BF16 {yes[info['amx_bf16']]}, AVX512-BF16 "
            f"{yes[info['avx512_bf16']]}, {bf16}; torch {info['torch']} ({info['torch_threads']} threads); "
            f"CUDA {info['cuda'] or 'none'}; fused CPU kernels {info.get('cpu_kernels', 'not recorded')}")
