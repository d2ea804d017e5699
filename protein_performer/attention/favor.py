"""FAVOR+ attention: bidirectional, and causal in O(L) memory by chunks.

Shapes: q, k (B, H, L, d); v (B, H, L, d_v); features f (B, H, L, F); key_padding_mask (B, L), True = real.
Both directions compute D^-1 phi(Q) (phi(K)^T V) with the denominator D carried as an extra column of
ones appended to V, so numerator and denominator come out of the same matrix products.

Key stabiliser: phi(k_j) = f_j exp(r_j - g) with g the maximum of r over real keys (bidirectional) or the
running maximum g_i = max_{j<=i} r_j (causal). A running maximum never lets the future move the past;
it makes causal FAVOR a linear recurrence with scalar decay exp(g_j - g_i) <= 1 (the form of gated
linear attention), computed here in chunks of C positions: inside a chunk an explicit masked C x C
product, across chunks a carried (F, d_v + 1) state that is rescaled when the maximum grows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .features import BlockFeatures, Kernel, check_feature_args, feature_map, without_autocast

# Causal chunk C and span: of C = 32 / 64 / 128 with spans of 512 rows, C = 64 was fastest on a 2-core CPU (median
# ratio of causal to bidirectional time at L = 4096 / 8192 / 16,384: 1.74 / 1.57 / 1.61, against 2.02 / 1.67 / 1.82
# at C = 128).
DEFAULT_CHUNK = 64
SPAN = 512  # rows per pass of the causal Function: SPAN / C chunks batched in each product
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
    when given float64), also under autocast; the output has v's dtype. For softmax and relu the output is a
    (B, H, L, d_v) view of a (B, L, H, d_v) tensor, so out.transpose(1, 2).flatten(2) costs no copy; autograd
    saves it, so clone it before modifying it in place.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        if kernel != "trig":
            # features block by block inside hand-written Functions: no (B, H, L, m) tensor
            q, k, v_work, projection = _work_inputs(q, k, v, projection)
            check_feature_args(q.shape[-1], projection, kernel)
            real = None if key_padding_mask is None else key_padding_mask[:, None, :].to(torch.bool)  # (B, 1, L)
            if causal:
                out = _CausalFavor.apply(q, k, v_work, projection, kernel, real, chunk_size)
            else:
                out = _BidirectionalFavor.apply(q, k, v_work, projection, kernel, real, BLOCK)
            return out.to(v.dtype)
        # trig (the ablation's estimator): whole-sequence features
        f_q, phi_k, g, v1 = _features(q, k, v, projection, kernel, "running" if causal else "shared",
                                      key_padding_mask)
        if causal:
            y = _CausalLinearAttention.apply(f_q, phi_k, v1, g, chunk_size)
        else:
            y = f_q @ (phi_k.transpose(-1, -2) @ v1)  # (B, H, L, F) @ (B, H, F, d_v + 1)
        out = y[..., :-1] / _safe_denominator(y[..., -1:], kernel)
    return out.to(v.dtype)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[V, 1] (..., d_v + 1): the last column carries the denominator D through the numerator's products."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)


def _normalise_(y: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> None:
    """out <- numerator / D and den <- D (clamped as in _safe_denominator) for rows y = [numerator, D]."""
    torch.clamp_min(y[..., -1:], torch.finfo(y.dtype).tiny, out=den)
    torch.div(y[..., :-1], den, out=out)


def _grad_y(d_out: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """d loss / d [numerator, D] (..., d_v + 1) from d loss / d out, for out = numerator / D."""
    # rows without a real key (D clamped to the smallest normal number, out = 0) get no gradient, not inf * 0
    d_num = (d_out / den).masked_fill_(den <= torch.finfo(den.dtype).tiny, 0.0)
    return torch.cat([d_num, -(d_num * out).sum(-1, keepdim=True)], -1)


def _new_output(q: torch.Tensor, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, H, L, d_v) output, stored as (B, L, H, d_v) so that the caller's merge of heads,
    out.transpose(1, 2).flatten(2), is a view; and the (B, H, L, 1) denominators."""
    b, h, length, _ = q.shape
    return q.new_empty(b, length, h, d_v).transpose(1, 2), q.new_empty(b, h, length, 1)


