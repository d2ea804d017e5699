"""FAVOR+ attention: bidirectional, and causal in O(L) memory by chunks.

Shapes: q, k (B, H, L, d); v (B, H, L, d_v); features f (B, H, L, F); key_padding_mask (B, L), True = real.
Both directions compute D^-1 phi(Q) (phi(K)^T V) with the denominator D carried as an extra column of
ones appended to V, so numerator and denominator come out of the same matrix products.

Key stabiliser: phi(k_j) = f_j exp(r_j - g) with g the maximum of r over real keys (bidirectional) or the
running maximum g_i = max_{j<=i} r_j (causal). A running maximum never lets the future move the past;
it makes causal FAVOR a linear recurrence with scalar decay exp(g_j - g_i) <= 1 (the form of gated
linear attention), computed here in chunks of C positions: inside a chunk an explicit masked C x C
product, across chunks a carried (F, d_v) state that is rescaled when the maximum grows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .features import BlockFeatures, Kernel, feature_map

DEFAULT_CHUNK = 128  # causal chunk: measured fastest of 64 / 128 / 256 at L = 4096 and 8192 on a 2-core CPU
BLOCK = 512  # rows per block in the bidirectional Function


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
) -> torch.Tensor:
    """FAVOR+ attention output (B, H, L, d_v) for q, k (B, H, L, d) and v (B, H, L, d_v).

    kernel "softmax" approximates softmax(q k^T / sqrt(d)) v with positive random features; "relu" is the
    generalized ReLU kernel (projection=None: the deterministic relu(x) + 1e-3 map); "trig" is the
    sin/cos estimator of the original Performer ablation. Features and sums run in float32 (or float64
    when given float64), also under autocast; the output has v's dtype.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        if kernel == "softmax" or (kernel == "relu" and projection is not None):
            # features block by block inside hand-written Functions: no (B, H, L, m) tensor
            q, k, v1, projection = _work_inputs(q, k, v, projection)
            feature_map(q[:, :1, :1], projection, kernel)  # argument checks only
            real = None if key_padding_mask is None else key_padding_mask[:, None, :].to(torch.bool)  # (B, 1, L)
            if causal:
                y = _CausalFavor.apply(q, k, v1, projection, kernel, real, chunk_size)
            else:
                y = _BidirectionalFavor.apply(q, k, v1, projection, kernel, real, BLOCK)
        else:
            f_q, phi_k, g, v1 = _features(q, k, v, projection, kernel, "running" if causal else "shared",
                                          key_padding_mask)
            if causal:
                y = _CausalLinearAttention.apply(f_q, phi_k, v1, g, chunk_size)
            else:
                y = f_q @ (phi_k.transpose(-1, -2) @ v1)  # (B, H, L, F) @ (B, H, F, d_v + 1)
        out = y[..., :-1] / _safe_denominator(y[..., -1:], kernel)
    return out.to(v.dtype)


def _features(q, k, v, projection, kernel, key_stabiliser, key_padding_mask=None):
    """phi(Q), phi(K) (scaled by exp(-g)) and g in float32 (float64 if given), and [V, 1] (B, H, L, d_v + 1)
    whose last column carries the denominator through the same products as the numerator."""
    q, k, v1, projection = _work_inputs(q, k, v, projection)
    f_q, _ = feature_map(q, projection, kernel)
    phi_k, g = feature_map(k, projection, kernel, key_stabiliser=key_stabiliser, key_padding_mask=key_padding_mask)
    return f_q, phi_k, g, v1


