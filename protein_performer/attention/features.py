"""Random projections and FAVOR+ feature maps.

Every feature phi(x) factors as ``f * exp(r)``: ``f`` (B, H, L, F) is bounded, ``r`` (B, H, L) is a
per-position log-scale. For queries exp(r) cancels in the attention normaliser, so only ``f`` is used;
keys are returned times exp(-g), g the shared (bidirectional) or running (causal) maximum of ``r``, so no
exponent is ever positive and nothing can overflow, and no epsilon is added that would bias attention
towards uniform (the performer-pytorch defect, PAPER_NOTES section 5).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

Kernel = Literal["softmax", "relu", "trig"]
KERNELS: tuple[str, ...] = ("softmax", "relu", "trig")
RELU_EPS = 1e-3  # part of the authors' generalized ReLU kernel phi(x) = relu(x) + 1e-3, not a stabiliser


def orthogonal_gaussian_matrix(
    m: int,
    d: int,
    *,
    orthogonal: bool = True,
    scaling: Literal["chi", "sqrt_d"] = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """An (m, d) matrix of random projection rows w_i for FAVOR+.

    orthogonal=True stacks blocks of d exactly orthogonal rows (QR of a Gaussian matrix with the sign of
    diag(R) folded in, so each block is Haar-distributed); orthogonal=False gives IID Gaussian rows.
    scaling="chi" gives row norms distributed as the norm of a d-dim standard Gaussian (so each row is
    marginally N(0, I_d)); "sqrt_d" sets every norm to sqrt(d) (the "regularized" variant).
    Drawn on the CPU in float64 from `generator`, so the matrix is a pure function of the generator's
    seed whatever the device: every data-parallel rank draws the same one without communication.
    """
    if m < 1 or d < 1:
        raise ValueError(f"need m >= 1 and d >= 1, got m={m}, d={d}")
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', not {scaling!r}")
    opts = dict(generator=generator, dtype=torch.float64)
    if orthogonal:
        blocks = []
        for _ in range(math.ceil(m / d)):
            q, r = torch.linalg.qr(torch.randn(d, d, **opts))
            q = q * torch.sign(torch.diagonal(r))  # column j times sign(R_jj): Haar-distributed
            blocks.append(q.T)  # rows orthonormal
        w = torch.cat(blocks)[:m]  # (m, d), unit rows
        if scaling == "chi":
            norms = torch.randn(m, d, **opts).norm(dim=1)
        else:
            norms = torch.full((m,), math.sqrt(d), dtype=torch.float64)
        w = w * norms[:, None]
    else:
        w = torch.randn(m, d, **opts)
        if scaling == "sqrt_d":
            w = w * (math.sqrt(d) / w.norm(dim=1, keepdim=True))
    return w.to(device=device, dtype=dtype or torch.get_default_dtype())


def feature_map(
    x: torch.Tensor,
    projection: torch.Tensor | None,
    kernel: Kernel,
    *,
    key_stabiliser: Literal["none", "shared", "running"] = "none",
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of x (B, H, L, d): returns (phi, g), phi (B, H, L, F) and the stabiliser g (B, H, L).

    softmax: phi(x) = m^-1/2 exp(W x' - |x'|^2/2), x' = x d^-1/4 (positive features, F = m);
    trig:    phi(x) = m^-1/2 exp(|x'|^2/2) [cos W x', sin W x'] (F = 2m);
    relu:    phi(x) = m^-1/2 relu(W x) + 1e-3, or relu(x) + 1e-3 when projection is None (the authors'
             deterministic default); g = 0 (nothing to stabilise).

    With key_stabiliser="none" (queries), phi is returned up to a positive factor per position, which
    cancels in the attention normaliser: softmax features are exp(W x' - max_i (W x')_i) <= 1.
    For keys, phi is returned times exp(-g): g is the maximum log-scale over real keys ("shared",
    bidirectional) or its running maximum g_i = max_{j<=i} ("running", causal: the future never moves
    the past). Exponents are then never positive, so nothing overflows, and no epsilon is added (the
    performer-pytorch defect, PAPER_NOTES section 5). Padded keys (key_padding_mask False) get phi = 0.
    g is detached: it cancels exactly in D^-1.
    """
    check_feature_args(x.shape[-1], projection, kernel)
    real = None if key_padding_mask is None else key_padding_mask[:, None, :].to(torch.bool)  # (B, 1, L)
    if projection is not None and kernel != "trig":
        return _ProjectedFeatures.apply(x, projection, kernel, key_stabiliser, real)
    if kernel == "relu":  # the authors' deterministic map, no projection
        phi = torch.relu(x) + RELU_EPS
        return (phi if real is None else phi * real[..., None]), x.new_zeros(x.shape[:-1])
    # trig: an ablation, kept in plain autograd; its log-scale |x'|^2/2 carries gradient
    m, d = projection.shape
    x = x * d**-0.25
    wx = x @ projection.T
    phi = torch.cat([torch.cos(wx), torch.sin(wx)], -1) * m**-0.5
    if key_stabiliser == "none":
        return phi, x.new_zeros(x.shape[:-1])
    r = 0.5 * (x * x).sum(-1)
    g = _stabiliser(r.detach(), key_stabiliser, real)
    scale = torch.exp(r - g)
    if real is not None:
        scale = scale.masked_fill(~real, 0.0)
    return phi * scale[..., None], g