def _features(q, k, v, projection, kernel, key_stabiliser, key_padding_mask=None):
    """phi(Q), phi(K) (scaled by exp(-g)) and g in float32 (float64 if given), and [V, 1] (B, H, L, d_v + 1)
    whose last column carries the denominator through the same products as the numerator."""
    q, k, v, projection = _work_inputs(q, k, v, projection)
    v1 = None if v is None else _with_ones(v)
    f_q, _ = feature_map(q, projection, kernel)
    phi_k, g = feature_map(k, projection, kernel, key_stabiliser=key_stabiliser, key_padding_mask=key_padding_mask)
    return f_q, phi_k, g, v1


def _work_inputs(q, k, v, projection):
    """q, k, v (or None), projection in float32 (float64 if given)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(work), k.to(work)
    if projection is not None:
        projection = projection.to(work)
    return q, k, None if v is None else v.to(work), projection


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


def _chunked(x: torch.Tensor, chunk: int, repeat_last: bool = False) -> torch.Tensor:
    """(B, H, L, ...) -> (B, H, N, C, ...), padding L up to N * C (with zeros, or the last value)."""
    length = x.shape[2]
    return _span_rows(x, 0, length, -length % chunk, repeat_last).unflatten(2, (-1, chunk))


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
    @without_autocast
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
        dy_prev = dyc * torch.exp(g_prev[..., None] - gc)[..., None]  # (B, H, N, C, D), scale <= 1
        dq = dq + dy_prev @ states.transpose(-1, -2)
        # keys and values feed every later chunk: reverse scan of sum_i exp(g_end[c] - g_i) q_i dy_i^T
        to_end = torch.exp(gc - g_end[..., None])[..., None]  # (B, H, N, C, 1), <= 1
        qdy = qc.transpose(-1, -2) @ dy_prev  # (B, H, N, F, D)
        after = _scan(qdy, torch.exp(g_prev - g_end), reverse=True)  # referenced at g_end[c]
        dk = dk + (vc * to_end) @ after.transpose(-1, -2)
        dv = dv + to_end * (kc @ after)
        unchunk = lambda t: t.flatten(2, 3)[:, :, :length]  # noqa: E731
        return unchunk(dq), unchunk(dk), unchunk(dv), None, None


def _chunk_inputs(q, k, v, g, chunk):
    qc, kc, vc = _chunked(q, chunk), _chunked(k, chunk), _chunked(v, chunk)
    gc = _chunked(g, chunk, repeat_last=True)  # (B, H, N, C), non-decreasing
    g_prev, g_end = _chunk_references(gc, None)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    return qc, kc, vc, gc, g_prev, g_end, _decay(gc, upper)


def _forward_states(kc, vc, gc, g_prev, g_end):
    """State sum_{j before chunk c} exp(g_j - g_prev[c]) k_j v_j^T for every chunk c: (B, H, N, F, D)."""
    local = kc.transpose(-1, -2) @ (vc * torch.exp(gc - g_end[..., None])[..., None])  # (B, H, N, F, D)
    return _scan(local, torch.exp(g_prev - g_end), reverse=False)


def _scan(local, decay, reverse, initial=None):
    """states[c] = sum over chunks c' before c (after c when reverse) of local[c'], decayed chunk by chunk, plus
    `initial` (B, H, F, D) decayed likewise: the state entering the first (last when reverse) chunk.

    Forward: states[c + 1] = states[c] * decay[c] + local[c]; reverse: states[c - 1] = states[c] * decay[c]
    + local[c]. One fused multiply-add per chunk, written in place.
    """
    states = torch.empty_like(local)
    n = local.shape[2]
    order = range(n - 1, 0, -1) if reverse else range(n - 1)
    step = -1 if reverse else 1
    first = n - 1 if reverse else 0
    if initial is None:
        states[:, :, first].zero_()
    else:
        states[:, :, first] = initial
    decay = decay[..., None, None]  # (B, H, N, 1, 1)
    for c in order:
        torch.addcmul(local[:, :, c], states[:, :, c], decay[:, :, c], out=states[:, :, c + step])
    return states


def _scan_out(states, local, decay, reverse):
    """The state leaving the last (first when reverse) chunk of a _scan: (B, H, F, D)."""
    c = 0 if reverse else local.shape[2] - 1
    return torch.addcmul(local[:, :, c], states[:, :, c], decay[:, :, c, None, None])


class _BidirectionalFavor(torch.autograd.Function):
    """D^-1 phi(Q) (phi(K)^T V) (B, H, L, d_v) for softmax or projected-ReLU features, by blocks of rows.

    Hand-written so that no (B, H, L, m) feature tensor exists: on the CPU every fresh tensor of that size costs
    page faults that take longer than the arithmetic on it. Forward: one pass over key blocks builds
    kv = sum_j phi(k_j) [v_j, 1]^T (B, H, m, d_v + 1) with an online shared maximum g of the key log-scales
    (kv is rescaled by exp(g_old - g_new) when a block raises it, as in flash attention), then one pass over
    query blocks gives y = phi(q) kv. Backward recomputes the block features: a query pass for dq and
    dkv = sum_i phi(q_i) dy_i^T, then a key pass for dk and dv. Two (B, H, C, m) buffers serve every block.
    Saves only q, k, v, the projection, kv, g, the output and D: with the output laid out as the caller's
    merged heads (see _new_output), in float32 the output projection's saved input is this same tensor.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, kernel, real, block):
        feats = BlockFeatures(w, kernel, q.shape[-1])
        b, h, length, _ = q.shape
        block = min(block, length)
        buf = q.new_empty(b, h, block, feats.m)
        kv = q.new_zeros(b, h, feats.m, v.shape[-1] + 1)  # (B, H, m, d_v + 1), referenced at g
        g = None  # (B, H, 1): maximum key log-scale so far (softmax only)
        for s, e in _blocks(length, block):
            real_c = None if real is None else real[:, :, s:e]
            phi = _rows(buf, e - s)
            r, half_sq_norm = feats.key_logits(k[:, :, s:e], phi, real_c)
            if r is not None:
                g_new = r.amax(-1, keepdim=True)
                if g is not None:
                    g_new = torch.maximum(g, g_new)
                    kv.mul_(torch.exp(g - g_new)[..., None])  # <= 1
                g = g_new
            feats.keys_(phi, half_sq_norm, g, real_c)
            kv += phi.transpose(-1, -2) @ _with_ones(v[:, :, s:e])
        out, den = _new_output(q, v.shape[-1])
        for s, e in _blocks(length, block):
            y = feats.queries_(q[:, :, s:e], _rows(buf, e - s)) @ kv  # (B, H, C, d_v + 1)
            _normalise_(y, out[:, :, s:e], den[:, :, s:e])
        ctx.save_for_backward(q, k, v, w, kv, g, real, out, den)
        ctx.kernel, ctx.block = kernel, block
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, d_out):
        q, k, v, w, kv, g, real, out, den = ctx.saved_tensors
        feats = BlockFeatures(w, ctx.kernel, q.shape[-1])
        b, h, length, _ = q.shape
        buf, grad = (q.new_empty(b, h, ctx.block, feats.m) for _ in range(2))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dkv = torch.zeros_like(kv)
        for s, e in _blocks(length, ctx.block):  # queries
            phi = feats.queries_(q[:, :, s:e], _rows(buf, e - s))
            dy_c = _grad_y(d_out[:, :, s:e], out[:, :, s:e], den[:, :, s:e])  # (B, H, C, d_v + 1)
            dkv += phi.transpose(-1, -2) @ dy_c
            d_phi = torch.matmul(dy_c, kv.transpose(-1, -2), out=_rows(grad, e - s))
            dq[:, :, s:e] = feats.queries_backward_(d_phi, phi)
        for s, e in _blocks(length, ctx.block):  # keys
            real_c = None if real is None else real[:, :, s:e]
            phi = _rows(buf, e - s)
            feats.keys_at_(k[:, :, s:e], phi, g, real_c)
            dv[:, :, s:e] = phi @ dkv[..., :-1]
            d_phi = torch.matmul(_with_ones(v[:, :, s:e]), dkv.transpose(-1, -2), out=_rows(grad, e - s))
            dk[:, :, s:e] = feats.keys_backward_(d_phi, phi, k[:, :, s:e])
        return dq, dk, dv, None, None, None, None


