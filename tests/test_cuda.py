"""GPU checks: skipped without CUDA, run by benchmarks/gpu_check.sh on a GPU machine."""

import pytest
import torch

from protein_performer import vocab
from protein_performer.attention import favor_attention, orthogonal_gaussian_matrix, softmax_attention
from protein_performer.attention.naive import linear_attention, plain_softmax_features
from protein_performer.model import ATTENTION_KINDS, Config, ProteinLM

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_favor_matches_cpu_and_exact_on_gpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 32, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    w = orthogonal_gaussian_matrix(4096, 32, generator=g, dtype=torch.float64)
    for causal in (False, True):
        gpu = favor_attention(q.cuda(), k.cuda(), v.cuda(), w.cuda(), causal=causal).cpu()
        cpu = favor_attention(q, k, v, w, causal=causal)
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-11)  # float64: kernel round-off only
        exact = softmax_attention(q, k, v, causal=causal)
        # 4096 features on inputs of scale 0.3: FAVOR's estimate is within a few percent of softmax
        assert (gpu - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_causal_chunked_equals_naive_on_gpu_float32():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 333, 16, generator=g).cuda().requires_grad_() for _ in range(3))
    w = orthogonal_gaussian_matrix(64, 16, generator=g).cuda()
    out = favor_attention(q, k, v, w, causal=True, chunk_size=64)
    ref = linear_attention(plain_softmax_features(q, w), plain_softmax_features(k, w), v, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the float32 tolerance
    gr = torch.autograd.grad(out.sum(), (q, k, v))
    gn = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(gr, gn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 sums over 333 positions


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_training_steps_lower_the_loss(attention, causal):
    torch.manual_seed(0)
    model = ProteinLM(Config.from_name("tiny", attention=attention, causal=causal, dropout=0.0)).cuda()
    tokens = torch.randint(0, vocab.NUM_AMINO_ACIDS, (4, 256), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert torch.isfinite(loss)
    assert losses[-1] < 0.9 * losses[0], losses  # memorising a fixed batch: 10 steps remove >10%
