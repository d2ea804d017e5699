"""FAVOR+: every fast op against its naive twin (outputs, final states, every gradient), closed forms, semantics."""

import itertools
import math

import pytest
import torch

from protein_performer import cpu_kernels
from protein_performer.attention import (
    Blocking,
    DecodeState,
    FavorAttention,
    attention_matrix,
    favor_attention,
    orthogonal_gaussian_matrix,
    softmax_attention,
)
from protein_performer.attention.causal import CausalFavor, scan_states
from protein_performer.attention.naive import (
    naive_favor,
    naive_softmax_attention,
    plain_features,
    plain_softmax_features,
    recurrent_attention,
)

F64, F32 = torch.float64, torch.float32
KINDS = [("softmax", True), ("trig", True), ("relu", True), ("relu", False)]  # (kernel, uses a projection)
FAST_KINDS = [k for k in KINDS if k[0] != "trig"]  # the kernels of the hand-written Functions

# Every test here runs with NaN-filled torch.empty / empty_like / new_empty buffers (conftest.nan_empty): a buffer the
# attention code reads before writing all of it turns the outputs or gradients NaN and fails the comparison.
pytestmark = pytest.mark.usefixtures("nan_empty")


def test_unwritten_buffers_are_nan_here():
    half = torch.empty(4)
    half[:2] = 1.0
    assert half[2:].isnan().all() and torch.empty_like(half).isnan().all() and half.new_empty(3).isnan().all()

    class Unwritten(torch.autograd.Function):  # backward's buffers too
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return torch.empty_like(grad)

    x = torch.ones(3, requires_grad=True)
    Unwritten.apply(x).sum().backward()
    assert x.grad.isnan().all()


def rand(*shape, seed=0, scale=1.0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)


def projection(m, d, seed=0, dtype=F64, **kw):
    return orthogonal_gaussian_matrix(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype, **kw)


def qkv(b=2, h=3, length=37, d=16, seed=0, scale=0.5, dtype=F64, requires_grad=False):
    return [rand(b, h, length, d, seed=seed + i, scale=scale, dtype=dtype, requires_grad=requires_grad)
            for i in range(3)]


def assert_same_grads(out, ref, inputs, tol, seed=9):
    dy = rand(*out.shape, seed=seed, dtype=out.dtype)
    for a, b in zip(torch.autograd.grad(out, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def mask_for(b, length, causal):
    # padding after the real keys, and (causal) between them: a causal row before any real key is 0 / 0 in the
    # reference, so bidirectional masks may pad the start instead
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, length // 2:] = False
    mask[-1, slice(3, 7) if causal else slice(0, 3)] = False
    return mask


# ---- projection matrices ----------------------------------------------------------------------------------------

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
    # E|w|^2 = d for rows of N(0, I_d); 4096 rows: std of the mean of chi^2_16 / 16 is ~0.0055, 0.03 is > 5 sd
    for w in (projection(4096, 16), projection(4096, 16, orthogonal=False)):
        assert abs((w.norm(dim=1) ** 2).mean().item() / 16 - 1) < 0.03
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


# ---- the fast Functions against their naive twins (float64: tolerances are round-off only) -------------------------

@pytest.mark.parametrize("kernel,projected", FAST_KINDS)
@pytest.mark.parametrize("length,block", [(37, 8), (20, 7), (5, 16), (37, 512)])
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_against_naive(kernel, projected, length, block, padded):
    # keys of scale 1.5: later blocks raise the online shared maximum, so kv is rescaled
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=length, scale=1.5, requires_grad=True)
    mask = mask_for(2, length, causal=False) if padded else None
    out = favor_attention(q, k, v, w, kernel=kernel, key_padding_mask=mask, blocking=Blocking(block=block))
    ref = naive_favor(q, k, v, w, kernel, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, (q, k, v), 1e-9)  # sums over up to 37 positions of float64 round-off


@pytest.mark.parametrize("kernel,projected", FAST_KINDS)
@pytest.mark.parametrize("length,chunk,span", [(1, 4, 8), (37, 4, 12), (40, 4, 8), (23, 5, 10), (70, 16, 512),
                                               (50, 128, 512)])
@pytest.mark.parametrize("scan", ["loop", "matmul"])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_against_naive(kernel, projected, length, chunk, span, scan, padded):
    # several spans of several chunks, short last spans padded to a chunk (37 = 3 x 12 + 1, 23 = 2 x 10 + 3)
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=length, scale=1.5, requires_grad=True)
    mask = mask_for(2, length, causal=True) if padded and length > 8 else None
    out = favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=chunk, key_padding_mask=mask,
                          blocking=Blocking(span=span, scan=scan))
    ref = naive_favor(q, k, v, w, kernel, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, (q, k, v), 1e-9)


