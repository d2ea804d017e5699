"""FAVOR+ attention: favor_attention (with an initial and a final state when causal), attention_matrix.

Both directions compute D^-1 phi(Q) (phi(K)^T [V, 1]): the denominator D is the last column of the same products.
Softmax and ReLU features run in two hand-written autograd Functions (bidirectional.py, causal.py) that work on
blocks of rows and never materialise a (B, H, L, m) feature tensor: on the CPU each fresh tensor of that size
costs page faults that take longer than the arithmetic on it. Features are computed into reused (B, H, C, m)
buffers, backward recomputes them block by block, and the output is written in the (B, L, H, d_v) layout of the
merged heads, so that the output projection's saved input is this same tensor. The trig kernel (an ablation)
runs in plain autograd over the whole sequence (causal: an O(L^2) masked matrix), like attention_matrix.

Precision: float32 (float64 when given float64), also under autocast. Under bf16 autocast the big products
(features x projection, phi(K)^T [V, 1], phi(Q) x state, the intra-chunk products) take bf16 operands, and what
only feeds them or comes out of them (q, k, v, the output and D, the gradients) is bf16; the exponents, maxima and
the carried sums (kv, chunk states) stay in float32. Elementwise operators mix the two only where measured no
slower (a bf16 product added in place into a float32 sum): on the CPU most that do run several times slower than
a conversion and the same operator in one dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .bidirectional import BidirectionalFavor
from .blocking import DEFAULT_CHUNK, Blocking, blocking_for
from .causal import CausalFavor, causal_step
from .features import PAD_LOG_SCALE, Kernel, causal_mask, check_feature_args, no_autocast, whole_features


class DecodeState(NamedTuple):
    """Causal FAVOR state after a prefix: kv = sum_j phi(k_j) exp(-g) [v_j, 1]^T (B, H, F, d_v + 1) and g (B, H),
    the running maximum of the key log-scales. Constant size whatever the prefix length."""

    kv: torch.Tensor
    g: torch.Tensor


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor | None,
    *,
    kernel: Kernel = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    blocking: Blocking | None = None,
    initial_state: DecodeState | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DecodeState]:
    """FAVOR+ attention (B, H, L, d_v) for q, k (B, H, L, d), v (B, H, L, d_v); key_padding_mask (B, L), True = real.

    kernel "softmax": positive random features for softmax(q k^T / sqrt(d)); "relu": the generalized ReLU kernel
    (projection=None: the deterministic relu(x) + 1e-3); "trig": the sin/cos estimator (an ablation). The output
    has v's dtype; for softmax and relu it is a view of a (B, L, H, d_v) tensor that autograd saves (clone it
    before modifying it in place). blocking: None = blocking_for(q, m).

    Causal attention carries a constant-size state, as flash-linear-attention's kernels do: `initial_state` is the
    state after a prefix (the positions given then continue it), and output_final_state=True returns
    (output, state after the last position), which a next call continues: decoding is a prompt's call, then one
    call per token, each O(1) in the prefix length. A single position without gradients runs the recurrence itself
    (causal_step) instead of the chunked Function. Neither goes with a key_padding_mask.
    """
    stateful = initial_state is not None or output_final_state
    if stateful and not causal:
        raise ValueError("initial_state / output_final_state need causal=True")
    if stateful and key_padding_mask is not None:
        raise ValueError("initial_state / output_final_state work on unpadded sequences: no key_padding_mask")
    low = _product_dtype(q)
    state = None
    with no_autocast(q.device):
        q, k, v_work, w = _work(q, k, v, projection, low if kernel != "trig" else None)
        check_feature_args(q.shape[-1], w, kernel)
        real = None if key_padding_mask is None else key_padding_mask[:, None, :].to(torch.bool)  # (B, 1, L)
        if kernel == "trig":
            out, state = _whole_sequence(q, k, v_work, w, kernel, causal, real, initial_state,
                                         final_state=output_final_state)
        elif causal:
            kv0, g0 = (None, None) if initial_state is None else initial_state
            tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v_work, w, kv0))
            if stateful and q.shape[2] == 1 and not tracked:  # a sampling step: the recurrence itself, no autograd
                out, kv, g = causal_step(q, k, v_work, w, kernel, kv0, g0, low)
            else:
                plan = blocking or blocking_for(q, q.shape[-1] if w is None else w.shape[0])
                out, kv, g = CausalFavor.apply(q, k, v_work, w, kernel, real, kv0, g0, chunk_size, plan.span,
                                               plan.scan, low)
            state = DecodeState(kv, g) if output_final_state else None
        else:
            plan = blocking or blocking_for(q, q.shape[-1] if w is None else w.shape[0])
            out = BidirectionalFavor.apply(q, k, v_work, w, kernel, real, plan.block, low)
    return (out.to(v.dtype), state) if output_final_state else out.to(v.dtype)


def attention_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    projection: torch.Tensor | None = None,
    *,
    kernel: Kernel | str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The row-normalised (B, H, L, L) attention matrix each attention kind applies: softmax(q k^T / sqrt(d)) for
    kernel="exact", else D^-1 phi(Q) phi(K)^T with favor_attention's features and stabiliser (so that
    attention_matrix(...) @ v is its output). O(L^2) memory: for the analysis of single proteins."""
    with no_autocast(q.device):
        q, k, _, w = _work(q, k, None, projection)
        real = None if key_padding_mask is None else key_padding_mask[:, None, :].to(torch.bool)
        if kernel == "exact":
            allowed = _allowed(q.shape[2], q.device, causal, real)
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        check_feature_args(q.shape[-1], w, kernel)
        a = _scores(q, k, w, kernel, causal, real)[0]
        return a / _safe_denominator(a.sum(-1, keepdim=True), kernel)


