"""Training: batching and sharding, metrics by hand, every variant learning, redraw, resume."""

import math
import re

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from lightning.pytorch.callbacks import Callback

from protein_performer import vocab
from protein_performer.masking import EVAL_STREAM, FILLER_STREAM, IGNORE, Collator
from protein_performer.model import DERIVED_FIELDS, Config, derive_seed
from protein_performer.prepared import PreparedDir
from protein_performer.training import BestAndLastCheckpoint, FeatureRedraw, ProteinDataModule, ProteinLMModule
from protein_performer.training.metrics import LMMetrics, unigram_log_probs
from protein_performer.training.module import lr_factor
from protein_performer.training.sampler import EpochOrder, Keyed, ShardedBatchSampler


def trainer(tmp_path, max_steps, **kw):
    kw.setdefault("callbacks", [])
    return L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, gradient_clip_val=0.5,
        default_root_dir=tmp_path, **{"enable_checkpointing": False, **kw},
    )


class LossRecorder(Callback):
    """Per-step training loss and the first FAVOR projection, keyed by global step before the update."""

    def __init__(self):
        self.loss, self.projection = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.loss[step] = float(outputs["loss"])
        self.projection[step] = getattr(pl_module.model.blocks[0].attn.core, "projection", torch.empty(0)).clone()


# ---------------------------------------------------------------------------------------- batching

LENGTHS = np.random.default_rng(0).integers(5, 300, 101)


@pytest.mark.parametrize("kind", [{"batch_size": 8}, {"max_tokens": 1024}])
def test_eval_sharding_counts_every_sequence_once(kind):
    seen = []
    per_rank = []
    for rank in range(3):
        s = ShardedBatchSampler(EpochOrder(LENGTHS, shuffle=False), rank=rank, world_size=3, even=False,
                                stream=EVAL_STREAM, **kind)
        batches = [[key[-1] for key, _ in b] for b in s]
        per_rank.append(len(batches))
        seen += sum(batches, [])
        if "max_tokens" in kind:
            assert all(len(b) * max(LENGTHS[b]) <= 1024 for b in batches)
    assert sorted(seen) == list(range(len(LENGTHS)))  # no sequence dropped or repeated
    assert max(per_rank) - min(per_rank) <= 1


def test_train_batches_even_shuffled_per_epoch_and_resumable():
    def rank_batches(rank, epoch, resume=None):
        order = EpochOrder(LENGTHS, shuffle=True, seed=1)
        order.set_epoch(epoch)
        s = ShardedBatchSampler(order, max_tokens=1024, rank=rank, world_size=2)
        s.resume = resume
        batches = list(s)
        assert all(position[0] == epoch for b in batches for _, position in b)
        return [[key[-1] for key, _ in b] for b in batches], [b[0][1][1] for b in batches]

    (r0, numbers), (r1, _) = rank_batches(0, 0), rank_batches(1, 0)
    assert len(r0) == len(r1) and not set(sum(r0, [])) & set(sum(r1, []))
    assert numbers == list(range(len(r0)))
    assert rank_batches(0, 0)[0] == r0 and rank_batches(0, 1)[0] != r0
    assert rank_batches(0, 0, resume=(0, 3)) == (r0[3:], numbers[3:])
    assert rank_batches(0, 1, resume=(0, 3))[0] == rank_batches(0, 1)[0]  # a resume point of another epoch


def test_a_rank_without_batches_evaluates_a_filler_that_counts_zero(prepared):
    """3 sequences, one batch, 2 ranks: rank 1 would skip evaluation (Lightning skips an empty loop) and rank 0
    would wait for it forever at the metric sync; it gets a filler batch without targets instead."""
    lengths = np.array([5, 7, 9])
    batches = [list(ShardedBatchSampler(EpochOrder(lengths, shuffle=False), batch_size=8, rank=r, world_size=2,
                                        even=False, stream=EVAL_STREAM)) for r in range(2)]
    assert [len(b) for b in batches] == [1, 1]
    assert {key[0] for key, _ in batches[1][0]} == {FILLER_STREAM}
    dataset = Keyed(PreparedDirDataset(prepared))
    batch = Collator("masked")([dataset[item] for item in batches[1][0]])
    assert (batch["targets"] == IGNORE).all()
    metrics = LMMetrics()
    logits = torch.zeros(*batch["tokens"].shape, vocab.VOCAB_SIZE)
    metrics.update(logits, batch["targets"], torch.zeros(vocab.VOCAB_SIZE))
    assert metrics.compute_and_reset()["tokens"] == 0