@pytest.mark.parametrize("kernel,projected", FAST_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_views_of_the_packed_projection_get_gradients_in_its_layout(kernel, projected, causal):
    # q, k, v as the model passes them: views into one (B, L, 3, H, d) projection. Their gradients equal the naive
    # twin's and lie in memory as (B, L, H, d), so that stacking them back into the projection's layout is one
    # contiguous copy; contiguous inputs keep contiguous gradients (no copy when a leaf accumulates its .grad)
    w = projection(32, 16) if projected else None
    packed = rand(2, 37, 3, 3, 16, scale=0.5, requires_grad=True)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
    blocking = Blocking(span=12) if causal else Blocking(block=8)
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=4, blocking=blocking)
    ref = naive_favor(q, k, v, w, kernel, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dy = rand(*out.shape, seed=9)
    for grad, want in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)):
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-9)  # float64 round-off, as above
        assert grad.transpose(1, 2).is_contiguous()  # (B, L, H, d) in memory
    q, k, v = qkv(length=37, requires_grad=True)
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=4, blocking=blocking)
    assert all(grad.is_contiguous() for grad in torch.autograd.grad(out, (q, k, v), dy))


@pytest.mark.parametrize("causal", [False, True])
def test_gpu_blocking_on_the_cpu_equals_the_cpu_blocking(causal):
    # the CUDA plan (one block for the whole sequence, spans of 4096 rows, the matmul scan) run on the CPU: two
    # spans of 64 chunks, against the CPU plan (ten blocks of 512, spans of 256, the loop scan); float64 round-off
    q, k, v = qkv(b=1, h=1, length=4500, scale=1.5, requires_grad=True)
    w = projection(32, 16)
    gpu = Blocking(block=10**6, span=4096, scan="matmul")
    out = favor_attention(q, k, v, w, causal=causal, blocking=gpu)
    ref = favor_attention(q, k, v, w, causal=causal, blocking=Blocking())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, (q, k, v), 1e-9)


def _to_sums(kv, g):
    """A causal state (kv referenced at g) as the plain prefix sums (S, z) of the recurrent reference."""
    scale = torch.exp(g)[..., None, None]
    return kv[..., :-1] * scale, kv[..., -1] * scale[..., 0]