def _rows(buffer, n):
    """The first n rows of a (B, H, R, m) work buffer as a contiguous (B, H, n, m) tensor (matmul's out= needs
    one: it folds a contiguous input's batch dimensions into its rows)."""
    b, h, _, m = buffer.shape
    return buffer.view(-1)[: b * h * n * m].view(b, h, n, m)


def _blocks(length, block):
    return ((s, min(s + block, length)) for s in range(0, length, block))


class _CausalFavor(torch.autograd.Function):
    """Causal D^-1 y for y_i = phi(q_i) sum_{j<=i} phi(k_j) exp(g_j - g_i) [v_j, 1]^T, softmax or projected-ReLU
    features, g the running maximum of the key log-scales, in chunks of C positions.

    The algorithm of _CausalLinearAttention (intra-chunk masked C x C products, a carried (m, d_v + 1) state
    rescaled when the maximum grows), run over spans of SPAN rows (several chunks) at a time: the features of
    a span come from one product into reused (B, H, SPAN, m) buffers (no (B, H, L, m) tensor: on the CPU each
    fresh tensor of that size costs page faults that take longer than the arithmetic), and the intra-chunk
    products and the per-chunk states of all its chunks are single batched products. Only the scan of the
    (m, d_v + 1) state from chunk to chunk is a Python loop. The running maximum is a cummax over the span
    joined with the previous span's end, so nothing from after position i ever reaches output i.
    Saves q, k, v, the projection, g (B, H, L), the state before each chunk ((B, H, SPAN / C, m, d_v + 1) per
    span), the output and D (as _BidirectionalFavor). Backward is one reverse pass over the spans that
    recomputes their features and carries sum_{i later} exp(g_end - g_i) phi(q_i) dy_i^T for the keys' gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, kernel, real, chunk):
        feats = BlockFeatures(w, kernel, q.shape[-1])
        b, h, length, _ = q.shape
        chunk = min(chunk, length)
        span = chunk * max(1, SPAN // chunk)
        m, width = feats.m, v.shape[-1] + 1
        f_q, phi_k = (q.new_empty(b, h, span, m) for _ in range(2))
        states = []  # per span: the state before each of its chunks (B, H, nc, m, D), referenced at its g_prev
        state = None
        g = q.new_zeros(b, h, length)  # stays 0 for relu
        out, den = _new_output(q, v.shape[-1])
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
        g_end = None  # (B, H): the running maximum at the end of the previous span
        for s, e in _blocks(length, span):
            pad = -(e - s) % chunk  # only the last span can be short
            qs, ks, real_s = (_span_rows(x, s, e, pad) for x in (q, k, real))
            vs = _span_rows(_with_ones(v[:, :, s:e]), 0, e - s, pad)
            n = qs.shape[2]
            fq, pk = feats.queries_(qs, _rows(f_q, n)), _rows(phi_k, n)
            r, half_sq_norm = feats.key_logits(ks, pk, real_s)
            if r is None:
                g_s = q.new_zeros(b, h, n)
            else:
                g_s = torch.cummax(r, -1).values
                if g_end is not None:
                    g_s = torch.maximum(g_s, g_end[..., None])
                g[:, :, s:e] = g_s[..., : e - s]
            feats.keys_(pk, half_sq_norm, g_s, real_s)  # phi(k_j) exp(-g_j)
            gc, fqc, pkc, vc = _split(chunk, g_s, fq, pk, vs)  # (B, H, nc, C[, ...])
            prev, ends = _chunk_references(gc, g_end)
            y_s = ((fqc @ pkc.transpose(-1, -2)).mul_(_decay(gc, upper))) @ vc  # intra-chunk
            local = pkc.transpose(-1, -2) @ (vc * torch.exp(gc - ends[..., None])[..., None])  # (B, H, nc, m, D)
            carry = torch.exp(prev - ends)  # (B, H, nc), <= 1
            before = _scan(local, carry, reverse=False, initial=state)
            state = _scan_out(before, local, carry, reverse=False)
            states.append(before)
            y_s += torch.exp(prev[..., None] - gc)[..., None] * (fqc @ before)  # the state from earlier chunks
            _normalise_(y_s.view(b, h, n, width)[:, :, : e - s], out[:, :, s:e], den[:, :, s:e])
            g_end = ends[..., -1]
        ctx.save_for_backward(q, k, v, w, g, real, out, den, *states)
        ctx.kernel, ctx.chunk, ctx.span = kernel, chunk, span
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, d_out):
        q, k, v, w, g, real, out, den, *states = ctx.saved_tensors
        feats = BlockFeatures(w, ctx.kernel, q.shape[-1])
        b, h, length, _ = q.shape
        chunk, span, m = ctx.chunk, ctx.span, feats.m
        f_q, phi_k, d_fq, d_pk = (q.new_empty(b, h, span, m) for _ in range(4))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        after = None  # sum over later chunks of exp(g_end - g_i) phi(q_i) dy_i^T (B, H, m, D)
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
        for (s, e), before in reversed(list(zip(_blocks(length, span), states))):
            pad = -(e - s) % chunk
            qs, ks, real_s = (_span_rows(x, s, e, pad) for x in (q, k, real))
            vs = _span_rows(_with_ones(v[:, :, s:e]), 0, e - s, pad)
            dys = _span_rows(_grad_y(d_out[:, :, s:e], out[:, :, s:e], den[:, :, s:e]), 0, e - s, pad)
            g_s = _span_rows(g, s, e, pad, repeat_last=True)
            n = qs.shape[2]
            fq, pk = feats.queries_(qs, _rows(f_q, n)), _rows(phi_k, n)
            feats.keys_at_(ks, pk, g_s, real_s)
            gc, fqc, pkc, vc, dyc = _split(chunk, g_s, fq, pk, vs, dys)
            prev, ends = _chunk_references(gc, None if s == 0 else g[:, :, s - 1])
            decay = _decay(gc, upper)
            dy_prev = dyc * torch.exp(prev[..., None] - gc)[..., None]  # (B, H, nc, C, D), scale <= 1
            to_end = torch.exp(gc - ends[..., None])[..., None]  # (B, H, nc, C, 1), <= 1
            # intra-chunk
            da = (dyc @ vc.transpose(-1, -2)).mul_(decay)  # (B, H, nc, C, C)
            dfq = torch.matmul(da, pkc, out=_rows(d_fq, n).view(fqc.shape))
            dpk = torch.matmul(da.transpose(-1, -2), fqc, out=_rows(d_pk, n).view(pkc.shape))
            dvc = ((fqc @ pkc.transpose(-1, -2)).mul_(decay)).transpose(-1, -2) @ dyc
            # queries read the state carried from earlier chunks ...
            dfq += dy_prev @ before.transpose(-1, -2)
            # ... keys and values feed every later chunk: reverse scan of the carried query-gradient sums
            local = fqc.transpose(-1, -2) @ dy_prev  # (B, H, nc, m, D)
            carry = torch.exp(prev - ends)
            afters = _scan(local, carry, reverse=True, initial=after)
            after = _scan_out(afters, local, carry, reverse=True)
            dpk += (vc * to_end) @ afters.transpose(-1, -2)
            dvc += to_end * (pkc @ afters)
            dv[:, :, s:e] = dvc.view(b, h, n, -1)[:, :, : e - s, :-1]
            dq[:, :, s:e] = feats.queries_backward_(_rows(d_fq, n), fq)[:, :, : e - s]
            dk[:, :, s:e] = feats.keys_backward_(_rows(d_pk, n), pk, ks)[:, :, : e - s]
        return dq, dk, dv, None, None, None, None


def _span_rows(x, s, e, pad, repeat_last=False):
    """Rows s:e of x (B, H or 1, L, ...) with `pad` rows appended: zeros (False for a mask), or the last row
    repeated (for the non-decreasing g). Padding rows sit after every real row of the sequence, so causality
    keeps them out of every real output."""
    if x is None:
        return None
    x = x[:, :, s:e]
    if not pad:
        return x
    shape = (*x.shape[:2], pad, *x.shape[3:])
    return torch.cat([x, x[:, :, -1:].expand(shape) if repeat_last else x.new_zeros(shape)], 2)


def _split(chunk, *tensors):
    """(B, H, n, ...) -> (B, H, n / C, C, ...)."""
    return [x.unflatten(2, (-1, chunk)) for x in tensors]


def _chunk_references(gc, g_in):
    """For the chunks of a span, gc (B, H, nc, C): the maximum each chunk's incoming state is referenced at
    (g_prev: the previous chunk's end, or g_in, the end of the previous span) and at each chunk's end."""
    ends = gc[..., -1]  # (B, H, nc)
    start = gc[..., :1, 0] if g_in is None else g_in[..., None]
    return torch.cat([start, ends[..., :-1]], -1), ends


def _decay(g_c, upper):
    """exp(g_j - g_i) for j <= i, else 0 (B, H, n, n): the decay between positions of one chunk, <= 1."""
    return (g_c[..., None, :] - g_c[..., :, None]).masked_fill_(upper, float("-inf")).exp_()
