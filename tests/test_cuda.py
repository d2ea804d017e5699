"""GPU checks: skipped without CUDA, run by benchmarks/gpu_check.sh on a GPU machine.

On CUDA the FAVOR Functions take the GPU blocking (blocking_for: whole-sequence blocks where a buffer fits, spans
of 4096 rows, the matmul scan); these tests hold it to the CPU path, the naive references and the bf16 bounds."""

import pytest
import torch

from protein_performer import vocab
from protein_performer.attention import (
    Blocking,
    favor_attention,
    orthogonal_gaussian_matrix,
    softmax_attention,
)
from protein_performer.attention.blocking import blocking_for
from protein_performer.attention.naive import linear_attention, plain_softmax_features
from protein_performer.layers import Dropout
from protein_performer.model import ATTENTION_KINDS, Config, ProteinLM

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_blocking_is_whole_sequence_and_matmul_scan():
    q = torch.empty(1, 8, 8192, 64, device="cuda")
    plan = blocking_for(q, 256)
    assert plan.block == 8192 and plan.scan == "matmul"


def test_favor_matches_cpu_and_exact_on_gpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5000, 32, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    w = orthogonal_gaussian_matrix(1024, 32, generator=g, dtype=torch.float64)
    for causal in (False, True):  # 5000 rows: two causal spans of 4096 on the GPU, ten blocks of 512 on the CPU
        gpu = favor_attention(q.cuda(), k.cuda(), v.cuda(), w.cuda(), causal=causal).cpu()
        cpu = favor_attention(q, k, v, w, causal=causal)
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-11)  # float64: kernel round-off only
        exact = softmax_attention(q, k, v, causal=causal)
        # 1024 features on inputs of scale 0.3: FAVOR's estimate is within a few percent of softmax
        assert (gpu - exact).abs().mean() < 0.05 * exact.abs().mean()


@pytest.mark.parametrize("scan", ["loop", "matmul"])
def test_causal_equals_naive_on_gpu_float32(scan):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 333, 16, generator=g).cuda().requires_grad_() for _ in range(3))
    w = orthogonal_gaussian_matrix(64, 16, generator=g).cuda()
    out = favor_attention(q, k, v, w, causal=True, chunk_size=64, blocking=Blocking(span=128, scan=scan))
    ref = linear_attention(plain_softmax_features(q, w), plain_softmax_features(k, w), v, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # float32 round-off
    gr = torch.autograd.grad(out.sum(), (q, k, v))
    gn = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(gr, gn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 sums over 333 positions


def test_dropout_on_gpu_keeps_1_minus_p_and_scales():
    # On CUDA Dropout is torch's fused kernel: each element kept with probability 1 - p, scaled by 1 / (1 - p)
    torch.manual_seed(0)
    x = torch.rand(4, 30001, device="cuda").add_(0.5).requires_grad_()
    y = Dropout(0.1).train()(x)
    keep = y != 0
    n = keep.numel()
    assert abs(keep.double().mean().item() - 0.9) < 5 * (0.1 * 0.9 / n) ** 0.5  # 5 binomial standard deviations
    torch.testing.assert_close(y[keep], x[keep] / 0.9)  # float32 round-off of the scaling
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, keep.float() / 0.9)


def test_no_host_device_sync_in_forward_backward_and_decode():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 3000, 64, generator=g).cuda().requires_grad_() for _ in range(3))
    w = orthogonal_gaussian_matrix(256, 64, generator=g).cuda()
    mask = torch.ones(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 2000:] = False
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for causal in (False, True):
            out = favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask)
            torch.autograd.grad(out.sum(), (q, k, v))
        with torch.no_grad():
            _, state = favor_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], w,
                                       causal=True, output_final_state=True)
            favor_attention(q[:, :, 100:101], k[:, :, 100:101], v[:, :, 100:101], w,
                            causal=True, initial_state=state, output_final_state=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_decode_equals_full_causal_on_gpu():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g, dtype=torch.float64).cuda() * 0.5 for _ in range(3))
    w = orthogonal_gaussian_matrix(128, 32, generator=g, dtype=torch.float64).cuda()
    full = favor_attention(q, k, v, w, causal=True)
    out, state = favor_attention(q[:, :, :250], k[:, :, :250], v[:, :, :250], w, causal=True, output_final_state=True)
    outs = [out]
    for t in range(250, 300):
        out, state = favor_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], w,
                                     causal=True, initial_state=state, output_final_state=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-10)  # float64 round-off


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_products_against_float32_on_gpu(causal):
    # the bounds of tests/test_attention.py::test_bf16_products_against_float32 (measured on the CPU path)
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 8, 4099, 64, generator=g).mul_(0.5).cuda().requires_grad_() for _ in range(2))
    v = torch.randn(1, 8, 4099, 64, generator=g).cuda().requires_grad_()
    dy = torch.randn(1, 8, 4099, 64, generator=g).cuda()
    w = orthogonal_gaussian_matrix(256, 64, generator=g).cuda()
    results = []
    for bf16 in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = favor_attention(q, k, v, w, causal=causal)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dy)))
    for i, (a, b) in enumerate(zip(*results)):
        assert ((a - b).norm() / b.norm()).item() < (2e-2 if i == 0 else 3e-2)
        assert ((a - b).abs().max() / b.abs().max()).item() < 5e-2


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
