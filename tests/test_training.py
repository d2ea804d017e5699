"""Training: batching and sharding, metrics by hand, every variant learning, redraw, resume."""

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from protein_performer import vocab
from protein_performer.lit import (
    EVAL_STREAM,
    EpochOrder,
    FeatureRedraw,
    LMMetrics,
    ProteinDataModule,
    ProteinLMModule,
    ShardedBatchSampler,
    derive_seed,
    lr_factor,
    unigram_log_probs,
)
from protein_performer.data import token_counts
from protein_performer.masking import IGNORE

ROOT = Path(__file__).resolve().parents[1]


def make_prepared_dir(root, counts=(240, 48, 48, 24), seed=0):
    """A small prepared directory in the data-prep layout: sequences made of a few recurring motifs and
    skewed amino-acid frequencies, so that a tiny model has something to learn within a few steps."""
    rng = np.random.default_rng(seed)
    freqs = rng.dirichlet(np.ones(vocab.NUM_AMINO_ACIDS))
    motifs = [rng.choice(vocab.NUM_AMINO_ACIDS, size=8, p=freqs) for _ in range(6)]
    splits = {}
    for split, count in zip(("train", "valid", "test", "ood"), counts):
        seqs = []
        for _ in range(count):
            parts = [motifs[rng.integers(6)] if rng.random() < 0.6 else rng.choice(vocab.NUM_AMINO_ACIDS, size=rng.integers(3, 20), p=freqs)
                     for _ in range(rng.integers(2, 12))]
            seqs.append(np.concatenate(parts).astype(np.uint8))
        out = root / split
        out.mkdir(parents=True)
        stream = np.concatenate([np.append(s, vocab.EOS) for s in seqs]).astype(np.uint8)
        stream.tofile(out / "tokens.bin")
        np.save(out / "offsets.npy", np.cumsum([0] + [len(s) + 1 for s in seqs[:-1]]).astype(np.int64))
        splits[split] = {"count": count, "tokens": len(stream)}
    (root / "manifest.json").write_text(json.dumps({"splits": splits, "vocabulary": list(vocab.TOKENS)}))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared_dir(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """The bundled UniProt sample prepared by `protein-performer-prep`, three Pfam families held out (as the demo)."""
    out = tmp_path_factory.mktemp("sample") / "prepared"
    subprocess.run(
        [sys.executable, "-m", "data_prep", str(ROOT / "data/sample/mmseqs2_DB_first3000.fasta.gz"),
         str(ROOT / "data/sample/emboss_swiss_seq.dat.gz"), "--out", str(out), "--ood-families", "PF00258", "PF00001",
         "PF00022", "--workers", "1"],
        check=True, capture_output=True, cwd=ROOT,
    )
    return out


def trainer(tmp_path, max_steps, **kw):
    kw.setdefault("callbacks", [])
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
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
        batches = list(s)
        per_rank.append(len(batches))
        seen += [key[-1] for b in batches for key in b]
        if "max_tokens" in kind:
            assert all(len(b) * max(LENGTHS[[k[-1] for k in b]]) <= 1024 for b in batches)
    assert sorted(seen) == list(range(len(LENGTHS)))  # no sequence dropped or repeated
    assert max(per_rank) - min(per_rank) <= 1


def test_train_batches_even_shuffled_per_epoch_and_skippable():
    def rank_batches(rank, epoch, skip=0):
        order = EpochOrder(LENGTHS, shuffle=True, seed=1)
        order.set_epoch(epoch)
        s = ShardedBatchSampler(order, max_tokens=1024, rank=rank, world_size=2)
        s.skip = skip
        return [[k[-1] for k in b] for b in s]

    r0, r1 = rank_batches(0, 0), rank_batches(1, 0)
    assert len(r0) == len(r1) and not set(sum(r0, [])) & set(sum(r1, []))
    assert rank_batches(0, 0) == r0 and rank_batches(0, 1) != r0
    assert rank_batches(0, 0, skip=3) == r0[3:]


def test_token_counts_and_unigram_baseline(tmp_path):
    stream = np.array([0, 0, 1, vocab.EOS, 2, vocab.EOS], dtype=np.uint8)
    stream.tofile(tmp_path / "tokens.bin")
    counts = token_counts(tmp_path / "tokens.bin", chunk=4)
    assert counts.tolist() == np.bincount(stream, minlength=vocab.VOCAB_SIZE).tolist()
    logp = unigram_log_probs(torch.from_numpy(counts), "masked").exp()
    # Laplace over the 25 letters: (count + 1) / (4 + 25)
    assert logp[0] == pytest.approx(3 / 29) and logp[3] == pytest.approx(1 / 29) and logp[vocab.EOS] == 0
    causal = unigram_log_probs(torch.from_numpy(counts), "causal").exp()
    assert causal[vocab.EOS] == pytest.approx(3 / 32) and causal.sum() == pytest.approx(1.0)


def test_metrics_by_hand():
    m = LMMetrics()
    # two batches: CE sums 3.0 over 2 tokens and 1.0 over 2 tokens; 3 of 4 correct
    m.update(ce=torch.tensor(3.0), correct=torch.tensor(1), tokens=torch.tensor(2), baseline_ce=torch.tensor(4.0), baseline_correct=torch.tensor(0))
    m.update(ce=torch.tensor(1.0), correct=torch.tensor(2), tokens=torch.tensor(2), baseline_ce=torch.tensor(4.0), baseline_correct=torch.tensor(1))
    r = m.compute_and_reset()
    assert r["ppl"] == pytest.approx(math.exp(1.0)) and r["acc"] == pytest.approx(0.75)
    assert r["baseline_ppl"] == pytest.approx(math.exp(2.0)) and r["baseline_acc"] == pytest.approx(0.25)
    assert m.compute_and_reset()["tokens"] == 0


def test_module_metrics_match_direct_computation(prepared):
    dm = ProteinDataModule(str(prepared), max_len=256, batch_size=4, num_workers=0)
    dm.setup("validate")
    module = ProteinLMModule("tiny", attention="softmax").eval()
    module.unigram_counts.copy_(torch.from_numpy(dm.unigram_counts))
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        module._update(module.val_metrics, batch)
        logits = module.model(batch["tokens"], batch["padding_mask"])["logits"]
    sel = batch["targets"] != IGNORE
    ce = F.cross_entropy(logits[sel], batch["targets"][sel])
    r = module.val_metrics.compute_and_reset()
    assert r["tokens"] == sel.sum() and r["ppl"] == pytest.approx(ce.exp().item(), rel=1e-5)
    assert r["acc"] == pytest.approx((logits[sel].argmax(-1) == batch["targets"][sel]).float().mean().item())
    p = (torch.from_numpy(dm.unigram_counts[:25]).double() + 1) / (dm.unigram_counts[:25].sum() + 25)
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
@pytest.mark.parametrize("attention", ["softmax", "favor-softmax", "favor-relu"])
def test_every_variant_learns(prepared, tmp_path, objective, attention):
    torch.manual_seed(0)
    dm = ProteinDataModule(str(prepared), objective=objective, max_len=256, batch_size=16, num_workers=0)
    module = ProteinLMModule("tiny", objective=objective, attention=attention, redraw_every=5,
                             model_args={"dropout": 0.0}, lr=3e-3)
    rec = LossRecorder()
    trainer(tmp_path, 30, callbacks=[rec], limit_val_batches=0).fit(module, dm)
    losses = [rec.loss[s] for s in sorted(rec.loss)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses


def test_concatenated_mode_trains(prepared, tmp_path):
    dm = ProteinDataModule(str(prepared), mode="concatenated", window=128, batch_size=8, num_workers=0)
    module = ProteinLMModule("tiny", attention="favor-relu", model_args={"dropout": 0.0}, lr=3e-3)
    rec = LossRecorder()
    trainer(tmp_path, 20, callbacks=[rec]).fit(module, dm)
    losses = [rec.loss[s] for s in sorted(rec.loss)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert vocab.BOS not in dm.datasets["train"][0]


def test_redraw_is_a_function_of_step(prepared, tmp_path):
    def run():
        rec = LossRecorder()
        dm = ProteinDataModule(str(prepared), max_len=256, batch_size=16, num_workers=0)
        module = ProteinLMModule("tiny", attention="favor-softmax", redraw_every=3, seed=5)
        trainer(tmp_path, 7, callbacks=[rec], limit_val_batches=0).fit(module, dm)
        return module, rec

    module, rec = run()
    p = rec.projection
    assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2]) and not torch.equal(p[2], p[3])
    assert torch.equal(p[3], p[5]) and not torch.equal(p[5], p[6])
    reference = ProteinLMModule("tiny", attention="favor-softmax").model
    reference.redraw_features(derive_seed(5, 6))
    assert torch.equal(reference.blocks[0].attn.core.projection, p[6])
    assert torch.equal(run()[1].projection[6], p[6])  # a second run draws the same matrices
    assert isinstance(module.configure_callbacks()[0], FeatureRedraw)


@pytest.mark.slow
def test_resume_continues_as_if_uninterrupted(prepared, tmp_path):
    """Losses after resuming from last.ckpt equal the uninterrupted run's to 1e-5 (relative), for a
    checkpoint in the middle of an epoch (step 11) and one at the end of the first epoch (15 batches). Batches, masking, dropout and redraws are functions of (seed, step), so on this CPU they are
    in fact bit-identical; the tolerance leaves room for nondeterministic kernels elsewhere."""

    def run(max_steps, root, val_every, ckpt_path=None):
        torch.manual_seed(0)  # the initial weights (the CLI calls seed_everything)
        dm = ProteinDataModule(str(prepared), max_len=256, max_tokens=1200, num_workers=1, seed=3)
        module = ProteinLMModule("tiny", attention="favor-softmax", redraw_every=4, seed=3, warmup_steps=5,
                                 decay="cosine", decay_steps=40)
        rec = LossRecorder()
        ckpt = ModelCheckpoint(dirpath=root, save_last=True, monitor="val/ppl", mode="min")
        t = trainer(root, max_steps, callbacks=[rec, ckpt], enable_checkpointing=True, val_check_interval=val_every,
                    check_val_every_n_epoch=None, limit_val_batches=2)
        t.fit(module, dm, ckpt_path=ckpt_path, weights_only=True)
        return rec, module, t

    full, full_module, t = run(24, tmp_path / "full", 100)
    per_epoch = t.num_training_batches
    assert 11 < per_epoch < 24
    for stop in (11, per_epoch):
        part = tmp_path / f"part{stop}"
        run(stop, part, stop)
        resumed, resumed_module, _ = run(24, part, stop, ckpt_path=str(part / "last.ckpt"))
        assert sorted(resumed.loss) == list(range(stop, 24))
        for step in resumed.loss:
            assert resumed.loss[step] == pytest.approx(full.loss[step], rel=1e-5), (stop, step)
            assert torch.equal(resumed.projection[step], full.projection[step])
        for a, b in zip(full_module.parameters(), resumed_module.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