@pytest.mark.parametrize("kernel,projected", FAST_KINDS)
@pytest.mark.parametrize("prefix,length,chunk,span", [(13, 30, 4, 12), (20, 9, 8, 8), (5, 1, 4, 8)])
@pytest.mark.parametrize("scan", ["loop", "matmul"])
def test_causal_initial_state_against_recurrent(kernel, projected, prefix, length, chunk, span, scan):
    # the Function over a prefix, its final state, the Function over the continuation from that state: outputs,
    # final state and the gradients of every input (through both states) against the token-by-token recurrence
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=prefix + length)
    k[:, :, prefix:] *= 3  # the continuation raises the running maximum
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (w, kernel, None)
    tail = (chunk, span, scan, None)
    a, kv, g = CausalFavor.apply(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], *args, None, None, *tail)
    b, kv, g = CausalFavor.apply(q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:], *args, kv, g, *tail)
    fq, fk = plain_features(q, w, kernel), plain_features(k, w, kernel)
    ref_a, state = recurrent_attention(fq[:, :, :prefix], fk[:, :, :prefix], v[:, :, :prefix])
    ref_b, (s, z) = recurrent_attention(fq[:, :, prefix:], fk[:, :, prefix:], v[:, :, prefix:], state)
    out, ref, sums = torch.cat([a, b], 2), torch.cat([ref_a, ref_b], 2), _to_sums(kv, g)
    for x, y in zip((out, *sums), (ref, s, z)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    dy, ds, dz = rand(*ref.shape, seed=9), rand(*s.shape, seed=10), rand(*z.shape, seed=11)
    loss = (out * dy).sum() + (sums[0] * ds).sum() + (sums[1] * dz).sum()
    ref_loss = (ref * dy).sum() + (s * ds).sum() + (z * dz).sum()
    for x, y in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v))):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def decay(refs, c, j):
    return torch.exp(-(refs[..., c] - refs[..., j]).abs())[..., None, None]  # moves j's reference to c's: <= 1


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_first", [False, True])
def test_matmul_scan_equals_loop_and_definition(reverse, with_first):
    # chunk references with jumps of tens of nats: every decay factor is exp(-difference) <= 1
    nc = 7
    x = rand(2, 3, nc, 5, 4)
    refs = torch.cumsum(rand(2, 3, nc + 1, seed=1).abs() * 20, -1)
    first = rand(2, 3, 5, 4, seed=2) if with_first else None
    def boundaries(inner, edge):  # all nc + 1 boundaries in order
        return torch.cat([edge[:, :, None], inner] if reverse else [inner, edge[:, :, None]], 2)

    loop = boundaries(*scan_states(x, refs, first, reverse, "loop"))
    matmul = boundaries(*scan_states(x, refs, first, reverse, "matmul"))
    expected = torch.zeros_like(loop)
    for c in range(nc + 1):  # the definition, term by term: x[j] sits at refs[j] (reverse) or refs[j + 1]
        for j in range(c, nc) if reverse else range(c):
            expected[:, :, c] += x[:, :, j] * decay(refs, c, j if reverse else j + 1)
        if first is not None:
            expected[:, :, c] += first * decay(refs, c, nc if reverse else 0)
    torch.testing.assert_close(loop, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(matmul, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,projected", KINDS)
def test_decode_prefill_and_steps_equal_full_causal(kernel, projected):
    # prefill 50 tokens, then one at a time: every output and the final state equal the full causal pass
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=90)
    k[:, :, 60:] *= 4  # later keys raise the running maximum: the carried state must be rescaled
    full = favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=16)
    out, state = favor_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], w, kernel=kernel,
                                 causal=True, output_final_state=True)
    outs = [out]
    for t in range(50, 90):
        out, state = favor_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], w, kernel=kernel,
                                     causal=True, initial_state=state, output_final_state=True)
        outs.append(out)
    assert isinstance(state, DecodeState)
    features = w.shape[0] * (2 if kernel == "trig" else 1) if projected else 16
    assert state.kv.shape == (2, 3, features, 17) and state.g.shape == (2, 3)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-10)  # float64 round-off
    _, (s, z) = recurrent_attention(plain_features(q, w, kernel), plain_features(k, w, kernel), v)
    torch.testing.assert_close(_to_sums(*state)[0], s, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(_to_sums(*state)[1], z, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", KINDS)
def test_favor_equals_plain_formula_float64(kernel, projected, causal):
    # every kernel, the trig one on its plain-autograd path: values and gradients
    q, k, v = qkv(requires_grad=True)
    w = projection(64, 16) if projected else None
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=16)  # 37 = 2 x 16 + 5
    ref = naive_favor(q, k, v, w, kernel, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(out, ref, (q, k, v), 1e-9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradcheck_hand_written_backward(kernel, causal):
    w = projection(8, 4)
    q, k, v = qkv(b=1, h=1, length=11, d=4, requires_grad=True)
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 8:] = False

    def fn(q, k, v):
        return favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=4, key_padding_mask=mask,
                               blocking=Blocking(block=4, span=8))

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ---- stabiliser, causality, padding ---------------------------------------------------------------------------------

def test_stabiliser_adds_no_floor_when_exponents_span_tens_of_nats():
    # |q|, |k| ~ 3 sqrt(d): feature exponents span ~60 nats across keys. performer-pytorch's "+1e-4 after the
    # stabiliser" would flatten attention here; the plain formula (float64, no overflow here) is the reference.
    q, k, v = qkv(length=64, scale=3.0)
    w = projection(128, 16)
    fk = plain_softmax_features(k, w).log()
    assert (fk.amax(dim=(-1, -2)) - fk.amin(dim=(-1, -2))).min() > 40
    for causal in (False, True):
        out = favor_attention(q, k, v, w, causal=causal, chunk_size=16)
        torch.testing.assert_close(out, naive_favor(q, k, v, w, "softmax", causal=causal), rtol=1e-6, atol=1e-9)


def test_float32_finite_where_plain_formula_underflows():
    q, k, v = qkv(length=64, scale=12.0, dtype=F32)  # exponents of minus several hundred nats
    w = projection(64, 16, dtype=F32)
    assert not torch.isfinite(naive_favor(q, k, v, w, "softmax")).all()  # 0 / 0
    # reference in log space (float64): logsumexp over features, then a row softmax; 1e-3 absolute on outputs up
    # to ~40: float32 features whose exponents span hundreds of nats
    qs, ks, wd = q.double() * 16**-0.25, k.double() * 16**-0.25, w.double()
    scores = torch.logsumexp((qs @ wd.T)[..., :, None, :] + (ks @ wd.T)[..., None, :, :], -1)
    scores = scores - 0.5 * (ks * ks).sum(-1)[..., None, :]
    for causal in (False, True):
        out = favor_attention(q, k, v, w, causal=causal)
        assert torch.isfinite(out).all()
        s = scores.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), -torch.inf) if causal else scores
        torch.testing.assert_close(out.double(), s.softmax(-1) @ v.double(), rtol=1e-4, atol=1e-3)


