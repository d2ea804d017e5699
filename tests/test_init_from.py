"""Starting a run from another run's weights with another attention kind (`--model.init_from`): the paper's
backward compatibility, a softmax Transformer made a Performer by fine-tuning (and back)."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY

from protein_performer.checkpoints import init_from_checkpoint, load_model, read_checkpoint
from protein_performer.errors import UserError
from protein_performer.model import Config, ProteinLM

FIT_FLAGS = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
             "--trainer.enable_model_summary", "false", "--data.max_len", "128", "--data.batch_size", "4"]


def fit(cli, prepared, root, *flags) -> tuple[int, str]:
    return cli(["fit", "--config", TINY, "--data.data_dir", prepared, "--trainer.default_root_dir", root,
                "--trainer.logger.init_args.save_dir", root, *FIT_FLAGS, *flags])


@pytest.fixture(scope="module")
def parents(tmp_path_factory, prepared) -> dict[tuple[str, str], str]:
    """Checkpoints of 2-step `fit` runs: {(attention, objective): last.ckpt}."""
    from conftest import run_cli

    out = {}
    for attention, objective in [("exact", "masked"), ("exact", "causal"), ("favor-softmax", "masked")]:
        root = tmp_path_factory.mktemp(f"{attention}-{objective}")
        code, err = fit(run_cli, prepared, root, "--model.config.attention", attention, "--model.objective", objective)
        assert code == 0, err
        out[attention, objective] = str(next(root.rglob("last.ckpt")))
    return out


@pytest.mark.parametrize("parent_kind, child_kind, objective", [
    ("exact", "favor-softmax", "masked"), ("exact", "favor-relu", "causal"), ("exact", "favor-softmax", "causal"),
    ("favor-softmax", "exact", "masked"), ("favor-softmax", "favor-relu", "masked"),
])
def test_every_weight_carries_over_and_features_stay_the_childs(parents, parent_kind, child_kind, objective):
    parent = load_model(parents[parent_kind, objective]).model.state_dict()
    child = ProteinLM(Config.from_name("tiny", attention=child_kind, causal=objective == "causal", nb_features=48,
                                       feature_seed=7))
    own = copy.deepcopy(child.state_dict())
    init_from_checkpoint(child, objective, parents[parent_kind, objective])
    loaded = child.state_dict()
    weights = [k for k in loaded if not k.endswith("projection")]
    assert len(weights) == len([k for k in parent if not k.endswith("projection")])
    for key in weights:
        assert torch.equal(loaded[key], parent[key]), key
    for key in set(loaded) - set(weights):  # the child's own draw (m = 48, seed 7), not the parent's
        assert torch.equal(loaded[key], own[key]), key


@pytest.mark.parametrize("change, words", [
    ({"d_model": 128}, "its d_model is 64, this model's is 128 (--model.config.d_model)"),
    ({"n_layers": 3}, "its n_layers is 2, this model's is 3"),
    ({"max_len": 256}, "its max_len is 512, this model's is 256"),
    ({"causal": True}, "its objective is masked, this run's is causal"),
])
def test_a_checkpoint_of_another_shape_or_objective_is_refused_in_one_line(parents, change, words):
    config = Config.from_name("tiny", attention="favor-softmax", **change)
    with pytest.raises(UserError) as e:
        init_from_checkpoint(ProteinLM(config), "causal" if config.causal else "masked", parents["exact", "masked"])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_of_another_vocabulary_is_refused(parents, tmp_path):
    ckpt = read_checkpoint(parents["exact", "masked"])
    ckpt["protein_performer"]["model_config"]["vocab_size"] = 33
    torch.save(ckpt, tmp_path / "other-vocab.ckpt")
    with pytest.raises(UserError, match="its vocab_size is 33, this model's is 29"):
        init_from_checkpoint(ProteinLM(Config.from_name("tiny")), "masked", tmp_path / "other-vocab.ckpt")


def predicted_favor_error(model: ProteinLM, tokens: torch.Tensor, m: int) -> float:
    """The relative error FAVOR+ with m positive random features is expected to make in the attention output of
    the worst layer, if it replaced `model`'s exact causal attention.

    Lemma 2: each kernel entry exp(x.y) (x, y = q, k scaled by d^-1/4) is estimated without bias with relative
    variance sigma^2 = exp(|x+y|^2) (1 - exp(-|x+y|^2)) / m. To first order the output out_i = sum_j a_ij v_j of
    the ratio estimator moves by sum_j a_ij eps_ij (v_j - out_i), so (entries taken independent; orthogonal
    features only lower it) Var(out_i) = sum_j a_ij^2 sigma_ij^2 |v_j - out_i|^2.
    """
    worst = 0.0
    x = model.tok_emb(tokens) + model.pos_emb.weight[: tokens.shape[1]]
    for block in model.blocks:
        q, k, v = block.attn.project(block.ln1(x))  # (B, H, L, d)
        xq, yk = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
        s = ((xq[..., :, None, :] + yk[..., None, :, :]) ** 2).sum(-1)  # (B, H, L, L): |x_i + y_j|^2
        causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        a = (xq @ yk.transpose(-1, -2)).masked_fill(~causal, -math.inf).softmax(-1)
        out = a @ v
        spread = ((v[..., None, :, :] - out[..., :, None, :]) ** 2).sum(-1)  # |v_j - out_i|^2
        variance = (a**2 * torch.exp(s) * (1 - torch.exp(-s)) / m * spread).sum()
        worst = max(worst, float(variance.sqrt() / out.norm()))
        x, _ = block(x)
    return worst


@torch.no_grad()
def test_a_converted_model_reproduces_its_parents_logits_at_large_m(parents, tmp_path):
    # A parent whose attention matters: sharper (q, k x 4) and louder (output x 10) than a 2-step run's.
    ckpt = read_checkpoint(parents["exact", "causal"])
    for key, w in ckpt["state_dict"].items():
        if key.endswith("attn.qkv.weight"):
            w[: 2 * w.shape[1]] *= 4.0
        elif key.endswith("attn.out.weight"):
            w *= 10.0
    torch.save(ckpt, tmp_path / "sharp.ckpt")
    parent = load_model(tmp_path / "sharp.ckpt").model
    tokens = torch.randint(0, 20, (4, 100), generator=torch.Generator().manual_seed(0))
    logits = parent(tokens)["logits"]
    silent = copy.deepcopy(parent)  # the parent without its attention: what attention adds to the logits
    for block in silent.blocks:
        block.attn.out.weight.zero_()
    effect = (logits - silent(tokens)["logits"]).norm()

    m = 4096
    child = ProteinLM(Config.from_name("tiny", attention="favor-softmax", causal=True, nb_features=m)).eval()
    init_from_checkpoint(child, "causal", tmp_path / "sharp.ckpt")
    error = (child(tokens)["logits"] - logits).norm() / effect
    # The logits move linearly with the attention outputs to first order, so their error is bounded by the
    # attention's relative error times what attention contributes: 3 standard deviations of the estimator
    bound = 3 * predicted_favor_error(parent, tokens, m)
    assert error < bound
    fresh = ProteinLM(Config.from_name("tiny", attention="favor-softmax", causal=True, nb_features=m)).eval()
    assert (fresh(tokens)["logits"] - logits).norm() / effect > 10 * bound  # not converted: far off


def test_validate_at_step_0_and_a_short_fine_tune_through_the_cli(parents, prepared, tmp_path, cli):
    parent = parents["exact", "masked"]
    # exact -> exact: the converted model is its parent, so validation agrees to the last bit
    reference = tmp_path / "reference"
    code, err = cli(["validate", "--config", TINY, "--data.data_dir", prepared, "--model.config.attention", "exact",
                     "--trainer.default_root_dir", reference, "--trainer.logger.init_args.save_dir", reference,
                     "--trainer.limit_val_batches", "2", "--data.max_len", "128", "--ckpt_path", parent])
    assert code == 0, err
    same = tmp_path / "same"
    code, err = cli(["validate", "--config", TINY, "--data.data_dir", prepared, "--model.config.attention", "exact",
                     "--model.init_from", parent, "--trainer.default_root_dir", same,
                     "--trainer.logger.init_args.save_dir", same, "--trainer.limit_val_batches", "2",
                     "--data.max_len", "128"])
    assert code == 0, err

    def val_ppl(root):
        rows = next(root.rglob("metrics.csv")).read_text().splitlines()
        header = rows[0].split(",")
        return float(rows[-1].split(",")[header.index("val/ppl")])

    assert val_ppl(same) == val_ppl(reference)

    # exact -> favor-softmax, fine-tuned 2 steps: a fresh run (step 2, not the parent's 2 + 2) from its weights
    tuned = tmp_path / "tuned"
    code, err = fit(cli, prepared, tuned, "--model.config.attention", "favor-softmax", "--model.init_from", parent)
    assert code == 0, err
    last = read_checkpoint(next(tuned.rglob("last.ckpt")))
    assert last["global_step"] == 2
    assert last["hyper_parameters"]["init_from"] == str(parent)
    start = read_checkpoint(parent)["state_dict"]["model.tok_emb.weight"]
    assert not torch.equal(last["state_dict"]["model.tok_emb.weight"], start)  # trained from there ...
    assert (last["state_dict"]["model.tok_emb.weight"] - start).abs().max() < 0.05  # ... 2 small steps away


def test_weights_of_another_size_are_refused_in_one_line(parents, tmp_path):
    ckpt = read_checkpoint(parents["exact", "masked"])
    ckpt["state_dict"]["model.tok_emb.weight"] = ckpt["state_dict"]["model.tok_emb.weight"][:, :32].clone()
    torch.save(ckpt, tmp_path / "narrow.ckpt")
    with pytest.raises(UserError, match=r"do not match \(tok_emb.weight: \(29, 32\), this model's \(29, 64\)\)"):
        init_from_checkpoint(ProteinLM(Config.from_name("tiny")), "masked", tmp_path / "narrow.ckpt")


@pytest.mark.parametrize("init_from, flags, words", [
    (None, [], "--model.init_from: {init_from}: no such checkpoint file or run directory"),
    (("exact", "masked"), ["--model.config.d_model", "128", "--model.config.n_heads", "4"],
     "cannot initialise this model from it: its d_model is 64, this model's is 128"),
], ids=["missing", "shape"])
def test_a_bad_init_from_stops_before_anything_is_written(parents, prepared, tmp_path, init_from, flags, words):
    """Exit 2 with one line, before the model summary and before the run directory (version_N/config.yaml)."""
    init_from = parents[init_from] if init_from else tmp_path / "nowhere.ckpt"
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "protein_performer.cli", "fit", "--config", TINY, "--data.data_dir", prepared,
           "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root, "--data.max_len", "128",
           "--model.init_from", init_from, *flags]
    proc = subprocess.run([str(a) for a in cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and words.format(init_from=init_from) in errors[0], proc.stderr
    assert "Trainable params" not in proc.stdout + proc.stderr  # no model summary
    assert not root.exists()  # no version_N/config.yaml, no checkpoints folder


@pytest.mark.slow
def test_init_from_through_ddp_gives_every_rank_the_parents_weights(parents, prepared, tmp_path):
    """Two gloo processes with lr 0: each rank ends holding exactly the parent's weights."""
    parent = parents["favor-softmax", "masked"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "protein_performer.cli", "fit", "--config", str(TINY), "--data.data_dir",
           str(prepared), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
           str(tmp_path), "--trainer.devices", "2", "--trainer.strategy", "ddp", *FIT_FLAGS, "--model.lr", "0",
           "--model.config.attention", "exact", "--model.init_from", parent,
           "--trainer.callbacks+=test_ddp.DumpRankState", f"--trainer.callbacks.dirpath={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = load_model(parent).model.state_dict()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["state"]
        for key, value in expected.items():
            if not key.endswith("projection"):
                assert torch.equal(state["model." + key], value), (rank, key)


def test_a_converted_run_resumes_from_its_own_checkpoint_without_its_parent(parents, prepared, tmp_path, cli):
    """--ckpt_path continues the converted run (step count and weights from its checkpoint): the parent is not read
    again, and may be gone; a module loaded from that checkpoint keeps its own weights when validated too."""
    import shutil

    from protein_performer.training import ProteinDataModule, ProteinLMModule

    parent = tmp_path / "parent.ckpt"
    shutil.copy(parents["exact", "masked"], parent)
    run = tmp_path / "run"
    assert fit(cli, prepared, run, "--model.config.attention", "favor-softmax", "--model.init_from", parent)[0] == 0
    parent.unlink()
    code, err = fit(cli, prepared, run, "--model.config.attention", "favor-softmax", "--model.init_from", parent,
                    "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert code == 0, err
    last = next(run.rglob("last.ckpt"))
    assert read_checkpoint(last)["global_step"] == 4
    module = ProteinLMModule.load_from_checkpoint(last, weights_only=True)
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    import lightning as L

    dm = ProteinDataModule(str(prepared), max_len=128, batch_size=4, num_workers=0)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=1).validate(module, dm)
    for key, value in module.state_dict().items():
        assert torch.equal(value, trained[key]), key