def check_feature_args(d: int, projection: torch.Tensor | None, kernel: str) -> None:
    """Clear errors for an unknown kernel, a missing projection, or one whose width is not d_head."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if projection is None and kernel != "relu":
        raise ValueError(f"kernel {kernel!r} needs a projection matrix")
    if projection is not None and d != projection.shape[1]:
        raise ValueError(f"projection has d={projection.shape[1]} columns but q/k have d_head={d}")


def _stabiliser(r: torch.Tensor, kind: str, real: torch.Tensor | None) -> torch.Tensor:
    """Shared or running maximum of the per-position log-scale r (B, H, L) over real keys."""
    if real is not None:
        # padded keys never raise the maximum (also when they come before the first real key)
        r = r.masked_fill(~real, torch.finfo(r.dtype).min / 4)
    if kind == "running":
        return torch.cummax(r, dim=-1).values
    return r.amax(-1, keepdim=True).expand(r.shape)


def without_autocast(backward):
    """For the hand-written backward passes: run in the forward's precision (float32 or float64) also when
    loss.backward() is called inside an autocast region, where their products would otherwise drop to bf16."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next(g for g in grads if g is not None).device  # not ctx.saved_tensors: unpack only once
        with torch.autocast(device_type=device.type, enabled=False):
            return backward(ctx, *grads)

    return wrapped


class _ProjectedFeatures(torch.autograd.Function):
    """feature_map for the softmax and projected-ReLU kernels: BlockFeatures over the whole sequence as one
    block, so the formulas and the hand-written backward live in one place."""

    @staticmethod
    def forward(ctx, x, w, kernel, key_stabiliser, real):
        feats = BlockFeatures(w, kernel, x.shape[-1])
        phi = x.new_empty(*x.shape[:-1], feats.m)  # (B, H, L, m), filled in place
        g = x.new_zeros(x.shape[:-1])
        if key_stabiliser == "none":
            feats.queries_(x, phi)
        else:
            r, half_sq_norm = feats.key_logits(x, phi, real)
            if r is not None:  # softmax (relu has nothing to stabilise)
                g = _stabiliser(r, key_stabiliser, None)  # key_logits already kept padded keys out of r
            feats.keys_(phi, half_sq_norm, g, real)
        ctx.save_for_backward(x, w, phi)
        ctx.kernel, ctx.is_key = kernel, key_stabiliser != "none"
        ctx.mark_non_differentiable(g)
        return phi, g

    @staticmethod
    @without_autocast
    def backward(ctx, d_phi, _):
        x, w, phi = ctx.saved_tensors
        feats = BlockFeatures(w, ctx.kernel, x.shape[-1])
        grad = d_phi.clone()  # the BlockFeatures backward methods overwrite their input
        dx = feats.keys_backward_(grad, phi, x) if ctx.is_key else feats.queries_backward_(grad, phi)
        return dx, None, None, None, None


