"""Bidirectional FAVOR+ as one autograd Function over blocks of rows (the design: see favor.py)."""

from __future__ import annotations

import torch

from .features import (
    BlockFeatures,
    acc_dtype,
    add_mm_,
    as_low,
    blocks,
    empty_in_layout_of,
    grad_denominators,
    grad_y,
    mm,
    new_output,
    normalise_,
    rows,
    with_ones,
    without_autocast,
)


class BidirectionalFavor(torch.autograd.Function):
    """D^-1 phi(Q) (phi(K)^T [V, 1]) for softmax or ReLU features; returns the output (B, H, L, d_v).

    Forward: a pass over key blocks builds kv^T = sum_j [v_j, 1] phi(k_j)^T (B, H, d_v + 1, m) under an online
    shared maximum g of the key log-scales (rescaled by exp(g_old - g_new) <= 1 when a block raises it), then a
    pass over query blocks. Backward recomputes the features block by block (a query pass for dq and dkv, then a
    key pass for dk and dv), each from one product with its shift folded in. Saves q, k, v, the projection, kv^T,
    g, the output, D, the query rows' maxima and the keys' |k'|^2/2 (softmax). kv is kept transposed: the products
    that accumulate it then have d_v + 1 = 65 rows instead of 65 columns, about 20% faster on the CPU.

    With bf16 products (low), q, k, v, the output and D, dy and the gradients are bf16 (values that only feed
    products, or products' results: the values a float32 path would round on the way in or out); the feature
    blocks are computed in float32 and converted once for the products that read them; the sums kv and dkv, g and
    the maxima stay float32, and kv and dkv are converted once for the products that read them.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, kernel, real, block, low):
        feats = BlockFeatures(w, kernel, q.shape[-1], low)
        b, h, length, _ = q.shape
        block = min(block, length)
        acc = acc_dtype(q)
        buf = q.new_empty(b, h, block, feats.m, dtype=feats.buffer_dtype(q))  # one (B, H, C, m) buffer for all
        kv = q.new_zeros(b, h, v.shape[-1] + 1, feats.m, dtype=acc)  # kv^T (B, H, d_v + 1, m), referenced at g
        g = None  # (B, H, 1): the largest key log-scale so far (softmax only)
        half_sq = feats.half_sq_norm(k) if feats.softmax else None  # |k'|^2 / 2 (B, H, L), for backward too
        v1 = with_ones(v)  # (B, H, L, d_v + 1), one concatenation for every block
        for s, e in blocks(length, block):
            real_c = _rows_of(real, s, e)
            phi = rows(buf, e - s)
            r, half_sq_norm = feats.key_logits(k[:, :, s:e], phi, real_c, _rows_of(half_sq, s, e))
            if r is not None:  # softmax: raise the shared maximum, rescale what kv holds
                g_new = r.amax(-1, keepdim=True)
                if g is not None:
                    g_new = torch.maximum(g, g_new)
                    kv.mul_(torch.exp(g - g_new)[..., None])
                g = g_new
            feats.keys_(phi, half_sq_norm, g, real_c)
            add_mm_(kv, v1[:, :, s:e].transpose(-1, -2), phi, low)
        kv = as_low(kv, low)  # what the query products and backward read
        out, den = new_output(q, v.shape[-1])
        shift = q.new_empty(b, h, length, dtype=acc)  # each query row's maximum, for backward's recomputation
        for s, e in blocks(length, block):
            phi = feats.queries_(q[:, :, s:e], rows(buf, e - s), shift[:, :, s:e])
            normalise_(mm(phi, kv.transpose(-1, -2), low), out[:, :, s:e], den[:, :, s:e])
        ctx.save_for_backward(q, k, v, w, kv, g, real, out, den, shift, half_sq)
        ctx.kernel, ctx.block, ctx.low = kernel, block, low
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, d_out):
        q, k, v, w, kv, g, real, out, den, shift, half_sq = ctx.saved_tensors
        low = ctx.low
        feats = BlockFeatures(w, ctx.kernel, q.shape[-1], low)
        b, h, length, _ = q.shape
        acc = acc_dtype(q)
        buf = q.new_empty(b, h, ctx.block, feats.m, dtype=feats.buffer_dtype(q))
        grad = None if low else torch.empty_like(buf)  # bf16 products' results come fresh
        dy_buf = q.new_empty(b, h, ctx.block, v.shape[-1] + 1)
        dq, dk, dv = (empty_in_layout_of(x) for x in (q, k, v))
        dkv = torch.zeros_like(kv, dtype=acc)
        den = grad_denominators(den, d_out.dtype)
        for s, e in blocks(length, ctx.block):  # queries: dq, and dkv = sum_i phi(q_i) dy_i^T
            phi = as_low(feats.queries_at_(q[:, :, s:e], rows(buf, e - s), shift[:, :, s:e]), low)
            dy = grad_y(d_out[:, :, s:e], out[:, :, s:e], den[:, :, s:e], rows(dy_buf, e - s))  # (B, H, C, d_v + 1)
            add_mm_(dkv, dy.transpose(-1, -2), phi, low)  # dkv^T (B, H, d_v + 1, m)
            d_phi = mm(dy, kv, low, out=None if low else rows(grad, e - s))
            dq[:, :, s:e] = feats.queries_backward_(d_phi, phi)
        dkv = as_low(dkv, low)
        v1 = with_ones(v)
        offset = None if half_sq is None else feats.key_offset(half_sq, g, real)  # every key's shift, g final here
        for s, e in blocks(length, ctx.block):  # keys: dk, dv
            real_c = _rows_of(real, s, e)
            phi = as_low(feats.keys_at_(k[:, :, s:e], rows(buf, e - s), _rows_of(offset, s, e), real_c), low)
            v1c = v1[:, :, s:e]
            p = mm(phi, dkv.transpose(-1, -2), low)  # (B, H, C, d_v + 1)
            dv[:, :, s:e] = p[..., :-1]
            d_phi = mm(v1c, dkv, low, out=None if low else rows(grad, e - s))
            # softmax keys: sum_f d_phi * phi = v1 . p per key, no pass over the (B, H, C, m) product (relu: unused)
            total = (v1c * p).sum(-1, keepdim=True, dtype=acc) if feats.softmax else None
            dk[:, :, s:e] = feats.keys_backward_(d_phi, phi, k[:, :, s:e], total=total)
        return dq, dk, dv, None, None, None, None, None


def _rows_of(x: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    """Rows s:e of a (B, H or 1, L, ...) array that may be absent (no padding mask; relu has no key norms)."""
    return None if x is None else x[:, :, s:e]
