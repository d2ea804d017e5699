"""References for tests and benchmarks: the formulas as written, no stabiliser, no blocks or chunks."""

from __future__ import annotations

import torch

from .features import RELU_EPS, causal_mask


def plain_softmax_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """phi(x) = m^-1/2 exp(W x' - |x'|^2 / 2), x' = x d^-1/4: positive random features."""
    m, d = w.shape
    x = x * d**-0.25
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) * m**-0.5


def plain_trig_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """phi(x) = m^-1/2 exp(|x'|^2 / 2) [cos W x', sin W x']: the trigonometric estimator."""
    m, d = w.shape
    x = x * d**-0.25
    wx = x @ w.T
    return torch.exp(0.5 * (x * x).sum(-1, keepdim=True)) * torch.cat([wx.cos(), wx.sin()], -1) * m**-0.5


def plain_relu_features(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) = m^-1/2 relu(W x) + eps, or relu(x) + eps without a projection (the authors' deterministic map)."""
    return (torch.relu(x) if w is None else torch.relu(x @ w.T) * w.shape[0] ** -0.5) + RELU_EPS


def plain_features(x: torch.Tensor, w: torch.Tensor | None, kernel: str) -> torch.Tensor:
    if kernel == "softmax":
        return plain_softmax_features(x, w)
    if kernel == "trig":
        return plain_trig_features(x, w)
    return plain_relu_features(x, w)


def linear_attention(phi_q, phi_k, v, *, causal=False, key_padding_mask=None) -> torch.Tensor:
    """D^-1 A V with A = phi(Q) phi(K)^T (B, H, L, L), lower-triangular when causal, padded keys' columns 0."""
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        a = a.tril()
    if key_padding_mask is not None:
        a = a * key_padding_mask[:, None, None, :]
    return (a @ v) / a.sum(-1, keepdim=True)


def recurrent_attention(phi_q, phi_k, v, state=None):
    """Causal linear attention token by token: S += phi(k_i) v_i^T, z += phi(k_i), out_i = phi(q_i) S / phi(q_i) z.
    state: (S (B, H, F, d_v), z (B, H, F)) of a prefix, or None. Returns out (B, H, L, d_v) and the final (S, z)."""
    b, h, _, f = phi_k.shape
    s, z = state if state is not None else (phi_k.new_zeros(b, h, f, v.shape[-1]), phi_k.new_zeros(b, h, f))
    outs = []
    for i in range(phi_q.shape[2]):
        s = s + phi_k[:, :, i, :, None] * v[:, :, i, None, :]
        z = z + phi_k[:, :, i]
        num = (phi_q[:, :, i, :, None] * s).sum(-2)  # (B, H, d_v)
        outs.append(num / (phi_q[:, :, i] * z).sum(-1, keepdim=True))
    return torch.stack(outs, 2), (s, z)


def naive_favor(q, k, v, w, kernel, *, causal=False, key_padding_mask=None) -> torch.Tensor:
    """FAVOR+ as the plain formula: unstabilised features of the kernel, then linear_attention."""
    return linear_attention(plain_features(q, w, kernel), plain_features(k, w, kernel), v, causal=causal,
                            key_padding_mask=key_padding_mask)


def naive_softmax_attention(q, k, v, *, causal=False, key_padding_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with an explicit (B, H, L, L) matrix."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    length = q.shape[-2]
    if causal:
        scores = scores.masked_fill(~causal_mask(length, device=q.device), -torch.inf)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
    return torch.softmax(scores, -1) @ v