def _work_inputs(q, k, v, projection):
    """q, k, projection in float32 (float64 if given), and [V, 1] (B, H, L, d_v + 1) or None."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(work), k.to(work)
    if projection is not None:
        projection = projection.to(work)
    v1 = None if v is None else torch.cat([v.to(work), v.new_ones(v.shape[:-1] + (1,), dtype=work)], -1)
    return q, k, v1, projection


class DecodeState(NamedTuple):
    """Causal FAVOR state after a prefix: S = sum_j phi(k_j) exp(g_j - g) [v_j, 1]^T (B, H, F, d_v + 1), and g
    (B, H), the running maximum of the key log-scales. Constant size whatever the prefix length."""

    kv: torch.Tensor
    g: torch.Tensor


def favor_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor | None,
    state: DecodeState | None,
    *,
    kernel: Kernel = "softmax",
) -> tuple[torch.Tensor, DecodeState]:
    """Causal FAVOR for new positions given the state of the prefix: O(1) time and memory per token.

    q, k, v (B, H, T, d) are the next T positions (T = 1 when sampling; a whole prompt to prefill). Returns
    their outputs (B, H, T, d_v), equal to favor_attention(..., causal=True) over prefix + new positions,
    and the state after them.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        f_q, phi_k, g, v1 = _features(q, k, v, projection, kernel, "running")  # g over the new keys only
        if state is not None:  # the prefix's maximum joins the running maximum of the new keys
            g_all = torch.maximum(g, state.g[..., None])
            phi_k = phi_k * torch.exp(g - g_all)[..., None]
            g = g_all
        if k.shape[2] == 1:
            y = f_q @ (phi_k.transpose(-1, -2) @ v1)
        else:
            y = _CausalLinearAttention.apply(f_q, phi_k, v1, g, DEFAULT_CHUNK)
        g_end = g[..., -1]
        kv = (phi_k * torch.exp(g - g_end[..., None])[..., None]).transpose(-1, -2) @ v1  # (B, H, F, d_v + 1)
        if state is not None:  # the prefix's state, rescaled from its maximum to each new position's (<= 1)
            y = y + (f_q @ state.kv) * torch.exp(state.g[..., None] - g)[..., None]
            kv = kv + state.kv * torch.exp(state.g - g_end)[..., None, None]
        out = y[..., :-1] / _safe_denominator(y[..., -1:], kernel)
    return out.to(v.dtype), DecodeState(kv, g_end)


def attention_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    projection: torch.Tensor | None = None,
    *,
    kernel: Kernel | str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit row-normalised (B, H, L, L) attention matrix that each attention kind applies.

    kernel="exact" gives softmax(q k^T / sqrt(d)); the FAVOR kernels give D^-1 phi(Q) phi(K)^T with the
    same features and stabiliser as favor_attention, so attention_matrix(...) @ v equals its output.
    O(L^2) memory: for analysis of single proteins, not for training.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        allowed = _allowed(q.shape[-2], q.device, causal, key_padding_mask)  # (B or 1, 1, L, L) bool
        if kernel == "exact":
            work = torch.float64 if q.dtype == torch.float64 else torch.float32
            scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * q.shape[-1] ** -0.5
            return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        f_q, phi_k, g, _ = _features(q, k, None, projection, kernel, "running" if causal else "shared",
                                     key_padding_mask)
        a = f_q @ phi_k.transpose(-1, -2)  # (B, H, L, L)
        if causal:  # phi_k_j was scaled by exp(-g_j); row i needs exp(-g_i): decay exp(g_j - g_i) <= 1
            a = a * torch.exp((g[..., None, :] - g[..., :, None]).masked_fill(~allowed, float("-inf")))
        a = a.masked_fill(~allowed, 0.0)
        return a / _safe_denominator(a.sum(-1, keepdim=True), kernel)


def _safe_denominator(den: torch.Tensor, kernel: str) -> torch.Tensor:
    # Positive kernels give den > 0 unless every feature underflowed (or no key is real): clamping to the
    # smallest normal number then yields 0 instead of NaN, and leaves every other value untouched.
    # Trig features are signed, so its denominator is left as it is.
    return den if kernel == "trig" else den.clamp_min(torch.finfo(den.dtype).tiny)


def _allowed(length, device, causal, key_padding_mask):
    allowed = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    return allowed