def test_authors_causal_toy_case():
    # d = 1, L = 3, q = k = 1, V = identity rows: output row i is the mean of the first i value rows
    q = k = torch.ones(1, 1, 3, 1, dtype=F64)
    v = torch.eye(3, dtype=F64)[None, None]
    out = favor_attention(q, k, v, projection(10_000, 1), causal=True)
    expected = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)  # equal keys: exact for any features


@pytest.mark.parametrize("kernel,projected", KINDS)
def test_no_information_from_the_future(kernel, projected):
    # positions > i perturbed, with keys far larger than any before (a whole-sequence maximum would then underflow
    # the past): outputs up to i stay bit-identical, with either scan
    w = projection(32, 16, dtype=F32) if projected else None
    q, k, v = qkv(length=50, dtype=F32)
    i = 29
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, i + 1:] = rand(2, 3, 20, 16, seed=5, scale=8.0, dtype=F32)
    k2[:, :, i + 1:] = rand(2, 3, 20, 16, seed=6, scale=8.0, dtype=F32)
    v2[:, :, i + 1:] = 1e6
    for chunk, scan in ((8, "loop"), (8, "matmul"), (64, "loop")):
        kw = {"kernel": kernel, "causal": True, "chunk_size": chunk, "blocking": Blocking(span=16, scan=scan)}
        a, b = favor_attention(q, k, v, w, **kw), favor_attention(q2, k2, v2, w, **kw)
        assert torch.equal(a[:, :, : i + 1], b[:, :, : i + 1])


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
    # positions shift, values do not (float64 round-off)
    torch.testing.assert_close(out[:, :, 6:], favor_attention(q, k, v, w, causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_without_real_keys_get_zero_not_nan_gradients(causal):
    # float32, upstream gradients of 1e3: where D is clamped (no real key), 1 / D ~ 1e38 would overflow to inf
    w = projection(32, 16)
    q, k, v = qkv(length=24, dtype=F32, requires_grad=True)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1] = False  # the second sequence is all padding
    out = favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask, chunk_size=8)
    grads = torch.autograd.grad(out, (q, k, v), torch.full_like(out, 1e3))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for g in grads:
        assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1]))


