"""Causal FAVOR+ as one autograd Function over spans of chunks, with an initial and a final state (the design:
see favor.py).

y_i = phi(q_i) (S_0 exp(g_0 - g_i) + sum_{j<=i} phi(k_j) exp(g_j - g_i) [v_j, 1]^T), g_i the running maximum of
the key log-scales (joined with g_0, the initial state's): every factor is <= 1 and nothing after i reaches y_i.
Chunks of C rows: inside a chunk an explicit masked C x C product, across chunks a carried (m, d_v + 1) state.
A span holds several chunks, so its intra-chunk products and chunk states are single batched products; only the
state scan runs chunk after chunk, as a loop or as one product with a lower-triangular decay matrix.
"""

from __future__ import annotations

import functools

import torch

from .features import (
    LOG2E,
    PAD_OFFSET,
    BlockFeatures,
    acc_dtype,
    add_mm_,
    as_low,
    blocks,
    causal_mask,
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


class CausalFavor(torch.autograd.Function):
    """Returns (out (B, H, L, d_v), the final state kv (B, H, m, d_v + 1), its reference g (B, H)).

    kv0, g0: the state of a prefix (kv referenced at g: S = kv exp(g)), or None. Saves q, k, v, the projection,
    g (B, H, L), the state before every chunk, the decayed intra-chunk scores (L C values per head, a quarter of the
    chunk states at C = 64: they spare backward its costliest recomputation), the output, D, the query rows'
    maxima and the keys' |k'|^2/2 (softmax). Backward is one reverse pass over the spans: it recomputes their
    features and carries sum_{i later} exp(g_end - g_i) phi(q_i) dy_i^T for the keys.

    With bf16 products (low), what only feeds products or comes out of them is bf16 (q, k, v, the features as the
    products read them, scores, the saved states, y, the output and D, the feature gradients), as in
    BidirectionalFavor; g, the exponents and the carried states stay float32.
    """

    @staticmethod
    def forward(ctx, q, k, v, w, kernel, real, kv0, g0, chunk, span, scan, low):
        feats = BlockFeatures(w, kernel, q.shape[-1], low)
        b, h, length, _ = q.shape
        chunk = min(chunk, length)
        span = chunk * max(1, span // chunk)
        acc = acc_dtype(q)
        f_q, phi_k = (q.new_empty(b, h, span, feats.m, dtype=feats.buffer_dtype(q)) for _ in range(2))
        g = q.new_zeros(b, h, length, dtype=acc)  # stays 0 for relu
        half_sq = feats.half_sq_norm(k) if feats.softmax else None  # |k'|^2 / 2 (B, H, L), for backward too
        shift = q.new_zeros(b, h, length + (-length % chunk), dtype=acc)  # query rows' maxima, for backward
        out, den = new_output(q, v.shape[-1])
        state, g_in = kv0, g0  # the state entering the span (B, H, m, D), referenced at g_in (B, H)
        befores, scores = [], []
        v1 = with_ones(v)  # (B, H, L, D), one concatenation for every span
        for s, e in blocks(length, span):
            pad = -(e - s) % chunk  # only the last span can be short
            qs, ks = _span_rows(q, s, e, pad), _span_rows(k, s, e, pad)
            real_s = _span_real(real, s, e, pad, q.device)
            vs = _span_rows(v1, s, e, pad)  # (B, H, n, D)
            n = qs.shape[2]
            fq, pk = feats.queries_(qs, rows(f_q, n), shift[:, :, s:s + n]), rows(phi_k, n)
            r, half_sq_norm = feats.key_logits(ks, pk, real_s, _span_rows(half_sq, s, e, pad))
            if r is None:
                g_s = q.new_zeros(b, h, n, dtype=acc)
            else:  # running maximum, joined with the previous span's
                g_s = torch.cummax(r, -1).values
                if g_in is not None:
                    g_s = torch.maximum(g_s, g_in[..., None])
                g[:, :, s:e] = g_s[..., : e - s]
            feats.keys_(pk, half_sq_norm, g_s, real_s)  # phi(k_j) exp(-g_j)
            gc, fqc, pkc, vc = _split(chunk, g_s, fq, pk, vs)  # (B, H, nc, C[, ...])
            refs = _references(gc, g_in)  # (B, H, nc + 1)
            # bf16 products: every operand read by several products is converted once, and what is saved only
            # for backward's products is saved in bf16 (the same values those products would read)
            fqc, pkc = as_low(fqc, low), as_low(pkc, low)
            a = mm(fqc, pkc.transpose(-1, -2), low).mul_(as_low(_decay(gc), low))  # (B, H, nc, C, C) intra-chunk
            scores.append(a)
            to_end = _exp(gc - refs[..., 1:, None])[..., None]  # (B, H, nc, C, 1), <= 1
            local = mm(pkc.transpose(-1, -2), _scaled(vc, to_end), low)  # (B, H, nc, m, D), at each chunk's end
            before, state = scan_states(local, refs, state, reverse=False, mode=scan)
            before = as_low(before, low)
            befores.append(before)
            from_start = _exp(refs[..., :-1, None] - gc)[..., None]
            y = torch.addcmul(mm(a, vc, low), as_low(from_start, low), mm(fqc, before, low))  # + earlier chunks
            normalise_(y.view(b, h, n, -1)[:, :, : e - s], out[:, :, s:e], den[:, :, s:e])
            g_in = refs[..., -1]
        ctx.save_for_backward(q, k, v, w, g, real, g0, out, den, shift, half_sq, *befores, *scores)
        ctx.kernel, ctx.chunk, ctx.span, ctx.scan, ctx.low = kernel, chunk, span, scan, low
        ctx.mark_non_differentiable(g_in)
        return out, state, g_in

    @staticmethod
    @without_autocast
    def backward(ctx, d_out, d_state, _):
        q, k, v, w, g, real, g0, out, den, shift, half_sq, *saved = ctx.saved_tensors
        chunk, span, low = ctx.chunk, ctx.span, ctx.low
        feats = BlockFeatures(w, ctx.kernel, q.shape[-1], low)
        b, h, length, _ = q.shape
        f_q, phi_k = (q.new_empty(b, h, span, feats.m, dtype=feats.buffer_dtype(q)) for _ in range(2))
        if low is None:  # float32 feature gradients in reused buffers; bf16 ones come fresh from their products
            d_fq, d_pk = torch.empty_like(f_q), torch.empty_like(phi_k)
            into = lambda buffer, n, shape: rows(buffer, n).view(shape)
        else:
            d_fq = d_pk = None
            into = lambda *_: None
        dq, dk, dv = (empty_in_layout_of(x) for x in (q, k, v))
        den = grad_denominators(den, d_out.dtype)
        v1 = with_ones(v)
        offset = None if half_sq is None else feats.key_offset(half_sq, g, real)  # every key's shift, g known
        after = d_state  # sum over later positions of exp(g_ref - g_i) phi(q_i) dy_i^T (B, H, m, D)
        spans = list(blocks(length, span))
        for (s, e), before, a in reversed(list(zip(spans, saved[: len(spans)], saved[len(spans):]))):
            pad = -(e - s) % chunk
            qs, ks = _span_rows(q, s, e, pad), _span_rows(k, s, e, pad)
            real_s = _span_real(real, s, e, pad, q.device)
            vs = _span_rows(v1, s, e, pad)
            dys = _span_rows(grad_y(d_out[:, :, s:e], out[:, :, s:e], den[:, :, s:e]), 0, e - s, pad)
            g_s = _span_rows(g, s, e, pad, repeat_last=True)
            n = qs.shape[2]
            fq = feats.queries_at_(qs, rows(f_q, n), shift[:, :, s:s + n])
            pk = feats.keys_at_(ks, rows(phi_k, n), _span_rows(offset, s, e, pad, value=PAD_OFFSET), real_s)
            gc, fqc, pkc, vc, dyc = _split(chunk, g_s, fq, pk, vs, dys)
            refs = _references(gc, g0 if s == 0 else g[:, :, s - 1])
            dy_prev = _scaled(dyc, _exp(refs[..., :-1, None] - gc)[..., None])  # (B, H, nc, C, D), scale <= 1
            to_end = _exp(gc - refs[..., 1:, None])[..., None]  # (B, H, nc, C, 1), <= 1
            # intra-chunk
            fqc, pkc = as_low(fqc, low), as_low(pkc, low)
            da = mm(dyc, vc.transpose(-1, -2), low).mul_(as_low(_decay(gc), low))  # (B, H, nc, C, C)
            # the feature gradients: float32 buffers, or fresh bf16 products (summed in bf16: no mixed-dtype op)
            dfq = mm(da, pkc, low, out=into(d_fq, n, fqc.shape))
            dpk = mm(da.transpose(-1, -2), fqc, low, out=into(d_pk, n, pkc.shape))
            # queries read the state from earlier chunks; keys and values feed every later chunk
            add_mm_(dfq, dy_prev, before.transpose(-1, -2), low)
            local = mm(fqc.transpose(-1, -2), dy_prev, low)  # (B, H, nc, m, D), referenced at each chunk's start
            afters, after = scan_states(local, refs, after, reverse=True, mode=ctx.scan)
            afters = as_low(afters, low)
            add_mm_(dpk, _scaled(vc, to_end), afters.transpose(-1, -2), low)
            dvc = torch.addcmul(mm(a.transpose(-1, -2), dyc, low), as_low(to_end, low), mm(pkc, afters, low))
            dv[:, :, s:e] = dvc.view(b, h, n, -1)[:, :, : e - s, :-1]
            dfq, dpk, fq, pk = (x.view(b, h, n, -1) for x in (dfq, dpk, fqc, pkc))  # features in dfq's dtype
            dq[:, :, s:e] = feats.queries_backward_(dfq, fq)[:, :, : e - s]
            dk[:, :, s:e] = feats.keys_backward_(dpk, pk, ks)[:, :, : e - s]
        d_kv0 = after if ctx.needs_input_grad[6] else None
        return dq, dk, dv, None, None, None, d_kv0, None, None, None, None, None


def causal_step(q, k, v, w, kernel, kv0, g0, low):
    """CausalFavor for one new position without autograd (a sampling step), as the recurrence: its chunk of one row
    needs none of the chunk machinery, whose fixed cost per call is most of a step's time.

    q, k, v (B, H, 1, d); kv0 (B, H, m, d_v + 1) referenced at g0 (B, H), or None. Returns (out (B, H, 1, d_v),
    kv, g) as CausalFavor.apply would: y = phi(q) (kv0 exp(g0 - g) + phi(k) exp(-g) [v, 1]^T), g = max(g0, r).
    """
    feats = BlockFeatures(w, kernel, q.shape[-1], low)
    b, h = q.shape[:2]
    fq = feats.queries_(q, q.new_empty(b, h, 1, feats.m, dtype=acc_dtype(q)))
    pk = q.new_empty(b, h, 1, feats.m, dtype=fq.dtype)
    r, half_sq_norm = feats.key_logits(k, pk, None)
    if r is None:  # relu: nothing to stabilise, g stays 0
        g = q.new_zeros(b, h, dtype=fq.dtype)
    else:
        g = r[..., 0] if g0 is None else torch.maximum(r[..., 0], g0)
    kv = mm(feats.keys_(pk, half_sq_norm, g[..., None], None).transpose(-1, -2), with_ones(v), low)  # (B, H, m, D)
    kv = kv.to(acc_dtype(kv))  # the carried state stays float32
    if kv0 is not None:
        kv += kv0 if r is None else kv0 * _exp(g0 - g)[..., None, None]  # the prefix, moved to g (<= 1)
    out, den = new_output(q, v.shape[-1])
    normalise_(mm(fq, kv, low), out, den)
    return out, kv, g


def scan_states(x, refs, first, reverse, mode="loop"):
    """The carried state at every chunk boundary, as (inner (B, H, nc, m, D), edge (B, H, m, D)).

    x (B, H, nc, m, D): one term per chunk, referenced at refs[c + 1] (forward: its keys summed to its end) or
    refs[c] (reverse: its queries' gradients summed to its start); first (B, H, m, D) or None: the state entering
    at refs[0] (forward) or refs[nc] (reverse). Boundary r holds first + the terms of the chunks before r
    (forward) or from r on (reverse), each moved to refs[r] by a factor exp(-|refs[r] - ref|) <= 1. Forward: inner
    = boundaries 0 .. nc - 1 (before each chunk), edge = nc (after the last); reverse: inner = 1 .. nc (after
    each chunk), edge = 0. mode "loop": one fused multiply-add per chunk; "matmul": the products with the
    (nc + 1)^2 lower-triangular decay matrix (transposed for reverse), inner and edge rows apart so that inner
    is contiguous for the products that read it.
    """
    b, h, nc, m, d = x.shape
    x = x.to(acc_dtype(x))  # bf16 terms: one conversion, then every sum in float32
    if mode == "matmul":
        decay = _decay(refs)  # (B, H, nc + 1, nc + 1): exp(refs[j] - refs[r]) for j <= r
        if reverse:
            decay = decay.transpose(-1, -2)
        terms, entry = (decay[..., :-1], decay[..., -1:]) if reverse else (decay[..., 1:], decay[..., :1])
        inner_rows, edge_row = (slice(1, None), slice(0, 1)) if reverse else (slice(None, -1), slice(nc, None))
        inner, edge = terms[..., inner_rows, :] @ x.flatten(-2), terms[..., edge_row, :] @ x.flatten(-2)
        if first is not None:
            inner += entry[..., inner_rows, :] * first.flatten(-2)[:, :, None]
            edge += entry[..., edge_row, :] * first.flatten(-2)[:, :, None]
        return inner.view(b, h, nc, m, d), edge.view(b, h, m, d)
    inner, edge = x.new_empty(b, h, nc, m, d), x.new_empty(b, h, m, d)
    carry = _exp(refs[..., :-1] - refs[..., 1:])[..., None, None]  # (B, H, nc, 1, 1), <= 1
    start = inner[:, :, -1] if reverse else inner[:, :, 0]
    if first is None:
        start.zero_()
    else:
        start.copy_(first)
    for c in range(nc - 1, -1, -1) if reverse else range(nc):
        nxt = c - 1 if reverse else c + 1
        dst = inner[:, :, nxt] if 0 <= nxt < nc else edge
        torch.addcmul(x[:, :, c], inner[:, :, c], carry[:, :, c], out=dst)
    return inner, edge


def _span_rows(x, s, e, pad, repeat_last=False, value=0):
    """Rows s:e of x (B, H or 1, L, ...) and `pad` more: `value` (0; False for a mask) or the last row again (the
    non-decreasing g). Padding rows come after every real row, so causality keeps them out of real outputs."""
    if x is None:
        return None
    x = x[:, :, s:e]
    if not pad:
        return x
    shape = (*x.shape[:2], pad, *x.shape[3:])
    return torch.cat([x, x[:, :, -1:].expand(shape) if repeat_last else x.new_full(shape, value)], 2)


def _span_real(real, s, e, pad, device):
    """The key mask of rows s:e and `pad` False rows (B or 1, 1, n), or None when every row is a real key. Padding
    rows then never raise the running maximum, so the final state's reference is the last real row's."""
    if real is None:
        if not pad:
            return None
        real = torch.ones(1, 1, e, dtype=torch.bool, device=device)
    return _span_rows(real, s, e, pad)


def _scaled(x, scale):
    """x * scale in x's dtype: a small (.., 1) scale is converted, not x (a mixed-dtype op is several times slower
    on the CPU)."""
    return x * scale.to(x.dtype)


def _split(chunk, *tensors):
    return [x.unflatten(2, (-1, chunk)) for x in tensors]  # (B, H, n, ...) -> (B, H, n / C, C, ...)


def _references(gc, g_in):
    """The maxima the chunk states of a span are referenced at (B, H, nc + 1): the state entering the span
    (g_in, or the first g when there is none), then each chunk's end."""
    start = gc[..., :1, 0] if g_in is None else g_in[..., None]
    return torch.cat([start, gc[..., -1]], -1)


def _decay(g):
    """exp(g_j - g_i) for j <= i, else 0 (.., n, n), for non-decreasing g (.., n): every factor <= 1."""
    g = g * LOG2E
    return (g[..., None, :] - g[..., :, None]).masked_fill_(_above_diagonal(g.shape[-1], g.device), -torch.inf).exp2_()


def _exp(x):
    return x.mul_(LOG2E).exp2_()  # exp(x) for a temporary x, by the faster exp2


@functools.lru_cache(maxsize=16)
def _above_diagonal(n, device):
    return ~causal_mask(n, device=device)  # the future of each row, cached as a mask to fill
