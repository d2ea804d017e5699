"""Loss, accuracy and perplexity of a language model over the positions that carry a target, beside the
unigram baseline (docs/paper_notes.md section 1: Laplace-smoothed frequencies of the training split)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from .. import vocab
from ..masking import IGNORE


def target_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy and correctness (both 0 where targets == IGNORE) and the target mask, (B, L)
    each. No boolean indexing: shapes stay fixed, so nothing waits for the device (no host sync)."""
    selected = targets != IGNORE
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    correct = (logits.argmax(-1) == targets) & selected
    return ce.view_as(targets), correct, selected


def unigram_log_probs(counts: torch.Tensor, eos: bool = False) -> torch.Tensor:
    """Laplace (alpha = 1) unigram log-probabilities over the ids that can be targets.

    Targets are the 25 letters, plus EOS when it is one (causal training on the concatenated stream predicts
    the end of each protein); other ids get probability 0 (log-prob -inf).
    """
    support = torch.zeros(vocab.VOCAB_SIZE, dtype=torch.bool, device=counts.device)
    support[: len(vocab.LETTERS)] = True
    support[vocab.EOS] = eos
    smoothed = torch.where(support, counts.double() + 1.0, torch.zeros((), dtype=torch.float64, device=counts.device))
    return (smoothed / smoothed.sum()).log()


class LMMetrics(nn.Module):
    """Token-weighted sums of one evaluated split, synchronised over DDP ranks by torchmetrics.

    perplexity = exp(sum CE / tokens), accuracy = correct / tokens, and the same for the unigram baseline
    on the same target positions. NaN is never dropped (nan_strategy="disable"): a diverged model reports
    NaN, not a perfect score; a split with no target reports NaN too.
    """

    NAMES = ("ce", "correct", "tokens", "baseline_ce", "baseline_correct")

    def __init__(self):
        super().__init__()
        self.sums = nn.ModuleDict({n: SumMetric(nan_strategy="disable").set_dtype(torch.float64) for n in self.NAMES})

    def update(self, logits: torch.Tensor, targets: torch.Tensor, unigram_log_probs: torch.Tensor) -> None:
        ce, correct, selected = target_stats(logits, targets)
        safe = targets.clamp(min=0)  # IGNORE positions index 0, then count 0
        baseline_ce = torch.where(selected, -unigram_log_probs[safe], 0.0)
        values = {"ce": ce.sum(), "correct": correct.sum(), "tokens": selected.sum(), "baseline_ce": baseline_ce.sum(),
                  "baseline_correct": ((targets == unigram_log_probs.argmax()) & selected).sum()}
        for name, value in values.items():
            self.sums[name].update(value.double())

    def compute_and_reset(self) -> dict[str, float]:
        s = {n: float(m.compute()) if m.update_called else 0.0 for n, m in self.sums.items()}
        for m in self.sums.values():
            m.reset()
        n = s["tokens"] or math.nan

        def exp(x: float) -> float:
            return x if math.isnan(x) else math.exp(x) if x < 709 else math.inf  # math.exp raises on overflow

        return {
            "loss": s["ce"] / n, "ppl": exp(s["ce"] / n), "acc": s["correct"] / n, "tokens": s["tokens"],
            "baseline_ppl": exp(s["baseline_ce"] / n), "baseline_acc": s["baseline_correct"] / n,
        }