def test_exact_softmax_attention_matches_naive():
    q, k, v = qkv(length=33)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1, 25:] = False
    for causal in (False, True):
        out = softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
        ref = naive_softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", [*KINDS, ("exact", False)])
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


# ---- statistics: convergence, Lemma 2, Fig. 4 ------------------------------------------------------------------------

def test_converges_to_exact_softmax_as_m_grows():
    q, k, v = qkv(b=1, h=1, length=128, scale=0.5)
    exact = softmax_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        mse = [((favor_attention(q, k, v, projection(m, 16, seed=s)) - exact) ** 2).mean() for s in range(4)]
        errors.append(torch.stack(mse).mean().item())
    # MSE ~ 1/m: each 4x increase of m cuts the error, 64x more features at least 15x (expected ~64x; 15x leaves
    # room for the 4-draw average's noise)
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0] / 15, errors


def test_positive_estimator_mse_matches_lemma_2():
    # Lemma 2: MSE_pos = (1/m) exp(|x+y|^2) SM^2 (1 - exp(-|x+y|^2)) for IID Gaussian w, SM = exp(x.y)
    d, m, draws = 4, 16, 20_000
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)
    y = torch.tensor([-0.4, 0.1, 0.2, 0.3], dtype=F64)
    w = torch.randn(draws, m, d, generator=g, dtype=F64)
    fx = torch.exp(w @ x - (x @ x) / 2) / math.sqrt(m)  # (draws, m): phi(x) without the d^-1/4 scaling,
    fy = torch.exp(w @ y - (y @ y) / 2) / math.sqrt(m)  # so that phi(x) . phi(y) estimates exp(x . y)
    estimate = (fx * fy).sum(-1)
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
    # Paper Fig. 4, L = 4096, d = 16. Orthogonal < IID for both estimators on moderate inputs (q, k ~ N(0, 0.5^2));
    # on N(0, 1) inputs the trig estimator's signed denominator collapses and positive features win by > 10x.
    for kernel in ("softmax", "trig"):
        assert _fig4_mse(kernel, True, 0.5, 64, 8) < _fig4_mse(kernel, False, 0.5, 64, 8)
    assert 10 * _fig4_mse("softmax", True, 1.0, 64, 4) < _fig4_mse("trig", True, 1.0, 64, 4)


