"""FAVOR+ against closed forms and naive O(L^2) references (PAPER_NOTES section 4)."""

import math

import pytest
import torch

from protein_performer.attention import (
    FavorAttention,
    attention_matrix,
    favor_attention,
    orthogonal_gaussian_matrix,
    softmax_attention,
)
from protein_performer.attention.naive import (
    linear_attention,
    naive_softmax_attention,
    plain_softmax_features,
    plain_trig_features,
)

F64 = torch.float64


def rand(*shape, seed=0, scale=1.0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)


def projection(m, d, seed=0, dtype=F64, **kw):
    return orthogonal_gaussian_matrix(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype, **kw)


def qkv(b=2, h=3, length=37, d=16, seed=0, scale=0.5, dtype=F64, requires_grad=False):
    return [rand(b, h, length, d, seed=seed + i, scale=scale, dtype=dtype, requires_grad=requires_grad)
            for i in range(3)]


def naive_favor(q, k, v, w, kernel, causal=False, key_padding_mask=None):
    """The plain formula D^-1 A V with A = phi(Q) phi(K)^T materialised, features unstabilised."""
    if kernel == "softmax":
        fq, fk = plain_softmax_features(q, w), plain_softmax_features(k, w)
    elif kernel == "trig":
        fq, fk = plain_trig_features(q, w), plain_trig_features(k, w)
    elif w is None:
        fq, fk = torch.relu(q) + 1e-3, torch.relu(k) + 1e-3
    else:
        fq = torch.relu(q @ w.T) / math.sqrt(w.shape[0]) + 1e-3
        fk = torch.relu(k @ w.T) / math.sqrt(w.shape[0]) + 1e-3
    return linear_attention(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask)


# (kernel, uses a projection)
KINDS = [("softmax", True), ("trig", True), ("relu", True), ("relu", False)]


# ---- projection matrices ----------------------------------------------------------------------------

@pytest.mark.parametrize("m,d", [(16, 16), (40, 16), (7, 4)])
def test_orthogonal_blocks_and_row_norms(m, d):
    w = projection(m, d, scaling="sqrt_d")
    assert w.shape == (m, d)
    torch.testing.assert_close(w.norm(dim=1), torch.full((m,), math.sqrt(d), dtype=F64))
    for start in range(0, m, d):  # rows within a block are exactly orthogonal (1e-12: QR round-off)
        block = w[start:start + d]
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-12, rtol=0)


def test_chi_row_norms_are_gaussian_norms():
    # E|w|^2 = d for rows of N(0, I_d); 4096 rows: std of the mean of chi^2_16 / 16 is sqrt(2/16/4096) ~ 0.0055,
    # so 0.03 is more than 5 standard deviations.
    w = projection(4096, 16)
    assert abs((w.norm(dim=1) ** 2).mean().item() / 16 - 1) < 0.03
    iid = projection(4096, 16, orthogonal=False)
    assert abs((iid.norm(dim=1) ** 2).mean().item() / 16 - 1) < 0.03
    iid_fixed = projection(64, 16, orthogonal=False, scaling="sqrt_d")
    torch.testing.assert_close(iid_fixed.norm(dim=1), torch.full((64,), 4.0, dtype=F64))


def test_projection_is_a_pure_function_of_the_seed():
    torch.testing.assert_close(projection(64, 16, seed=3), projection(64, 16, seed=3), rtol=0, atol=0)
    assert not torch.equal(projection(64, 16, seed=3), projection(64, 16, seed=4))
    torch.manual_seed(123)  # the global RNG plays no part
    a = FavorAttention(16, 64, seed=0)
    torch.manual_seed(456)
    b = FavorAttention(16, 64, seed=0)
    assert torch.equal(a.projection, b.projection)
    a.redraw(7)
    assert not torch.equal(a.projection, b.projection)
    b.redraw(7)
    assert torch.equal(a.projection, b.projection)
    assert "projection" in a.state_dict()


# ---- FAVOR+ equals the plain formula -------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", KINDS)
def test_favor_equals_plain_formula_float64(kernel, projected, causal):
    q, k, v = qkv()
    w = projection(64, 16) if projected else None
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=16)  # 37 = 2 x 16 + 5
    ref = naive_favor(q, k, v, w, kernel, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)  # float64 round-off only


