"""How the FAVOR Functions cut a sequence, per device: rows per bidirectional block, rows per causal span, the
causal chunk, and how the chunk states are scanned. Measured figures behind the CPU choices: docs/performance.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DEFAULT_CHUNK = 64  # causal chunk C; the measurement behind it: docs/performance.md, "Causal chunk and span"


@dataclass(frozen=True)
class Blocking:
    """How the Functions cut the sequence: rows per bidirectional block, rows per causal span (a multiple of the
    chunk), and the causal state scan: a Python loop over chunks, or one product with a decay matrix."""

    block: int = 512
    span: int = 256  # CPU rows per causal span: docs/performance.md, "Causal chunk and span"
    scan: Literal["loop", "matmul"] = "loop"


CPU_BLOCKING = Blocking()
CPU_BF16_BLOCKING = Blocking(span=512)  # bf16 operands take half the bytes: spans twice as long, half the operators
CUDA_SPAN = 4096  # 64 chunks per span: the matmul scan's (65 x 65) decay product stays small
CUDA_BUFFER_BYTES = 2**30  # one (B, H, block, m) feature buffer: the whole sequence where it fits


def blocking_for(q: torch.Tensor, m: int) -> Blocking:
    """CPU: blocks of 512 rows, spans of 256 (512 for bf16 q, k: bf16 products), loop scan. CUDA: one block for the
    whole sequence when a (B, H, L, m) buffer fits in CUDA_BUFFER_BYTES, spans of CUDA_SPAN rows, matmul scan (no
    per-chunk launches)."""
    if q.device.type != "cuda":
        return CPU_BF16_BLOCKING if q.dtype == torch.bfloat16 else CPU_BLOCKING
    b, h, length, _ = q.shape
    block = max(512, min(length, CUDA_BUFFER_BYTES // (b * h * m * q.element_size())))
    return Blocking(block=block, span=CUDA_SPAN, scan="matmul")