def PreparedDirDataset(root):
    from protein_performer.data import SingleSequenceDataset

    return SingleSequenceDataset(PreparedDir(root).split("valid"), max_len=64)


def test_token_counts_and_unigram_baseline(tmp_path, prepared_from):
    prepared_from(tmp_path, {"train": [np.array([0, 0, 1], np.uint8), np.array([2], np.uint8)]})
    counts = PreparedDir(tmp_path).split("train").token_counts()
    stream = np.array([0, 0, 1, vocab.EOS, 2, vocab.EOS], dtype=np.uint8)
    assert counts.tolist() == np.bincount(stream, minlength=vocab.VOCAB_SIZE).tolist()
    logp = unigram_log_probs(torch.from_numpy(counts)).exp()
    # Laplace over the 25 letters: (count + 1) / (4 + 25)
    assert logp[0] == pytest.approx(3 / 29) and logp[3] == pytest.approx(1 / 29) and logp[vocab.EOS] == 0
    causal = unigram_log_probs(torch.from_numpy(counts), eos=True).exp()
    assert causal[vocab.EOS] == pytest.approx(3 / 32) and causal.sum() == pytest.approx(1.0)


def test_metrics_by_hand():
    """Uniform logits: every target costs log(29) (perplexity 29) and argmax is id 0, so targets 0 are correct.
    Equal counts give a uniform Laplace baseline over the 25 letters (perplexity 25), whose argmax is id 0 too."""
    m = LMMetrics()
    baseline = unigram_log_probs(torch.ones(vocab.VOCAB_SIZE, dtype=torch.int64))
    m.update(torch.zeros(1, 3, vocab.VOCAB_SIZE), torch.tensor([[0, IGNORE, 3]]), baseline)
    m.update(torch.zeros(1, 3, vocab.VOCAB_SIZE), torch.tensor([[IGNORE, 0, 0]]), baseline)
    r = m.compute_and_reset()
    assert r["tokens"] == 4 and r["ppl"] == pytest.approx(29.0) and r["acc"] == pytest.approx(0.75)
    assert r["baseline_ppl"] == pytest.approx(25.0) and r["baseline_acc"] == pytest.approx(0.75)
    empty = m.compute_and_reset()
    assert empty["tokens"] == 0 and math.isnan(empty["ppl"])  # nothing evaluated is not a perfect score


def test_metrics_never_drop_nan():
    """A diverged model's NaN logits give NaN perplexity; torchmetrics' default would drop the NaN sums and
    report loss 0 / perplexity 1."""
    m = LMMetrics()
    baseline = unigram_log_probs(torch.ones(vocab.VOCAB_SIZE, dtype=torch.int64))
    m.update(torch.zeros(1, 2, vocab.VOCAB_SIZE), torch.tensor([[0, 1]]), baseline)
    m.update(torch.full((1, 2, vocab.VOCAB_SIZE), float("nan")), torch.tensor([[0, 1]]), baseline)
    r = m.compute_and_reset()
    assert math.isnan(r["ppl"]) and math.isnan(r["loss"])


