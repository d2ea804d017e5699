"""Exact softmax attention, the baseline: torch's scaled_dot_product_attention (fused kernels, O(L) memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .features import causal_mask


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k (B, H, L, d), v (B, H, L, d_v); key_padding_mask (B, L), True = real."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    allowed = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
    if causal:
        allowed = allowed & causal_mask(q.shape[-2], device=q.device)
    # A query with no real key to attend to (a padded position before any real token) would give NaN;
    # let it attend everywhere instead: its output is padding and is never read.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
