"""Fused CPU kernels for bf16 training (cpu_kernels.cpp), each beside the torch reference it is tested against.

On the CPU a bf16 elementwise pass costs about as much as the arithmetic in it, and torch runs each operator as its
own pass; these kernels merge passes that no torch operator merges. They are compiled on first use for this
machine by torch's C++ extension builder (the system's C++ compiler and ninja; about 10 s, once per machine and
source, then loaded from torch's extension cache) and registered as torch operators (torch.ops.protein_performer),
which the profiler counts like torch's own. Where they cannot be built, or with
PROTEIN_PERFORMER_CPU_KERNELS=0, the callers run the torch reference instead, with the same results up to
rounding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .machine import cpu

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ENV = "PROTEIN_PERFORMER_CPU_KERNELS"  # "0": never build or use them
FLAGS = ["-O3", "-march=native"]  # for this CPU: the build's name below carries its model and flags

log = logging.getLogger(__name__)


@functools.cache
def load():
    """The compiled kernels (torch.ops.protein_performer), or None where they are switched off or cannot be built
    (with a warning saying why)."""
    if _switched_off():
        return None
    from torch.utils import cpp_extension

    name, flags = cpu()
    key = "\n".join([SOURCE.read_text(), torch.__version__, *FLAGS, name, *sorted(flags)])
    # one build per source, torch and CPU: a home directory shared by machines of several kinds keeps one of each
    build = f"protein_performer_cpu_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    log.info("loading protein_performer's fused CPU kernels (the first time on a machine compiles them, ~10 s)")
    try:
        cpp_extension.load(name=build, sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False)
        return torch.ops.protein_performer
    except Exception as err:  # no compiler, no ninja, no Python headers: torch's operators instead
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        # from a build log, the compiler's or the shell's complaint rather than the command line
        detail = next((line for line in lines if "error:" in line or "not found" in line), lines[-1])[:300]
        warnings.warn(f"protein_performer's fused CPU kernels could not be built, so bf16 training on the CPU uses "
                      f"torch's slower operators ({type(err).__name__}: {detail}); set {ENV}=0 to skip the attempt",
                      stacklevel=2)
        return None


def state() -> str:
    """For machine_info: "on", "off" (switched off by PROTEIN_PERFORMER_CPU_KERNELS=0) or "unavailable" (they cannot
    be built here)."""
    if _switched_off():
        return "off"
    return "on" if load() is not None else "unavailable"


def _switched_off() -> bool:
    return os.environ.get(ENV, "1") == "0"


def fused_for(x: torch.Tensor):
    """The compiled kernels where x is a bf16 CPU tensor (their only dtype) and they can be built, else None."""
    return load() if x.device.type == "cpu" and x.dtype == torch.bfloat16 else None


def gelu_and_grad(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(h), grad * gelu'(h)) for the MLP's backward: one fused pass over bf16 CPU tensors (grad is
    overwritten), else gelu_and_grad_reference."""
    kernels = fused_for(h)
    if kernels is None or grad.dtype != h.dtype:
        return gelu_and_grad_reference(h, grad)
    h, grad = h.contiguous(), grad.contiguous()  # no copies for the MLP's: a saved and a fresh product
    out = torch.empty_like(h)
    kernels.gelu_and_grad(h, out, grad)
    return out, grad


def gelu_and_grad_reference(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's two operators, each computing erf(h / sqrt 2)."""
    return F.gelu(h), torch.ops.aten.gelu_backward(grad, h)