def test_module_metrics_match_direct_computation(prepared):
    dm = ProteinDataModule(str(prepared), max_len=256, batch_size=4, num_workers=0)
    dm.setup("validate")
    module = ProteinLMModule("tiny", config={"attention": "exact"}).eval()
    counts = dm.train_token_counts()
    module.unigram_counts.copy_(torch.from_numpy(counts))
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        module.validation_step(batch, 0)
        logits = module.model(batch["tokens"], batch["padding_mask"])["logits"]
    sel = batch["targets"] != IGNORE
    ce = F.cross_entropy(logits[sel], batch["targets"][sel])
    r = module.val_metrics.compute_and_reset()
    assert r["tokens"] == sel.sum() and r["ppl"] == pytest.approx(ce.exp().item(), rel=1e-5)
    assert r["acc"] == pytest.approx((logits[sel].argmax(-1) == batch["targets"][sel]).float().mean().item())
    p = (torch.from_numpy(counts[:25]).double() + 1) / (counts[:25].sum() + 25)
    assert r["baseline_ppl"] == pytest.approx(math.exp(-p.log()[batch["targets"][sel]].mean().item()), rel=1e-6)


def test_lr_schedule_and_weight_decay_groups():
    assert lr_factor(0, warmup=10, total=110, decay="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(10, warmup=10, total=110, decay="cosine", min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(60, warmup=10, total=110, decay="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(500, warmup=10, total=110, decay="linear", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, warmup=0, total=None, decay="none", min_ratio=0.0) == 1.0
    module = ProteinLMModule("tiny")
    module.trainer = L.Trainer(max_steps=5, logger=False)
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9 and opt.defaults["lr"] == 1e-3
    assert all(p.dim() == 2 for p in decay["params"])  # Linear weights only
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(module.model.tok_emb.weight) in no_decay_ids and id(module.model.ln_f.weight) in no_decay_ids


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("objective", ["masked", "causal"])
@pytest.mark.parametrize("attention", ["exact", "favor-softmax", "favor-relu"])
def test_every_variant_learns(prepared, tmp_path, objective, attention):
    torch.manual_seed(0)
    dm = ProteinDataModule(str(prepared), objective=objective, max_len=256, batch_size=16, num_workers=0)
    module = ProteinLMModule("tiny", objective=objective, redraw_every=5, lr=3e-3,
                             config={"attention": attention, "dropout": 0.0})
    rec = LossRecorder()
    trainer(tmp_path, 30, callbacks=[rec], limit_val_batches=0).fit(module, dm)
    losses = [rec.loss[s] for s in sorted(rec.loss)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses


def test_concatenated_mode_trains(prepared, tmp_path):
    dm = ProteinDataModule(str(prepared), mode="concatenated", window=128, batch_size=8, num_workers=0)
    module = ProteinLMModule("tiny", lr=3e-3, config={"attention": "favor-relu", "dropout": 0.0})
    rec = LossRecorder()
    trainer(tmp_path, 20, callbacks=[rec]).fit(module, dm)
    losses = [rec.loss[s] for s in sorted(rec.loss)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert vocab.BOS not in dm.datasets["train"][0]


def test_redraw_is_a_function_of_step(prepared, tmp_path):
    def run():
        rec = LossRecorder()
        dm = ProteinDataModule(str(prepared), max_len=256, batch_size=16, num_workers=0)
        module = ProteinLMModule("tiny", redraw_every=3, seed=5, config={"attention": "favor-softmax"})
        trainer(tmp_path, 7, callbacks=[rec], limit_val_batches=0).fit(module, dm)
        return module, rec

    module, rec = run()
    p = rec.projection
    assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2]) and not torch.equal(p[2], p[3])
    assert torch.equal(p[3], p[5]) and not torch.equal(p[5], p[6])
    reference = ProteinLMModule("tiny", config={"attention": "favor-softmax"}).model
    reference.redraw_features(derive_seed(5, 6))
    assert torch.equal(reference.blocks[0].attn.core.projection, p[6])
    assert torch.equal(run()[1].projection[6], p[6])  # a second run draws the same matrices
    assert isinstance(module.configure_callbacks()[0], FeatureRedraw)


@pytest.mark.slow
def test_resume_continues_as_if_uninterrupted(prepared, tmp_path):
    """Losses after resuming from last.ckpt equal the uninterrupted run's to 1e-5 (relative), for a checkpoint
    in the middle of the first epoch (step 11), one at its end, and one inside the second epoch (whose token-budget
    packing differs from the first's). Batches, masking, dropout and redraws are functions of (seed, step), so on
    this CPU they are in fact bit-identical; the tolerance leaves room for nondeterministic kernels elsewhere."""

    def run(max_steps, root, val_every, ckpt_path=None):
        torch.manual_seed(0)  # the initial weights (the CLI calls seed_everything)
        dm = ProteinDataModule(str(prepared), max_len=256, max_tokens=1200, num_workers=1, seed=3)
        module = ProteinLMModule("tiny", redraw_every=4, seed=3, warmup_steps=5, decay="cosine", decay_steps=50,
                                 config={"attention": "favor-softmax"})
        rec = LossRecorder()
        ckpt = BestAndLastCheckpoint(dirpath=root, save_last=True, monitor="val/ppl", mode="min")
        t = trainer(root, max_steps, callbacks=[rec, ckpt], enable_checkpointing=True, val_check_interval=val_every,
                    check_val_every_n_epoch=None, limit_val_batches=2)
        t.fit(module, dm, ckpt_path=ckpt_path, weights_only=True)
        return rec, module, t

    total = 36
    full, full_module, t = run(total, tmp_path / "full", 100)
    per_epoch = t.num_training_batches
    assert per_epoch > 11 and per_epoch + 4 < total
    for stop in (11, per_epoch, per_epoch + 4):
        part = tmp_path / f"part{stop}"
        run(stop, part, stop)
        resumed, resumed_module, _ = run(total, part, stop, ckpt_path=str(part / "last.ckpt"))
        assert sorted(resumed.loss) == list(range(stop, total))
        for step in resumed.loss:
            assert resumed.loss[step] == pytest.approx(full.loss[step], rel=1e-5), (stop, step)
            assert torch.equal(resumed.projection[step], full.projection[step])
        for a, b in zip(full_module.parameters(), resumed_module.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_config_field_is_a_model_option_with_configs_help(tmp_path, capsys):
    """--model.config.<field> is generated from Config: every field a run sets (all but DERIVED_FIELDS), typed and
    documented as Config declares it, and nothing else."""
    from dataclasses import fields

    from protein_performer.training.lightning_cli import build_cli

    with pytest.raises(SystemExit):
        build_cli(["--config", str(TINY), "--data.data_dir", str(tmp_path), "--help"], run=False)
    text = " ".join(capsys.readouterr().out.split())
    offered = set(re.findall(r"--model\.config\.(\w+)", text))
    assert offered == {f.name for f in fields(Config)} - set(DERIVED_FIELDS)
    assert "Width of the residual stream." in text and "Random features m" in text  # Config's own docstrings
    with torch.device("meta"):
        built = build_cli(["--config", str(TINY), "--data.data_dir", str(tmp_path), "--model.config.n_layers", "3"],
                          run=False)
    assert (built.model.config.n_layers, built.model.config.d_model) == (3, 64)  # the rest is the preset's


@pytest.mark.parametrize("mode, eos", [("single", False), ("concatenated", True)])
def test_causal_baseline_counts_eos_only_where_it_is_a_target(prepared, tmp_path, mode, eos):
    """Single sequences end without EOS, so its probability would only dilute the letters' in the baseline."""
    dm = ProteinDataModule(str(prepared), objective="causal", mode=mode, max_len=64, window=64, batch_size=16,
                           num_workers=0)
    module = ProteinLMModule("tiny", objective="causal", config={"attention": "favor-relu", "max_len": 64})
    trainer(tmp_path, 1, limit_val_batches=0).fit(module, dm)
    assert module.eos_is_target == eos
    targets = torch.cat([b["targets"].flatten() for b in dm.val_dataloader()])
    assert (targets == vocab.EOS).any() == eos
