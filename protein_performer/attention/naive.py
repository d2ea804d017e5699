"""O(L^2) references for tests and benchmarks: the formulas as written, no stabiliser, no chunking."""

from __future__ import annotations

import torch


def plain_softmax_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(x) = m^-1/2 exp(W x' - |x'|^2 / 2), x' = x d^-1/4: FAVOR+ positive features, unstabilised."""
    m, d = projection.shape
    x = x * d**-0.25
    return torch.exp(x @ projection.T - 0.5 * (x * x).sum(-1, keepdim=True)) * m**-0.5


def plain_trig_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(x) = m^-1/2 exp(|x'|^2 / 2) [cos W x', sin W x']: the trigonometric estimator, unstabilised."""
    m, d = projection.shape
    x = x * d**-0.25
    wx = x @ projection.T
    return torch.exp(0.5 * (x * x).sum(-1, keepdim=True)) * torch.cat([wx.cos(), wx.sin()], -1) * m**-0.5


def linear_attention(phi_q, phi_k, v, *, causal=False, key_padding_mask=None) -> torch.Tensor:
    """D^-1 A V with A = phi(Q) phi(K)^T (lower-triangular when causal), materialised as (B, H, L, L)."""
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        a = a.tril()
    if key_padding_mask is not None:
        a = a * key_padding_mask[:, None, None, :]
    return (a @ v) / a.sum(-1, keepdim=True)


def naive_softmax_attention(q, k, v, *, causal=False, key_padding_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with an explicit (B, H, L, L) matrix."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    length = q.shape[-2]
    if causal:
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
    return torch.softmax(scores, -1) @ v
