"""The protein LM: every attention kind learns, causality, padding, presets, attention maps."""

import pytest
import torch
import torch.nn.functional as F

from protein_performer import vocab
from protein_performer.attention import FavorAttention
from protein_performer.attention.naive import linear_attention, naive_softmax_attention, plain_softmax_features
from protein_performer.layers import Dropout, FeedForward
from protein_performer.model import ATTENTION_KINDS, PRESETS, Config, ProteinLM

VARIANTS = [(a, c) for a in ATTENTION_KINDS for c in (False, True)]


def tiny(attention, causal, **kw):
    torch.manual_seed(0)
    return ProteinLM(Config.from_name("tiny", attention=attention, causal=causal, dropout=0.0, **kw))


def batch(b=4, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab.NUM_AMINO_ACIDS, (b, length), generator=g)


@pytest.mark.parametrize("attention,causal", VARIANTS)
def test_every_variant_lowers_its_loss(attention, causal):
    model = tiny(attention, causal)
    tokens = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        if causal:  # next-token prediction
            logits = model(tokens[:, :-1])["logits"]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        else:  # masked LM on a fixed 15% of positions
            sel = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.15
            logits = model(tokens.masked_fill(sel, vocab.MASK))["logits"]
            loss = torch.nn.functional.cross_entropy(logits[sel], tokens[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a tiny batch is memorised quickly: 8 steps must remove well over 10% of the initial loss (~ln 29)
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_causal_logits_ignore_later_tokens(attention):
    model = tiny(attention, True).eval()
    tokens = batch(b=2, length=70)  # 70: not a multiple of the causal chunk (64)
    changed = tokens.clone()
    changed[:, 45:] = (changed[:, 45:] + 7) % vocab.NUM_AMINO_ACIDS
    a, b = model(tokens)["logits"], model(changed)["logits"]
    torch.testing.assert_close(a[:, :45], b[:, :45], rtol=0, atol=1e-6)  # float32 round-off at most
    assert not torch.allclose(a[:, 45:], b[:, 45:])


@pytest.mark.parametrize("attention,causal", VARIANTS)
def test_appended_padding_leaves_real_logits_unchanged(attention, causal):
    model = tiny(attention, causal).eval()
    tokens = batch(b=2, length=30)
    padded = torch.cat([tokens, torch.full((2, 10), vocab.PAD)], 1)
    mask = padded != vocab.PAD
    a = model(tokens)["logits"]
    b = model(padded, mask)["logits"][:, :30]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # float32 round-off of longer reductions


def test_presets_and_paper_parameter_count():
    with torch.device("meta"):  # 76 M parameters, no allocation
        model = ProteinLM(Config.from_name("paper-36l"))
    assert 75e6 < model.num_parameters() < 77e6
    assert set(PRESETS) >= {"paper-36l", "paper-concat-6l", "paper-concat-transformer", "tiny"}
    assert Config.from_name("paper-concat-6l").max_len == 8192


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown attention kind 'performer'"):
        Config.from_name("tiny", attention="performer")
    with pytest.raises(ValueError, match="unknown model preset"):
        Config.from_name("huge")
    with pytest.raises(ValueError, match="not divisible"):
        Config(d_model=100, n_heads=8)
    model = tiny("favor-relu", False)
    with pytest.raises(ValueError, match="exceeds the model's max_len 512"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_forward_returns_representations_and_qk():
    model = tiny("favor-softmax", False)
    out = model(batch(b=2, length=16), repr_layers=(0, 1, 2), return_qk=True)
    assert out["logits"].shape == (2, 16, vocab.VOCAB_SIZE)
    assert sorted(out["representations"]) == [0, 1, 2]
    assert out["representations"][2].shape == (2, 16, 64)
    q, k = out["qk"][0]
    assert q.shape == k.shape == (2, 4, 16, 16)


@pytest.mark.parametrize("attention,causal", VARIANTS)
def test_attention_maps_are_normalised(attention, causal):
    model = tiny(attention, causal).eval()
    tokens = batch(b=1, length=25)
    maps = model.attention_maps(tokens)
    assert maps.shape == (2, 1, 4, 25, 25)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 4, 25))
    if causal:
        assert torch.equal(maps, maps.tril())


def test_redraw_is_identical_across_model_copies_and_checkpointed():
    a, b = tiny("favor-softmax", False), tiny("favor-softmax", False)
    a.redraw_features(11)
    assert not torch.equal(a.blocks[0].attn.core.projection, b.blocks[0].attn.core.projection)
    b.redraw_features(11)
    for la, lb in zip(a.blocks, b.blocks):
        assert torch.equal(la.attn.core.projection, lb.attn.core.projection)
    assert not torch.equal(a.blocks[0].attn.core.projection, a.blocks[1].attn.core.projection)  # per layer
    c = tiny("favor-softmax", False)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.blocks[1].attn.core.projection, a.blocks[1].attn.core.projection)
    assert isinstance(a.blocks[0].attn.core, FavorAttention)


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_activation_checkpointing_gives_the_same_gradients(attention):
    tokens = batch(b=2, length=33)
    grads = []
    for ckpt in (False, True):
        model = tiny(attention, True, activation_checkpointing=ckpt).train()
        model(tokens)["logits"].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)  # same ops recomputed: round-off only


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_decode_with_cache_equals_full_forward(attention):
    model = tiny(attention, True).eval()
    tokens = batch(b=2, length=90)
    full = model(tokens)["logits"]
    logits, cache = model.decode(tokens[:, :70])  # prompt, then token by token
    steps = [logits]
    for i in range(70, 90):
        logits, cache = model.decode(tokens[:, i:i + 1], cache)
        steps.append(logits)
    assert cache.length == 90
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)  # float32 round-off
    with pytest.raises(ValueError, match="needs a causal model"):
        tiny(attention, False).decode(tokens)
    with pytest.raises(ValueError, match="beyond the model's max_len 512"):
        model.decode(batch(b=1, length=10), type(cache)([None] * 2, 505))


