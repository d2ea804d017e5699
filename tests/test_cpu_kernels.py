"""The fused CPU kernels (protein_performer/cpu_kernels.cpp) against their references: torch's operators and float64,
over sizes that are not multiples of their 16-float vectors; the slots they write; their input checks; and FAVOR and
the MLP with and without them."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from protein_performer import cpu_kernels
from protein_performer.attention import favor_attention, orthogonal_gaussian_matrix
from protein_performer.layers import FeedForward

BF16 = torch.bfloat16
ULP = 2.0**-7  # one bf16 unit in the last place, relative: 8 significant bits
HALF_ULP = 2.0**-8  # round-to-nearest's largest relative error in bf16


@pytest.fixture(scope="module")
def kernels():
    if os.environ.get(cpu_kernels.ENV) == "0":
        pytest.skip(f"{cpu_kernels.ENV}=0")
    built = cpu_kernels.load()
    if built is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler: the kernels cannot be built here")
        pytest.fail("the fused CPU kernels did not build on a machine with a C++ compiler (see the warning)")
    return built


def operators_run(fn):
    """fn's result and the names of the operators it ran (the kernels are torch operators: the profiler sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events()}


def bf16_randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(BF16)


@pytest.mark.parametrize("m", [16, 37, 256])
@pytest.mark.parametrize("find_max", [True, False])
def test_exp2_rows_against_torch(kernels, m, find_max):
    # FAVOR's softmax features: exp2(logit - shift) per row, with the row maxima found and written into a strided
    # (B, H, C) slice of a (B, H, L) array, or a given shift at or above each row's maximum (the keys' offsets).
    # Maxima: equal. Values: the kernel's exp2 (relative error 2.3e-7 in float32) against torch's, each rounded
    # once to bf16: within one bf16 ulp, and different in under 1% of the elements (a float32 error of 2.3e-7
    # crosses a rounding boundary for about 2.3e-7 / 2^-8 = 6e-5 of them; the bound leaves room).
    logits = bf16_randn(2, 3, 21, m, seed=m, scale=6.0)
    rows_max = logits.float().amax(-1)
    store = torch.full((2, 3, 50), float("nan"))
    shift = store[:, :, 7:28]
    if not find_max:
        shift.copy_(rows_max + torch.rand(2, 3, 21, generator=torch.Generator().manual_seed(1)) * 3)
    given = shift.clone()
    out = logits.clone()
    kernels.exp2_rows(out, shift.view(-1, 21), find_max)
    if find_max:
        torch.testing.assert_close(shift, rows_max, rtol=0, atol=0)
    else:
        torch.testing.assert_close(shift, given, rtol=0, atol=0)
    assert store[:, :, :7].isnan().all() and store[:, :, 28:].isnan().all()  # only the slice's slots written
    ref = torch.exp2(logits.float() - shift[..., None]).to(BF16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=ULP, atol=1e-37)
    assert (out != ref).float().mean().item() < 1e-2


def test_exp2_rows_flushes_padded_keys_and_underflow_to_zero(kernels):
    # padded keys' offset (features.PAD_OFFSET) and exponents below -126 give exact zeros, no NaN or subnormal
    logits = bf16_randn(4, 40, seed=2, scale=3.0)
    shift = torch.tensor([[1e30, 200.0, 0.0, 1e30]])
    out = logits.clone()
    kernels.exp2_rows(out, shift, False)
    assert (out[[0, 1, 3]] == 0).all() and (out[2] > 0).all()


def test_max_rows_and_relu_eps_equal_torch(kernels):
    # a maximum and relu(x) + eps (one rounding to bf16, as torch's bf16 add rounds once): exactly torch's values
    logits = bf16_randn(5, 7, 33, seed=3)
    top = torch.empty(5, 7)
    kernels.max_rows(logits, top)
    torch.testing.assert_close(top, logits.float().amax(-1), rtol=0, atol=0)
    out = logits.clone()
    kernels.relu_eps(out, 1e-3)
    torch.testing.assert_close(out, logits.relu() + 1e-3, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 15, 16, 1000, 4099])
def test_gelu_and_grad_against_float64(kernels, n):
    # gelu(h) and g * gelu'(h) from bf16 h and g, against float64 on the same inputs: within bf16's rounding
    # (half an ulp, relative) plus the kernel's own error, absolute where values are tiny (erfc's tail) or cross
    # zero (gelu' at h = -0.75): at most 3.5e-10 beyond the rounding over 2 M samples, so atol = 1e-8. torch's bf16
    # gelu loses up to 17% of tiny negative values to 1 - erf(x) (measured over h in [-12, 12]); this does not.
    h, g = bf16_randn(n, seed=n, scale=4.0), bf16_randn(n, seed=n + 1)
    out, grad = torch.empty_like(h), g.clone()
    kernels.gelu_and_grad(h, out, grad)
    gelu64 = F.gelu(h.double())
    grad64 = torch.ops.aten.gelu_backward(g.double(), h.double())
    torch.testing.assert_close(out.double(), gelu64, rtol=HALF_ULP * 1.01, atol=1e-8)
    torch.testing.assert_close(grad.double(), grad64, rtol=HALF_ULP * 1.01, atol=1e-8)


