"""The model's hand-written layers, each an autograd Function for what torch's own layers do at a cost: FeedForward
(the MLP, saving one (N, d_ff) activation instead of two), SplitHeads (q, k, v from the packed projection, one
copy of their gradients instead of two) and Dropout (a mask without bool tensors on the CPU). Plain torch, no
framework."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import gelu_and_grad


class FeedForward(torch.autograd.Function):
    """linear(gelu(linear(x, w1, b1)), w2, b2) for x (N, D), w1 (F, D), b1 (F), w2 (D, F), b2 (D), all one dtype.

    Saves x and h = x w1^T + b1 only, and recomputes gelu(h) in backward: autograd would also keep gelu(h), and
    the two (N, F) tensors are the largest activations of a block (400 MB of the 6-layer model at L = 8192); the
    recomputation is one elementwise pass, where torch.utils.checkpoint would recompute the product as well. In
    bf16 on the CPU that pass is the fused kernel's, which also applies gelu' (cpu_kernels.gelu_and_grad). The
    bias gradients are products with a ones row, which on the CPU take half the time of a sum over the rows.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = linear(x, w1, b1)  # (N, F)
        ctx.save_for_backward(x, h, w1, w2)
        return linear(F.gelu(h), w2, b2)  # (N, D)

    @staticmethod
    def backward(ctx, dy):  # dy (N, D)
        x, h, w1, w2 = ctx.saved_tensors
        ones = dy.new_ones(1, dy.shape[0])
        d_b2 = (ones @ dy)[0]
        a, dh = gelu_and_grad(h, dy @ w2)  # gelu(h), d loss / dh: (N, F)
        d_w2 = dy.t() @ a  # (D, F)
        d_b1 = (ones @ dh)[0]
        return dh @ w1, dh.t() @ x, d_b1, d_w2, d_b2


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN runs natively on this CPU: float32, and bf16 where the CPU has bf16 instructions (torch's
    own bf16 products use oneDNN only there too)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


_ONEDNN_DTYPES = _onednn_dtypes()


def linear(x, w, b):
    """x w^T + b (x 2-D). On the CPU, oneDNN's product with the bias fused: torch's addmm there first copies the
    broadcast bias into the output, a pass that costs 3-20% of a product of the MLP's shapes (float32 and bf16;
    docs/performance.md)."""
    if x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives a product of x here: its lower precision where it is on (float64 stays), else x's."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class SplitHeads(torch.autograd.Function):
    """(B, L, 3 H d) -> the views q, k, v, each (B, H, L, d). Backward stacks dq, dk, dv straight into the
    (B, L, 3 H d) layout of the gradient: autograd's backward of (view, permute, unbind) would stack them as
    (3, B, H, L, d) and then copy that into the projection's layout, two passes instead of one."""

    @staticmethod
    def forward(ctx, qkv, n_heads):
        b, length, _ = qkv.shape
        return qkv.view(b, length, 3, n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, dq, dk, dv):  # each (B, H, L, d); autograd gives zeros for an unused one
        grad = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], 2)  # (B, L, 3, H, d), one operator
        return grad.flatten(2), None


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