def test_stabiliser_adds_no_floor_when_exponents_span_tens_of_nats():
    # |q|, |k| ~ 3 sqrt(d): feature exponents W k' - |k'|^2/2 span ~ 60 nats across keys. performer-pytorch's
    # "+1e-4 after the stabiliser" would flatten attention here; the plain formula (float64, no overflow
    # at this range) is the reference.
    q, k, v = qkv(length=64, scale=3.0)
    w = projection(128, 16)
    fk = plain_softmax_features(k, w).log()
    assert (fk.amax(dim=(-1, -2)) - fk.amin(dim=(-1, -2))).min() > 40
    for causal in (False, True):
        out = favor_attention(q, k, v, w, causal=causal, chunk_size=16)
        torch.testing.assert_close(out, naive_favor(q, k, v, w, "softmax", causal), rtol=1e-6, atol=1e-9)


def test_float32_finite_where_plain_formula_underflows():
    q, k, v = qkv(length=64, scale=12.0, dtype=torch.float32)  # exponents of minus several hundred nats
    w = projection(64, 16, dtype=torch.float32)
    assert not torch.isfinite(naive_favor(q, k, v, w, "softmax")).all()  # 0 / 0
    # reference in log space (float64): phi(k_j) phi(q_i) summed as exp of logsumexp over features, then a
    # row softmax; 1e-3 absolute on outputs up to ~40: float32 features whose exponents span hundreds of nats
    qs, ks, wd = q.double() * 16**-0.25, k.double() * 16**-0.25, w.double()
    scores = torch.logsumexp((qs @ wd.T)[..., :, None, :] + (ks @ wd.T)[..., None, :, :], -1)
    scores = scores - 0.5 * (ks * ks).sum(-1)[..., None, :]
    for causal in (False, True):
        out = favor_attention(q, k, v, w, causal=causal)
        assert torch.isfinite(out).all()
        s = scores.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), -torch.inf) if causal else scores
        torch.testing.assert_close(out.double(), s.softmax(-1) @ v.double(), rtol=1e-4, atol=1e-3)


# ---- chunked causal against the O(L^2) masked computation -----------------------------------------------

@pytest.mark.parametrize("length,chunk", [(1, 4), (37, 8), (64, 16), (70, 64), (50, 128)])
@pytest.mark.parametrize("kernel,projected", KINDS)
def test_causal_chunked_values_and_gradients(kernel, projected, length, chunk):
    w = projection(32, 8) if projected else None
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):  # tolerances: issue contract; round-off only
        q, k, v = qkv(b=2, h=2, length=length, d=8, dtype=dtype, requires_grad=True)
        wd = None if w is None else w.to(dtype)
        out = favor_attention(q, k, v, wd, kernel=kernel, causal=True, chunk_size=chunk)
        ref = naive_favor(q, k, v, wd, kernel, causal=True)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        grad_out = rand(*out.shape, seed=9, dtype=dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradcheck_hand_written_backward(kernel, causal):
    # the custom autograd Functions (features, causal scan) against finite differences
    w = projection(8, 4)
    q, k, v = qkv(b=1, h=1, length=11, d=4, requires_grad=True)
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 8:] = False

    def fn(q, k, v):
        return favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=4, key_padding_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_authors_causal_toy_case():
    # d = 1, L = 3, q = k = 1, V = identity rows: output row i is the mean of the first i value rows.
    q = k = torch.ones(1, 1, 3, 1, dtype=F64)
    v = torch.eye(3, dtype=F64)[None, None]
    w = projection(10_000, 1)
    out = favor_attention(q, k, v, w, causal=True)
    expected = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)  # equal keys: exact for any features


@pytest.mark.parametrize("kernel,projected", KINDS)
def test_no_information_from_the_future(kernel, projected):
    # Perturb positions > i, with keys far larger than any before (a whole-sequence maximum would then
    # underflow the past): outputs up to i must stay bit-identical.
    w = projection(32, 16, dtype=torch.float32) if projected else None
    q, k, v = qkv(length=50, dtype=torch.float32)
    i = 29
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, i + 1:] = rand(2, 3, 20, 16, seed=5, scale=8.0, dtype=torch.float32)
    k2[:, :, i + 1:] = rand(2, 3, 20, 16, seed=6, scale=8.0, dtype=torch.float32)
    v2[:, :, i + 1:] = 1e6
    for chunk in (8, 64):
        a = favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=chunk)
        b = favor_attention(q2, k2, v2, w, kernel=kernel, causal=True, chunk_size=chunk)
        assert torch.equal(a[:, :, : i + 1], b[:, :, : i + 1])


# ---- padding -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", KINDS)
def test_padding_does_not_change_real_outputs(kernel, projected, causal):
    w = projection(32, 16) if projected else None
    q, k, v = qkv(b=1, length=20)
    pad = rand(1, 3, 13, 16, seed=7, scale=10.0)  # large padded keys must not dominate the maximum either
    q2, k2, v2 = (torch.cat([t, pad], 2) for t in (q, k, v))
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 13)], 1).bool()
    a = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=8)
    b = favor_attention(q2, k2, v2, w, kernel=kernel, causal=causal, chunk_size=8, key_padding_mask=mask)
    torch.testing.assert_close(b[:, :, :20], a, rtol=1e-12, atol=1e-12)  # float64 round-off