def test_feed_forward_matches_autograd_and_stores_one_hidden_activation():
    # values and gradients against linear(gelu(linear(x))) in plain autograd, float64 (round-off only); 13 rows and
    # odd widths, then a finite-difference check
    gen = torch.Generator().manual_seed(0)
    x, w1, b1, w2, b2 = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                         for shape in ((13, 6), (11, 6), (11,), (6, 11), (6,)))
    dy = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    args = (x, w1, b1, w2, b2)
    out = FeedForward.apply(*args)
    ref = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad(out, args, dy), torch.autograd.grad(ref, args, dy)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(FeedForward.apply, (x[:3], w1, b1, w2, b2))
    # autograd keeps x and the hidden layer before GELU only (the GELU output is recomputed)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        FeedForward.apply(*args)
    assert sorted(saved) == sorted([x.shape, (13, 11), w1.shape, w2.shape])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlp_and_attention_projection_match_torch_layers(precision):
    # The MLP (one FeedForward) and the split of the packed q, k, v (SplitHeads) against torch's own layers, the
    # way the model used them before: values and gradients equal to float32 round-off; under bf16 autocast to
    # within bf16 rounding of the same products (products of 2^-8-rounded operands: a few 1e-2 after ~40 sums)
    torch.manual_seed(0)
    model = tiny("favor-relu", False)
    block = model.blocks[0]
    x = torch.randn(3, 37, 64, requires_grad=True)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")

    def reference(x):
        mlp, attn = block.mlp, block.attn
        h = F.linear(F.gelu(F.linear(x, mlp.fc.weight, mlp.fc.bias)), mlp.proj.weight, mlp.proj.bias)
        q, k, v = attn.qkv(x).view(3, 37, 3, 4, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return h, q, k, v

    def ours(x):
        return (block.mlp(x), *block.attn.project(x))

    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=3e-2, atol=3e-2)
    block.eval()  # no dropout
    with autocast:
        got, want = ours(x), reference(x)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), **tol)
    params = [x, *block.mlp.parameters(), block.attn.qkv.weight]
    grads = [torch.randn(3, 37, 64)] + [torch.randn(3, 4, 37, 16) for _ in range(3)]
    dg = torch.autograd.grad([t.float() for t in got], params, grads)
    dw = torch.autograd.grad([t.float() for t in want], params, grads)
    for g, w in zip(dg, dw):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_each_element_with_probability_1_minus_p(dtype):
    # The reference is the definition of (inverted) dropout: each element kept independently with probability
    # 1 - p and scaled by 1 / (1 - p). 4 x 30,001 elements (not a multiple of 4, so a lane is cut at the end).
    torch.manual_seed(0)
    p, drop = 0.1, Dropout(0.1).train()
    x = (torch.rand(4, 30001, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    torch.manual_seed(1)
    y = drop(x)
    keep = y != 0  # x > 0, so only dropped elements are 0
    assert y.dtype == dtype
    # every kept element is x / (1 - p') for the rounded p' = round(p 2^15) / 2^15 (|p' - p| <= 2^-16)
    scale = 2**15 / (2**15 - round(p * 2**15))
    assert abs(scale - 1 / (1 - p)) < 1e-4
    torch.testing.assert_close(y[keep], x[keep] * scale, rtol=0, atol=0)  # the same product: no round-off
    # kept fraction within 5 binomial standard deviations of 1 - p, overall and for each of the 4 lanes of a
    # 64-bit draw (the top lane's sign bit is always 0: its 15 low bits must be as uniform as the others')
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    lanes = keep.flatten()[: n - n % 4].view(-1, 4).double().mean(0)
    assert ((lanes - (1 - p)).abs() < 5 * (p * (1 - p) / (n // 4)) ** 0.5).all()
    # backward passes the gradient through the same mask and scale
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, keep.to(dtype) * scale, rtol=0, atol=0)
    # seeded: the same seed draws the same mask; eval mode and p = 0 are the identity
    torch.manual_seed(1)
    assert torch.equal(drop(x) != 0, keep)
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x


def test_bf16_autocast_training_step_is_finite():
    model = tiny("favor-softmax", causal=False)
    tokens = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)["logits"]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters()
               if p.grad is not None)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_self_attention_layer_equals_its_naive_formula(attention, causal):
    # the layer wires each attention kind to the right formula: exact softmax, FAVOR with positive softmax
    # features of its own projection, or the deterministic relu(x) + 1e-3 map; float64, round-off only
    torch.manual_seed(0)
    model = ProteinLM(Config.from_name("tiny", attention=attention, causal=causal, dropout=0.0)).double().eval()
    layer = model.blocks[0].attn
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 22:] = False
    q, k, v = layer.project(x)
    if attention == "exact":
        y = naive_softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
    elif attention == "favor-softmax":
        w = layer.core.projection
        y = linear_attention(plain_softmax_features(q, w), plain_softmax_features(k, w), v, causal=causal,
                             key_padding_mask=mask)
    else:
        y = linear_attention(torch.relu(q) + 1e-3, torch.relu(k) + 1e-3, v, causal=causal, key_padding_mask=mask)
    expected = layer.out(y.transpose(1, 2).flatten(2))
    out, _ = layer(x, mask)
    real = mask[..., None]
    torch.testing.assert_close(out * real, expected * real, rtol=1e-10, atol=1e-12)
