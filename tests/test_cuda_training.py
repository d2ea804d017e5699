"""GPU checks of the training path: skipped without CUDA, run by benchmarks/gpu_check.sh on a GPU machine."""

import pytest
import torch

from protein_performer import vocab
from protein_performer.model import ATTENTION_KINDS, Config, ProteinLM
from protein_performer.training.lightning_cli import auto_precision
from protein_performer.training.metrics import target_stats

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_a_training_step_never_waits_for_the_device(attention, padded):
    """Forward, loss, backward and the optimiser step of a bf16 training step with CUDA's sync debug mode set to
    raise: any host-device synchronisation (.item(), bool(tensor), nonzero, a data-dependent shape) fails."""
    torch.manual_seed(0)
    model = ProteinLM(Config.from_name("tiny", attention=attention, dropout=0.0)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab.NUM_AMINO_ACIDS, (4, 192), device="cuda")
    targets = torch.where(torch.rand(4, 192, device="cuda") < 0.15, tokens, -100)
    mask = None
    if padded:
        mask = torch.ones(4, 192, dtype=torch.bool, device="cuda")
        mask[1, 150:] = False
    for _ in range(2):  # the first step allocates and compiles; the second must be clean too
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ce, correct, selected = target_stats(model(tokens, mask)["logits"], targets)
                loss = ce.sum() / selected.sum().clamp(min=1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_precision_null_picks_bf16_on_a_bf16_gpu():
    precision, reason = auto_precision("auto")
    assert precision == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"), reason