def test_cpu_kernels_reject_what_they_cannot_read(kernels):
    h = bf16_randn(8, 16)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        kernels.gelu_and_grad(h.float(), torch.empty_like(h), h.clone())
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        kernels.exp2_rows(h.t(), torch.zeros(1, 16), True)
    with pytest.raises(RuntimeError, match="one per row"):
        kernels.exp2_rows(h, torch.zeros(2, 8)[:, :7], True)
    with pytest.raises(RuntimeError, match="elements, expected"):
        kernels.gelu_and_grad(h, torch.empty(8, 15, dtype=BF16), h.clone())


def favor_bf16(causal, kernel, padded):
    """Output and q, k, v gradients of bf16 FAVOR at L = 300 (not a multiple of the 512-row block, the 256- and
    512-row spans or the 64-row chunk), d = 64, m = 256."""
    gen = torch.Generator().manual_seed(0)
    w = orthogonal_gaussian_matrix(256, 64, generator=gen) if kernel == "softmax" else None
    q, k, v = (torch.randn(2, 2, 300, 64, generator=gen).mul(0.5).requires_grad_() for _ in range(3))
    mask = torch.arange(300) < torch.tensor([[300], [241]]) if padded else None
    with torch.autocast("cpu", BF16):
        out = favor_attention(q, k, v, w, kernel=kernel, causal=causal, key_padding_mask=mask)
    return (out, *torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=gen)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel,padded", [("softmax", False), ("softmax", True), ("relu", True)])
def test_favor_with_kernels_against_its_torch_reference(kernels, monkeypatch, causal, kernel, padded):
    # The bf16 Functions with bf16 feature buffers (the kernels) against float32 buffers (torch's operators): the
    # same bf16 logits, and features that differ by at most one bf16 ulp in rare elements (above), so outputs and
    # gradients agree to bf16 rounding of the sums they enter. Relative norm error measured: softmax <= 1.1e-4
    # (outputs) and <= 1.8e-4 (gradients); relu 0 (its kernel rounds as torch does). Bounds: about 5x.
    fused, ran = operators_run(lambda: favor_bf16(causal, kernel, padded))
    expected = {"exp2_rows", "max_rows"} if kernel == "softmax" else {"relu_eps"}
    assert {f"protein_performer::{op}" for op in expected} <= ran
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    reference, ran = operators_run(lambda: favor_bf16(causal, kernel, padded))
    assert not any(name.startswith("protein_performer::") for name in ran)
    for i, (a, b) in enumerate(zip(fused, reference)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < (5e-4 if i == 0 else 1e-3)


def test_feed_forward_with_the_kernel_against_torch_gelu(kernels):
    # FeedForward in bf16 with the fused GELU backward against torch's gelu and gelu_backward: values equal (the
    # forward is torch's either way), gradients within bf16 rounding of the products the GELU values enter. The two
    # GELUs differ by an ulp in a fifth of the elements here, almost all tiny negative values where torch loses
    # digits (above), and the gradients measured equal; the bound allows an ulp in the sums (2^-8 relative).
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, generator=gen).to(BF16).requires_grad_()
            for shape in ((67, 24), (70, 24), (70,), (24, 70), (24,))]
    dy = torch.randn(67, 24, generator=gen).to(BF16)
    results = []
    for use in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not use:
                patch.setattr(cpu_kernels, "load", lambda: None)
            out = FeedForward.apply(*args)
            grads, ran = operators_run(lambda out=out: torch.autograd.grad(out, args, dy))
            assert ("protein_performer::gelu_and_grad" in ran) == use
            results.append((out, *grads))
    for i, (a, b) in enumerate(zip(*results)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < (1e-12 if i == 0 else 2**-8)


def test_without_a_compiler_a_warning_says_why_and_torch_runs(tmp_path):
    # a machine without a working C++ compiler (CXX pointing nowhere, an empty extension cache): one warning with
    # the cause and the switch, load() gives None, and bf16 FAVOR runs on torch's operators
    script = ("import torch\n"
              "from protein_performer import cpu_kernels\n"
              "from protein_performer.attention import favor_attention\n"
              "assert cpu_kernels.load() is None and cpu_kernels.state() == 'unavailable'\n"
              "q = torch.randn(1, 2, 50, 16)\n"
              "with torch.autocast('cpu', torch.bfloat16):\n"
              "    assert favor_attention(q, q, q, None, kernel='relu').isfinite().all()\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop(cpu_kernels.ENV, None)
    done = subprocess.run([sys.executable, "-W", "always", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    warning = [line for line in done.stderr.splitlines() if "fused CPU kernels could not be built" in line]
    assert len(warning) == 1 and "RuntimeError" in warning[0] and cpu_kernels.ENV in warning[0]
