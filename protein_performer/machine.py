"""What the machine offers: the CPU's model and bf16 instructions, the GPU. Read by the precision choice
(training/cli.py) and recorded by every benchmark (benchmarks/results_io.py).

`has_amx_bf16()` is the one reader of the AMX-BF16 capability. The environment variable
PROTEIN_PERFORMER_AMX_BF16=1 (or 0) overrides what /proc/cpuinfo says, so that a machine without AMX can run
what `precision: null` does on one with it (the tests; subprocesses inherit it); machine_info() and
machine_line() then say the value is forced.
"""

from __future__ import annotations

import os
import platform

import torch


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


AMX_ENV = "PROTEIN_PERFORMER_AMX_BF16"


def amx_forced() -> bool | None:
    """The value PROTEIN_PERFORMER_AMX_BF16 forces (1: AMX-BF16, 0: none), or None where it is unset or empty."""
    value = os.environ.get(AMX_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{AMX_ENV}={value!r}: use 1 (act as a CPU with AMX-BF16), 0 (without), or leave it unset")
    return value == "1"


def has_amx_bf16(flags: set[str] | None = None) -> bool:
    """AMX-BF16 matrix units: bf16 products several times faster than fp32 on a CPU (AVX512-BF16 alone is not).
    PROTEIN_PERFORMER_AMX_BF16 overrides the CPU's flags (`flags`: those already read from cpu())."""
    forced = amx_forced()
    if forced is not None:
        return forced
    return "amx_bf16" in (cpu()[1] if flags is None else flags)


def machine_info() -> dict:
    """CPU model, cores, the bf16 instructions, torch version and threads, CUDA device."""
    name, flags = cpu()
    return {
        "cpu": name,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "amx_bf16": has_amx_bf16(flags),
        "amx_bf16_forced": amx_forced() is not None,  # by PROTEIN_PERFORMER_AMX_BF16, not the CPU's flags
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def machine_line(info: dict | None = None) -> str:
    """machine_info() in one line."""
    info = info or machine_info()
    yes = {True: "yes", False: "no"}
    amx = yes[info["amx_bf16"]] + (f" (forced by {AMX_ENV})" if info.get("amx_bf16_forced") else "")
    return (f"machine: {info['cpu']}, {info['cores']} cores, AMX-BF16 {amx}, AVX512-BF16 "
            f"{yes[info['avx512_bf16']]}; torch {info['torch']} ({info['torch_threads']} threads); "
            f"CUDA {info['cuda'] or 'none'}")