class BlockFeatures:
    """Softmax or ReLU features of one block of rows, written in place into a reused buffer.

    FAVOR's Functions (favor.py) call these per block of rows (bidirectional) or span of chunks (causal) so that
    no (B, H, L, m) tensor is ever allocated: on the CPU each fresh tensor of that size costs page faults that
    take longer than the arithmetic on it. Same formulas as feature_map: for queries phi up to a per-row factor;
    for keys phi times exp(-g), with g (B, H, C) or (B, H, 1) chosen by the caller from the log-scales r that
    key_logits returns. w=None (relu only) is the authors' deterministic map relu(x) + eps, m = d features.
    Backward methods take G = d loss / d phi and overwrite it.
    """

    def __init__(self, w: torch.Tensor | None, kernel: Kernel, d: int):
        self.softmax = kernel == "softmax"
        if w is None and self.softmax:
            raise ValueError("softmax features need a projection")
        self.m = d if w is None else w.shape[0]
        # softmax: W x' with x' = x d^-1/4; relu: m^-1/2 relu(W x) = relu(m^-1/2 W x). Either way x @ (s W)^T.
        self.scale = d**-0.25 if self.softmax else self.m**-0.5
        self.w = None if w is None else w * self.scale  # (m, d)
        self.wt = None if w is None else self.w.T  # (d, m)
        self.log_sqrt_m = 0.5 * math.log(self.m)

    def _logits(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.w is None:  # deterministic relu: the coordinates themselves
            return out.copy_(x)
        return torch.matmul(x, self.wt, out=out)  # (B, H, C, m)

    def _project_back(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.w is None else grad @ self.w  # (B, H, C, d)

    def queries_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, H, C, m) <- features of x (B, H, C, d): exp(W x' - max) or m^-1/2 relu(W x) + eps."""
        self._logits(x, out)
        if self.softmax:
            return out.sub_(out.amax(-1, keepdim=True)).exp_()
        return out.relu_().add_(RELU_EPS)

    def key_logits(self, x: torch.Tensor, out: torch.Tensor, real: torch.Tensor | None):
        """out <- W x'; returns (r, half_sq_norm) (B, H, C): the log-scale r = max_i (W x')_i - |x'|^2/2
        (padded keys: a very negative value that never raises a maximum), or (None, None) for relu."""
        self._logits(x, out)
        if not self.softmax:
            return None, None
        half_sq_norm = self._half_sq_norm(x)
        r = out.amax(-1) - half_sq_norm
        if real is not None:
            r.masked_fill_(~real, torch.finfo(r.dtype).min / 4)
        return r, half_sq_norm

    def _half_sq_norm(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.scale**2) * (x * x).sum(-1)  # |x'|^2 / 2 (B, H, C)

    def keys_at_(self, x: torch.Tensor, out: torch.Tensor, g, real: torch.Tensor | None) -> torch.Tensor:
        """out <- phi(k) exp(-g) for a g already known (backward's recomputation): no log-scales needed."""
        self._logits(x, out)
        return self.keys_(out, self._half_sq_norm(x) if self.softmax else None, g, real)

    def keys_(self, logits: torch.Tensor, half_sq_norm, g, real: torch.Tensor | None) -> torch.Tensor:
        """logits (from key_logits) <- phi(k) exp(-g), in place; padded keys get 0."""
        if self.softmax:
            offset = half_sq_norm + g + self.log_sqrt_m
            if real is not None:
                offset.masked_fill_(~real, float("inf"))  # exp(-inf) = 0
            return logits.sub_(offset[..., None]).exp_()
        logits.relu_().add_(RELU_EPS)
        return logits if real is None else logits.mul_(real[..., None])

    def queries_backward_(self, grad: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """d loss / d x (B, H, C, d) from grad = d loss / d phi (overwritten) and the query features phi."""
        if self.softmax:  # the subtracted row maximum cancels in D^-1: no gradient through it
            return grad.mul_(phi) @ self.w
        return self._project_back(grad.mul_(phi > RELU_EPS))  # active where W x > 0

    def keys_backward_(self, grad: torch.Tensor, phi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """As queries_backward_ for keys, whose exponent also holds -|x'|^2/2 (g is detached: it cancels)."""
        if not self.softmax:
            return self.queries_backward_(grad, phi)  # padded keys: phi = 0, so no gradient
        grad.mul_(phi)
        return grad @ self.w - (self.scale**2 * grad.sum(-1, keepdim=True)) * x
