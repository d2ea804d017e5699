"""What the machine offers: the CPU's model and bf16 instructions, the GPU. Read by the precision choice
(training/cli.py) and recorded by every benchmark (benchmarks/results_io.py)."""

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


def has_amx_bf16() -> bool:
    """AMX-BF16 matrix units: bf16 products several times faster than fp32 on a CPU (AVX512-BF16 alone is not)."""
    return "amx_bf16" in cpu()[1]


def machine_info() -> dict:
    """CPU model, cores, the bf16 instructions, torch version and threads, CUDA device."""
    name, flags = cpu()
    return {
        "cpu": name,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def machine_line(info: dict | None = None) -> str:
    """machine_info() in one line."""
    info = info or machine_info()
    yes = {True: "yes", False: "no"}
    return (f"machine: {info['cpu']}, {info['cores']} cores, AMX-BF16 {yes[info['amx_bf16']]}, AVX512-BF16 "
            f"{yes[info['avx512_bf16']]}; torch {info['torch']} ({info['torch_threads']} threads); "
            f"CUDA {info['cuda'] or 'none'}")