# ---- precision ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_bf16_autocast_is_finite_and_close(causal):
    lin = torch.nn.Linear(16, 48)
    x = rand(2, 40, 16, dtype=F32)
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
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kernel,projected", [("softmax", True), ("relu", True), ("relu", False)])
@pytest.mark.parametrize("cpu_kernels_on", [True, False])
def test_bf16_products_against_float32(causal, padded, kernel, projected, cpu_kernels_on, monkeypatch):
    # The bf16 path (autocast: bf16 operands in the big products, float32 exponents, maxima and carried sums)
    # against the float32 path on the same float32 inputs, at the measured scale: d = 64, m = 256,
    # q, k ~ N(0, 0.5^2). Measured (L = 300, 1000 and 4099, both directions): relative norm error of the output
    # <= 6.0e-3, of dq, dk, dv <= 1.3e-2 (softmax, relu without projection) and <= 3.0e-2 (relu with projection:
    # its derivative is a step, and logits within bf16 round-off of 0 flip it); largest element error <= 2.3e-2
    # of the largest element (softmax), <= 0.16 for relu's gradients (the same flips). Bounds: about 3x (outputs)
    # and 2-2.5x (gradients) the measurement; L = 300 is not a multiple of 512 or 64. With and without the fused CPU
    # kernels (bf16 feature buffers, or float32 ones and torch's operators, as where they cannot be built).
    if not cpu_kernels_on:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    w = projection(256, 64, dtype=F32) if projected else None
    q, k = (rand(1, 2, 300, 64, seed=s, scale=0.5, dtype=F32, requires_grad=True) for s in (1, 2))
    v = rand(1, 2, 300, 64, seed=3, dtype=F32, requires_grad=True)
    dy = rand(1, 2, 300, 64, seed=4, dtype=F32)
    mask = mask_for(1, 300, causal) if padded else None
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, key_padding_mask=mask)
        assert out.dtype == F32  # float32 inputs: float32 output, also under autocast
        results.append((out, *torch.autograd.grad(out, (q, k, v), dy)))
    real = slice(None) if mask is None else mask[0]
    step = kernel == "relu" and projected
    for i, (a, b) in enumerate(zip(*results)):
        a, b = (a[:, :, real], b[:, :, real]) if i == 0 else (a, b)
        assert ((a - b).norm() / b.norm()).item() < (2e-2 if i == 0 else 6e-2 if step else 3e-2)
        assert ((a - b).abs().max() / b.abs().max()).item() < (5e-2 if i == 0 or kernel == "softmax" else 0.4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,projected", [("softmax", True), ("relu", False)])
def test_backward_inside_autocast_keeps_the_forward_precision(kernel, projected, causal):
    # loss.backward() inside an autocast region after a float32 forward: the backward runs in float32 too
    w = projection(32, 16) if projected else None
    q, k, v = qkv(length=40, dtype=F32, requires_grad=True)
    dy = rand(2, 3, 40, 16, seed=9, dtype=F32)
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=16)
    ref = torch.autograd.grad(out, (q, k, v), dy)
    out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(out, (q, k, v), dy)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


# ---- device hygiene --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", ["loop", "matmul"])
def test_functions_read_no_values_and_stay_on_the_inputs_device(scan):
    # On the meta device a value read (.item(), bool(tensor), nonzero: a host-device sync on CUDA) raises, and so
    # does an op that mixes in a tensor created on the CPU: forward, backward and decoding run without either.
    w = projection(32, 16, dtype=F32).to("meta")
    q, k, v = (torch.empty(2, 3, 70, 16, device="meta", requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 70, dtype=torch.bool, device="meta")
    for causal in (False, True):
        out = favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask, chunk_size=16,
                              blocking=Blocking(block=16, span=32, scan=scan))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert out.device.type == "meta" and all(g.device.type == "meta" for g in grads)
    _, state = favor_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], w, causal=True, output_final_state=True)
    out, state = favor_attention(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6], w,
                                 causal=True, initial_state=state, output_final_state=True)
    assert state.kv.device.type == "meta"
    with pytest.raises(RuntimeError):  # the premise: a value read on meta raises
        bool(mask.any())


# ---- benchmarks/feature_error.py (the paper's Fig. 4) ----------------------------------------------------------------

def test_feature_error_script_smoke(tmp_path, monkeypatch, capsys):
    import csv
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # the script imports results_io as a sibling
    spec = importlib.util.spec_from_file_location("feature_error", bench / "feature_error.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--length", "64", "--draws", "2", "--nb_features", "16", "32", "--norms", "1", "--out", str(tmp_path)])
    with open(tmp_path / "feature_error.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(float(r["mse_mean"]) > 0 for r in rows)  # 4 estimators x 2 values of m
    assert (tmp_path / "feature_error.png").stat().st_size > 0 and (tmp_path / "feature_error.machine.json").exists()
    printed = capsys.readouterr().out
    assert "orthogonal < IID" in printed and "positive < trig" in printed