def test_left_padding_causal_is_finite_and_matches_unpadded():
    w = projection(32, 16)
    q, k, v = qkv(b=1, length=20)
    pad = rand(1, 3, 6, 16, seed=8, scale=10.0)
    q2, k2, v2 = (torch.cat([pad, t], 2) for t in (q, k, v))
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 20)], 1).bool()
    out = favor_attention(q2, k2, v2, w, causal=True, key_padding_mask=mask, chunk_size=8)
    assert torch.isfinite(out).all()
    # positions shift, values do not: real outputs equal the unpadded ones (float64 round-off)
    torch.testing.assert_close(out[:, :, 6:], favor_attention(q, k, v, w, causal=True), rtol=1e-12, atol=1e-12)


def test_exact_softmax_attention_matches_naive():
    q, k, v = qkv(length=33)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1, 25:] = False
    for causal in (False, True):
        out = softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
        ref = naive_softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(out, ref)


# ---- explicit attention matrices ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", KINDS + [("exact", False)])
def test_attention_matrix_is_what_the_output_applies(kernel, projected, causal):
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 24:] = False
    a = attention_matrix(q, k, w, kernel=kernel, causal=causal, key_padding_mask=mask)
    assert a.shape == (2, 3, 30, 30)
    if kernel != "trig":  # trig features are signed: rows sum to 1 but entries may be negative
        assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 30, dtype=F64))
    if causal:
        assert torch.equal(a, a.tril())
    assert (a[0, :, :, 24:] == 0).all()
    if kernel == "exact":
        out = softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
    else:
        out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, key_padding_mask=mask, chunk_size=8)
        # the paper's identity-values trick: attention applied to V = I gives the matrix itself
        eye = torch.eye(30, dtype=F64).expand(2, 3, 30, 30)
        trick = favor_attention(q, k, eye, w, kernel=kernel, causal=causal, key_padding_mask=mask, chunk_size=8)
        torch.testing.assert_close(trick, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a @ v, out, rtol=1e-10, atol=1e-12)


# ---- statistics: convergence, Lemma 2, Fig. 4 ----------------------------------------------------------------

def test_converges_to_exact_softmax_as_m_grows():
    q, k, v = qkv(b=1, h=1, length=128, scale=0.5)
    exact = softmax_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        mse = [((favor_attention(q, k, v, projection(m, 16, seed=s)) - exact) ** 2).mean() for s in range(4)]
        errors.append(torch.stack(mse).mean().item())
    # MSE ~ 1/m: each 4x increase of m must cut the error, and 64x more features at least 15x
    # (expected ~64x; 15x leaves room for the 4-draw average's noise).
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 15, errors


def test_positive_estimator_mse_matches_lemma_2():
    # Lemma 2: MSE_pos = (1/m) exp(|x+y|^2) SM^2 (1 - exp(-|x+y|^2)) for IID Gaussian w, SM = exp(x.y).
    d, m, draws = 4, 16, 20_000
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)
    y = torch.tensor([-0.4, 0.1, 0.2, 0.3], dtype=F64)
    w = torch.randn(draws, m, d, generator=g, dtype=F64)
    fx = torch.exp(w @ x - (x @ x) / 2) / math.sqrt(m)  # (draws, m): phi(x) without the d^-1/4 scaling,
    fy = torch.exp(w @ y - (y @ y) / 2) / math.sqrt(m)  # so that phi(x) . phi(y) estimates exp(x . y)
    estimate = (fx * fy).sum(-1)  # (draws,)
    sm = math.exp(x @ y)
    s = ((x + y) ** 2).sum().item()
    closed = math.exp(s) * sm**2 * (1 - math.exp(-s)) / m
    empirical = ((estimate - sm) ** 2).mean().item()
    assert abs(estimate.mean().item() / sm - 1) < 0.01  # unbiased; sd of the mean ~ 0.3%
    # the squared error's relative sd is ~ sqrt(kurtosis / draws) ~ 2-3% here: 10% is > 3 sd
    assert abs(empirical / closed - 1) < 0.10, (empirical, closed)


def _fig4_mse(kernel, orthogonal, scale, m, draws):
    errors = []
    for s in range(draws):
        q, k, v = (rand(1, 1, 4096, 16, seed=100 * s + i, scale=scale if i < 2 else 1.0) for i in range(3))
        w = projection(m, 16, seed=1000 + s, orthogonal=orthogonal)
        errors.append(((favor_attention(q, k, v, w, kernel=kernel) - softmax_attention(q, k, v)) ** 2).mean())
    return torch.stack(errors).mean().item()


