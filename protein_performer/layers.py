"""The model's two hand-written layers, each an autograd Function for what torch's own layer does at a cost on the
CPU: GeluLinear (GELU then a Linear, saving one activation instead of two) and Dropout (a mask without bool
tensors). Plain torch, no framework."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that saves h only and recomputes gelu(h) in backward.

    Autograd would keep both h (for GELU) and gelu(h) (for the Linear): the two (B, L, d_ff) tensors are the
    largest activations of a block (400 MB of the 6-layer model at L = 8192). The recomputation is one
    elementwise pass; torch.utils.checkpoint would recompute the d_ff x d_model product as well.
    """

    @staticmethod
    def forward(ctx, h, weight, bias=None):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, dout):
        h, weight = ctx.saved_tensors  # under autocast h and dout are bf16, weight float32: cast explicitly
        a = F.gelu(h).to(dout.dtype)
        d_weight = dout.flatten(0, -2).T @ a.flatten(0, -2)  # (d_model, d_ff)
        del a
        dh = torch.ops.aten.gelu_backward(dout @ weight.to(dout.dtype), h.to(dout.dtype))
        d_bias = dout.flatten(0, -2).sum(0).to(weight.dtype) if ctx.has_bias else None
        return dh.to(h.dtype), d_weight.to(weight.dtype), d_bias


class Dropout(nn.Module):
    """nn.Dropout with a cheaper mask on the CPU (a CUDA device runs torch's fused kernel). torch's CPU dropout draws
    one Bernoulli sample per element (about 6 ns each on the project's CPUs, 10% of a bf16 training step); this draws
    64 random bits per 4 elements and keeps an element when its 15-bit lane is at least p * 2^15, then scales the
    kept ones by 1 / (1 - p') for that rounded p' (|p' - p| <= 2^-16): the same distribution. The mask is built by
    integer arithmetic as a bf16 tensor of 0 and 1 (saved for backward: 2 bytes per element) and applied by a
    multiplication: on the CPU an operator that reads a bool tensor (torch.where, masked_fill, a conversion) runs
    5-6x slower than a product of two tensors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type == "cuda":  # one fused kernel there, with its own counter-based generator
            return F.dropout(x, self.p, training=True)
        return _DropoutFn.apply(x, min(round(self.p * 2**15), 2**15 - 1))  # p < 1 keeps a lane value

    def extra_repr(self) -> str:
        return f"p={self.p}"


BF16_ONE = 0x3F80  # the bits of 1.0 in bfloat16


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold):
        n = x.numel()
        lanes = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # in [0, 2^63)
        lanes = lanes.view(torch.int16)[:n].view(x.shape).bitwise_and_(0x7FFF)  # 15 random bits per element
        # threshold - 1 - lane is negative (its shift by 15 all ones) exactly where the lane is kept (>= threshold)
        keep = torch.rsub(lanes, threshold - 1).bitwise_right_shift_(15).bitwise_and_(BF16_ONE)
        keep = keep.view(torch.bfloat16)  # 1.0 where kept, 0.0 where dropped
        ctx.save_for_backward(keep)
        ctx.scale = 2**15 / (2**15 - threshold)
        return _scaled_by_mask(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _scaled_by_mask(grad, keep, ctx.scale), None


def _scaled_by_mask(x, keep, scale):
    # x * keep first, so a kept element is rounded once, by the scaling (as x * scale alone would be)
    return x.mul(keep.to(x.dtype)).mul_(scale)