def _whole_sequence(q, k, v, w, kernel, causal, real, state=None, final_state=False):
    """The plain-autograd path (trig): out (B, H, L, d_v) and, with final_state, the state after the last row.
    Bidirectional: phi(Q) (phi(K)^T [V, 1]); causal: the (B, H, L, L) matrix of _scores times [V, 1]."""
    v1 = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)  # (B, H, L, d_v + 1): D is the last column
    if causal:
        a, g, f_q, f_k, r = _scores(q, k, w, kernel, causal, real, state)
        y = a @ v1
    else:
        f_q, _ = whole_features(q, w, kernel)
        f_k, r = whole_features(k, w, kernel)
        g = _key_reference(r, real, causal, state)
        phi_k = f_k * _masked(r - g, real).exp()[..., None]  # (B, H, L, F), padded keys 0
        y = f_q @ (phi_k.transpose(-1, -2) @ v1)
    if state is not None:  # the prefix, moved from its maximum to each row's (<= 1)
        y = y + (f_q @ state.kv) * torch.exp(state.g[..., None] - g)[..., None]
    out = y[..., :-1] / _safe_denominator(y[..., -1:], kernel)
    if not final_state:
        return out, None
    g_end = g[..., -1]  # (B, H)
    kv = (f_k * torch.exp(r - g_end[..., None])[..., None]).transpose(-1, -2) @ v1  # (B, H, F, d_v + 1)
    if state is not None:
        kv = kv + state.kv * torch.exp(state.g - g_end)[..., None, None]
    return out, DecodeState(kv, g_end)


def _scores(q, k, w, kernel, causal, real, state=None):
    """a (B, H, L, L) = f(q_i) . f(k_j) exp(r_j - g_i) where row i may see key j (else 0); and g, f(q), f(k), r."""
    f_q, _ = whole_features(q, w, kernel)  # query log-scales cancel in D^-1
    f_k, r = whole_features(k, w, kernel)  # (B, H, L, F), (B, H, L)
    g = _key_reference(r, real, causal, state)
    allowed = _allowed(q.shape[2], q.device, causal, real)  # (B or 1, 1, L, L)
    decay = (r[..., None, :] - g[..., :, None]).masked_fill(~allowed, float("-inf")).exp()  # <= 1
    return (f_q @ f_k.transpose(-1, -2)) * decay, g, f_q, f_k, r


def _key_reference(r, real, causal, state):
    """g (B, H, L): the largest log-scale r of the real keys each row sees (running when causal), joined with the
    state's; detached, as it cancels in D^-1."""
    r = _masked(r.detach(), real, PAD_LOG_SCALE)
    g = torch.cummax(r, -1).values if causal else r.amax(-1, keepdim=True).expand_as(r)
    return g if state is None else torch.maximum(g, state.g[..., None])


def _masked(x, real, value=float("-inf")):
    return x if real is None else x.masked_fill(~real, value)


def _allowed(length, device, causal, real):
    """Which keys each row may see (B or 1, 1, L, L)."""
    if causal:
        allowed = causal_mask(length, device=device)[None, None]
    else:
        allowed = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    return allowed if real is None else allowed & real[:, :, None, :]


def _safe_denominator(den, kernel):
    # Positive features give D > 0 unless no key is real: clamping to the smallest normal number then gives 0
    # instead of 0 / 0. Trig features are signed, so their denominator is left as it is.
    return den if kernel == "trig" else den.clamp_min(torch.finfo(den.dtype).tiny)


def _work(q, k, v, projection, low=None):
    """q, k, v (or None) and the projection in float32 (float64 if q is); with bf16 products (low), q, k, v in
    bf16 instead: they only feed products and the Functions slice them into operands. A conversion writes them
    contiguous; q, k, v already in bf16 (the model's views of its projection) pass as they are, since torch's `to`
    does not copy a permuted view for a memory format, and the Functions copy each block of rows anyway."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if low is None:
        convert = lambda x: x.to(work)
    else:
        convert = lambda x: x.to(dtype=low, memory_format=torch.contiguous_format)
    v = None if v is None else convert(v)
    return convert(q), convert(k), v, None if projection is None else projection.to(work)


def _product_dtype(q):
    """torch.bfloat16 under bf16 autocast (float32 inputs and bf16 ones), else None: the dtype of the big products."""
    device = q.device.type
    if q.dtype == torch.float64 or not torch.amp.is_autocast_available(device):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    return torch.bfloat16 if torch.get_autocast_dtype(device) == torch.bfloat16 else None