@pytest.mark.slow
def test_fig4_orthogonal_beats_iid_and_positive_beats_trig():
    # Paper Fig. 4, L = 4096, d = 16. Orthogonal < IID holds for both estimators on moderate inputs
    # (q, k ~ N(0, 0.5^2)); on N(0, 1) inputs, where softmax values spread over orders of magnitude,
    # the trig estimator's signed denominator collapses and positive features win by >10x.
    for kernel in ("softmax", "trig"):
        assert _fig4_mse(kernel, True, 0.5, 64, 8) < _fig4_mse(kernel, False, 0.5, 64, 8)
    assert 10 * _fig4_mse("softmax", True, 1.0, 64, 4) < _fig4_mse("trig", True, 1.0, 64, 4)


# ---- mixed precision, module -------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_is_finite_and_close(causal):
    lin = torch.nn.Linear(16, 48)
    x = rand(2, 40, 16, dtype=torch.float32)
    attn = FavorAttention(16, 32, causal=causal, chunk_size=16)

    def run():
        q, k, v = lin(x).view(2, 40, 3, 1, 16).permute(2, 0, 3, 1, 4)
        return attn(q, k, v)

    ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # q/k/v come out of a bf16 matmul (8 bits of mantissa): 2e-2 relative to the output's scale
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", [("softmax", True), ("relu", False)])
def test_backward_inside_autocast_runs_in_float32(kernel, projected, causal):
    # loss.backward() called inside the autocast region: the hand-written backward passes must not drop to
    # bf16 (their products would mix dtypes); same forward, so the gradients equal those outside autocast
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=40, dtype=torch.float32, requires_grad=True)
    dy = rand(2, 3, 40, 16, seed=9, dtype=torch.float32)
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=16)
    ref = torch.autograd.grad(out, (q, k, v), dy)
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(out, (q, k, v), dy)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_without_real_keys_get_zero_not_nan_gradients(causal):
    # float32, upstream gradients of 1e3: where D is clamped (no real key), 1 / D ~ 1e38 would overflow to inf
    w = projection(32, 16)
    q, k, v = qkv(length=24, dtype=torch.float32, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1] = False  # the second sequence is all padding
    out = favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask, chunk_size=8)
    grads = torch.autograd.grad(out, (q, k, v), torch.full_like(out, 1e3))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads:
        assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1]))


# ---- recurrent decoding --------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,projected", KINDS)
def test_recurrent_decoding_equals_causal_attention(kernel, projected):
    from protein_performer.attention.favor import favor_decode_step

    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=90)
    k[:, :, 60:] *= 4  # later keys raise the running maximum: the carried state must be rescaled
    full = favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=16)
    out, state = favor_decode_step(q[:, :, :50], k[:, :, :50], v[:, :, :50], w, None, kernel=kernel)  # prefill
    outs = [out]
    for t in range(50, 90):  # then one token at a time
        out, state = favor_decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], w, state, kernel=kernel)
        outs.append(out)
        assert state.kv.shape == (2, 3, w.shape[0] * (2 if kernel == "trig" else 1) if projected else 16, 17)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-10)  # float64 round-off


# ---- the hand-written Functions over several blocks (bidirectional) or spans of chunks (causal) ----------

@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal,length,chunk,rows", [
    (False, 37, None, 8), (False, 20, None, 7), (False, 5, None, 16),  # blocks that do not divide L
    # several spans of several chunks, a short last span (37 = 3 x 12 + 1; 23 = 2 x 10 + 3, padded to a chunk)
    (True, 37, 4, 12), (True, 40, 4, 8), (True, 23, 5, 10), (True, 9, 4, 4),
])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("scan", ["loop", "matmul"])
def test_blocked_functions_values_and_gradients(kernel, causal, length, chunk, rows, padded, scan):
    # keys large enough that later blocks raise the online (running) maximum; padding after and between real keys
    from protein_performer.attention import Blocking
    blocking = Blocking(block=rows, span=rows, scan=scan)
    w = projection(32, 16)
    q, k, v = qkv(length=length, scale=1.5, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[0, length // 2:] = False
        # causal: padding between real keys (a row before any real key is 0 / 0 in the reference); else first
        mask[1, slice(3, 7) if causal else slice(0, 3)] = False
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=chunk or 64, key_padding_mask=mask,
                          blocking=blocking)
    ref = naive_favor(q, k, v, w, kernel, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)  # float64 round-off only
    dy = rand(*out.shape, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)  # float64; sums over up to 40 positions