def _chunked(x: torch.Tensor, chunk: int, pad_value_last: bool = False) -> torch.Tensor:
    """(B, H, L, ...) -> (B, H, N, C, ...), padding L up to N * C (with zeros, or the last value)."""
    length = x.shape[2]
    pad = -length % chunk
    if pad:
        fill = x[:, :, -1:].expand(*x.shape[:2], pad, *x.shape[3:]) if pad_value_last else x.new_zeros(
            *x.shape[:2], pad, *x.shape[3:])
        x = torch.cat([x, fill], 2)
    return x.view(*x.shape[:2], -1, chunk, *x.shape[3:])


class _CausalLinearAttention(torch.autograd.Function):
    """y_i = sum_{j<=i} (q_i . k_j) exp(g_j - g_i) v_j for non-decreasing g, in chunks of C.

    Saves only its inputs: backward recomputes the per-chunk states (forward scan for dq, reverse scan
    for dk, dv) instead of storing N x F x d_v states, so memory stays O(L (F + d_v + C)).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, chunk):
        ctx.save_for_backward(q, k, v, g)
        ctx.chunk = chunk
        length = q.shape[2]
        qc, kc, vc, gc, g_prev, g_end, decay = _chunk_inputs(q, k, v, g, chunk)
        scores = (qc @ kc.transpose(-1, -2)) * decay  # (B, H, N, C, C)
        y = scores @ vc  # intra-chunk part
        states = _forward_states(kc, vc, gc, g_prev, g_end)  # (B, H, N, F, D): state before each chunk
        y = y + torch.exp(g_prev[..., None] - gc)[..., None] * (qc @ states)
        return y.flatten(2, 3)[:, :, :length]

    @staticmethod
    def backward(ctx, dy):
        q, k, v, g = ctx.saved_tensors
        length = q.shape[2]
        qc, kc, vc, gc, g_prev, g_end, decay = _chunk_inputs(q, k, v, g, ctx.chunk)
        dyc = _chunked(dy.contiguous(), ctx.chunk)  # (B, H, N, C, D)
        # intra-chunk
        da = (dyc @ vc.transpose(-1, -2)) * decay  # (B, H, N, C, C)
        dq = da @ kc
        dk = da.transpose(-1, -2) @ qc
        dv = ((qc @ kc.transpose(-1, -2)) * decay).transpose(-1, -2) @ dyc
        # queries read the state carried from earlier chunks
        states = _forward_states(kc, vc, gc, g_prev, g_end)
        dq = dq + (dyc * torch.exp(g_prev[..., None] - gc)[..., None]) @ states.transpose(-1, -2)
        # keys and values feed every later chunk: reverse scan of sum_i exp(g_end[c] - g_i) q_i dy_i^T
        to_end = torch.exp(gc - g_end[..., None])[..., None]  # (B, H, N, C, 1), <= 1
        qdy = qc.transpose(-1, -2) @ (dyc * torch.exp(g_prev[..., None] - gc)[..., None])  # (B, H, N, F, D)
        after = _scan(qdy, torch.exp(g_prev - g_end), reverse=True)  # referenced at g_end[c]
        dk = dk + (vc * to_end) @ after.transpose(-1, -2)
        dv = dv + to_end * (kc @ after)
        unchunk = lambda t: t.flatten(2, 3)[:, :, :length]  # noqa: E731
        return unchunk(dq), unchunk(dk), unchunk(dv), None, None


def _chunk_inputs(q, k, v, g, chunk):
    qc, kc, vc = _chunked(q, chunk), _chunked(k, chunk), _chunked(v, chunk)
    gc = _chunked(g, chunk, pad_value_last=True)  # (B, H, N, C), non-decreasing
    g_end = gc[..., -1]  # (B, H, N): the maximum at each chunk's end
    g_prev = torch.cat([gc[:, :, :1, 0], g_end[:, :, :-1]], -1)  # reference of the incoming state
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((gc[..., None, :] - gc[..., :, None]).masked_fill(~lower, float("-inf")))
    return qc, kc, vc, gc, g_prev, g_end, decay  # decay[..., i, j] = exp(g_j - g_i) for j <= i, else 0


def _forward_states(kc, vc, gc, g_prev, g_end):
    """State sum_{j before chunk c} exp(g_j - g_prev[c]) k_j v_j^T for every chunk c: (B, H, N, F, D)."""
    local = kc.transpose(-1, -2) @ (vc * torch.exp(gc - g_end[..., None])[..., None])  # (B, H, N, F, D)
    return _scan(local, torch.exp(g_prev - g_end), reverse=False)


def _scan(local, decay, reverse):
    """states[c] = sum over chunks c' before c (after c when reverse) of local[c'], decayed chunk by chunk.

    Forward: states[c + 1] = states[c] * decay[c] + local[c]; reverse: states[c - 1] = states[c] * decay[c]
    + local[c]. One fused multiply-add per chunk, written in place.
    """
    states = torch.empty_like(local)
    n = local.shape[2]
    order = range(n - 1, 0, -1) if reverse else range(n - 1)
    step = -1 if reverse else 1
    states[:, :, order.start].zero_()
    decay = decay[..., None, None]  # (B, H, N, 1, 1)
    for c in order:
        torch.addcmul(local[:, :, c], states[:, :, c], decay[:, :, c], out=states[:, :, c + step])
    return states


class _BidirectionalFavor(torch.autograd.Function):
    """y = phi(Q) (phi(K)^T [V, 1]) (B, H, L, d_v + 1) for softmax or projected-ReLU features, by blocks of rows.

    Hand-written so that no (B, H, L, m) feature tensor exists: on the CPU every fresh tensor of that size costs
    page faults that take longer than the arithmetic on it. Forward: one pass over key blocks builds
    kv = sum_j phi(k_j) [v_j, 1]^T (B, H, m, d_v + 1) with an online shared maximum g of the key log-scales
    (kv is rescaled by exp(g_old - g_new) when a block raises it, as in flash attention), then one pass over
    query blocks gives y = phi(q) kv. Backward recomputes the block features: a query pass for dq and
    dkv = sum_i phi(q_i) dy_i^T, then a key pass for dk and dv. Two (B, H, C, m) buffers serve every block.
    Saves only q, k, [V, 1], the projection, kv and g.
    """

    @staticmethod
    def forward(ctx, q, k, v1, w, kernel, real, block):
        feats = BlockFeatures(w, kernel)
        b, h, length, _ = q.shape
        block = min(block, length)
        buf = q.new_empty(b, h, block, w.shape[0])
        kv = q.new_zeros(b, h, w.shape[0], v1.shape[-1])  # (B, H, m, d_v + 1), referenced at g
        g = None  # (B, H, 1): maximum key log-scale so far (softmax only)
        for s, e in _blocks(length, block):
            real_c = None if real is None else real[:, :, s:e]
            phi = buf[:, :, : e - s]
            r, half_sq_norm = feats.key_logits(k[:, :, s:e], phi, real_c)
            if r is not None:
                g_new = r.amax(-1, keepdim=True)
                if g is not None:
                    g_new = torch.maximum(g, g_new)
                    kv.mul_(torch.exp(g - g_new)[..., None])  # <= 1
                g = g_new
            feats.keys_(phi, half_sq_norm, g, real_c)
            kv += phi.transpose(-1, -2) @ v1[:, :, s:e]
        y = q.new_empty(v1.shape)
        for s, e in _blocks(length, block):
            y[:, :, s:e] = feats.queries_(q[:, :, s:e], buf[:, :, : e - s]) @ kv
        ctx.save_for_backward(q, k, v1, w, kv, g, real)
        ctx.kernel, ctx.block = kernel, block
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v1, w, kv, g, real = ctx.saved_tensors
        feats = BlockFeatures(w, ctx.kernel)
        b, h, length, _ = q.shape
        buf, grad = (q.new_empty(b, h, ctx.block, w.shape[0]) for _ in range(2))
        dq, dk, dv1 = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v1)
        dkv = torch.zeros_like(kv)
        for s, e in _blocks(length, ctx.block):  # queries
            phi = feats.queries_(q[:, :, s:e], buf[:, :, : e - s])
            dy_c = dy[:, :, s:e]
            dkv += phi.transpose(-1, -2) @ dy_c
            d_phi = torch.matmul(dy_c, kv.transpose(-1, -2), out=grad[:, :, : e - s])
            dq[:, :, s:e] = feats.queries_backward_(d_phi, phi)
        for s, e in _blocks(length, ctx.block):  # keys
            real_c = None if real is None else real[:, :, s:e]
            phi = buf[:, :, : e - s]
            _, half_sq_norm = feats.key_logits(k[:, :, s:e], phi, real_c)
            feats.keys_(phi, half_sq_norm, g, real_c)
            v1_c = v1[:, :, s:e]
            dv1[:, :, s:e] = phi @ dkv
            d_phi = torch.matmul(v1_c, dkv.transpose(-1, -2), out=grad[:, :, : e - s])
            dk[:, :, s:e] = feats.keys_backward_(d_phi, phi, k[:, :, s:e])
        return dq, dk, dv1, None, None, None, None


def _blocks(length, block):
    return ((s, min(s + block, length)) for s in range(0, length, block))


class _CausalFavor(torch.autograd.Function):
    """Causal y_i = phi(q_i) sum_{j<=i} phi(k_j) exp(g_j - g_i) [v_j, 1]^T for softmax or projected-ReLU features,
    with g the running maximum of the key log-scales, in chunks of C positions.

    The algorithm of _CausalLinearAttention (intra-chunk masked C x C products, a carried (m, d_v + 1) state
    rescaled when the maximum grows), but with the features computed chunk by chunk inside the loop, into
    reused (B, H, C, m) buffers, instead of materialising phi(Q) and phi(K) for the whole sequence: on the CPU
    each fresh tensor of that size costs page faults that take longer than the arithmetic. The running
    maximum is found chunk by chunk too (cummax within the chunk, then the maximum with the previous chunk's
    end), so nothing from after position i ever reaches output i. Saves q, k, [V, 1], the projection, g (B, H, L)
    and the state before each chunk (B, H, N, m, d_v + 1); backward is one reverse pass that recomputes the
    chunk features and carries sum_{i later} exp(g_end - g_i) phi(q_i) dy_i^T for the keys' gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v1, w, kernel, real, chunk):
        feats = BlockFeatures(w, kernel)
        b, h, length, _ = q.shape
        chunk = min(chunk, length)
        m, width = w.shape[0], v1.shape[-1]
        f_q, phi_k = (q.new_empty(b, h, chunk, m) for _ in range(2))
        states = q.new_empty(b, h, -(-length // chunk), m, width)  # state before each chunk, at g_prev
        state = q.new_zeros(b, h, m, width)
        g = q.new_zeros(b, h, length)  # stays 0 for relu
        y = q.new_empty(v1.shape)
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
        g_end = None  # (B, H): the running maximum at the end of the previous chunk
        for c, (s, e) in enumerate(_blocks(length, chunk)):
            n, real_c, v1_c = e - s, None if real is None else real[:, :, s:e], v1[:, :, s:e]
            fq, pk = feats.queries_(q[:, :, s:e], f_q[:, :, :n]), phi_k[:, :, :n]
            r, half_sq_norm = feats.key_logits(k[:, :, s:e], pk, real_c)
            if r is not None:
                g_c = torch.cummax(r, -1).values
                if g_end is not None:
                    g_c = torch.maximum(g_c, g_end[..., None])
                g[:, :, s:e] = g_c
            g_c = g[:, :, s:e]  # (B, H, n), non-decreasing
            feats.keys_(pk, half_sq_norm, g_c, real_c)  # phi(k_j) exp(-g_j)
            g_prev = g_c[..., 0] if g_end is None else g_end
            decay = _decay(g_c, upper[:n, :n])
            y_c = ((fq @ pk.transpose(-1, -2)).mul_(decay)) @ v1_c  # intra-chunk
            if c:
                y_c += torch.exp(g_prev[..., None] - g_c)[..., None] * (fq @ state)
            y[:, :, s:e] = y_c
            states[:, :, c] = state
            g_end = g_c[..., -1]
            state.mul_(torch.exp(g_prev - g_end)[..., None, None])
            state += pk.transpose(-1, -2) @ (v1_c * torch.exp(g_c - g_end[..., None])[..., None])
        ctx.save_for_backward(q, k, v1, w, g, states, real)
        ctx.kernel, ctx.chunk = kernel, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v1, w, g, states, real = ctx.saved_tensors
        feats = BlockFeatures(w, ctx.kernel)
        b, h, length, _ = q.shape
        chunk, m = ctx.chunk, w.shape[0]
        f_q, phi_k, d_fq, d_pk = (q.new_empty(b, h, chunk, m) for _ in range(4))
        dq, dk, dv1 = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v1)
        after = torch.zeros_like(states[:, :, 0])  # sum over later chunks of exp(g_end - g_i) phi(q_i) dy_i^T
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
        for c, (s, e) in reversed(list(enumerate(_blocks(length, chunk)))):
            n, real_c, v1_c, dy_c = e - s, None if real is None else real[:, :, s:e], v1[:, :, s:e], dy[:, :, s:e]
            fq, pk = feats.queries_(q[:, :, s:e], f_q[:, :, :n]), phi_k[:, :, :n]
            _, half_sq_norm = feats.key_logits(k[:, :, s:e], pk, real_c)
            g_c = g[:, :, s:e]
            feats.keys_(pk, half_sq_norm, g_c, real_c)
            g_prev, g_end = (g_c[..., 0] if c == 0 else g[:, :, s - 1]), g_c[..., -1]
            decay = _decay(g_c, upper[:n, :n])
            from_prev = torch.exp(g_prev[..., None] - g_c)[..., None]  # (B, H, n, 1), <= 1
            to_end = torch.exp(g_c - g_end[..., None])[..., None]  # (B, H, n, 1), <= 1
            dy_prev = dy_c * from_prev
            # intra-chunk
            da = (dy_c @ v1_c.transpose(-1, -2)).mul_(decay)  # (B, H, n, n)
            dfq = torch.matmul(da, pk, out=d_fq[:, :, :n])
            dpk = torch.matmul(da.transpose(-1, -2), fq, out=d_pk[:, :, :n])
            dv1_c = ((fq @ pk.transpose(-1, -2)).mul_(decay)).transpose(-1, -2) @ dy_c
            # queries read the state carried from earlier chunks; keys and values feed every later chunk
            if c:
                dfq += dy_prev @ states[:, :, c].transpose(-1, -2)
            dpk += (v1_c * to_end) @ after.transpose(-1, -2)
            dv1_c += to_end * (pk @ after)
            dv1[:, :, s:e] = dv1_c
            after.mul_(torch.exp(g_prev - g_end)[..., None, None])
            after += fq.transpose(-1, -2) @ dy_prev
            dq[:, :, s:e] = feats.queries_backward_(dfq, fq)
            dk[:, :, s:e] = feats.keys_backward_(dpk, pk, k[:, :, s:e])
        return dq, dk, dv1, None, None, None, None


def _decay(g_c, upper):
    """exp(g_j - g_i) for j <= i, else 0 (B, H, n, n): the decay between positions of one chunk, <= 1."""
    return (g_c[..., None, :] - g_c[..., :, None]).masked_fill_(upper, float("-inf")).exp_()
