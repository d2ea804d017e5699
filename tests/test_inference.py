"""embed / score / generate: batching invariance, pseudo-likelihood, decoding, errors (issue 7)."""

import math

import lightning as L
import numpy as np
import pytest
import torch

from protein_performer import vocab
from protein_performer.inference import embed, embed_main, generate, generate_main, score, score_main
from protein_performer.inputs import Protein, load_model
from protein_performer.lit import ProteinLMModule


def make_ckpt(path, objective, attention):
    """A real Lightning checkpoint of an untrained tiny model (training is tested elsewhere)."""
    torch.manual_seed(0)
    module = ProteinLMModule(preset="tiny", objective=objective, attention=attention, model_args={"dropout": 0.0})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {(o, a): make_ckpt(d / f"{o}-{a}.ckpt", o, a)
            for o in ("masked", "causal") for a in ("softmax", "favor-softmax", "favor-relu")}


def proteins(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [Protein(f"p{i}", rng.integers(0, 20, int(rng.integers(5, 60))).astype(np.uint8)) for i in range(n)]


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">tr|{p.name}|E_{p.name} x\n{p.sequence}\n" for p in proteins()))
    return path


@pytest.mark.parametrize("attention", ["softmax", "favor-softmax", "favor-relu"])
@pytest.mark.parametrize("pool", ["mean", "bos", "per-residue"])
def test_embeddings_do_not_depend_on_batching(ckpts, attention, pool):
    model = load_model(ckpts[("masked", attention)]).model
    prots = proteins()
    one_by_one = embed(model, prots, [0, 2], pool, tokens_per_batch=1)  # every sequence alone
    together = embed(model, prots, [0, 2], pool, tokens_per_batch=10_000)  # all in one padded batch
    for layer in (0, 2):
        for a, b in zip(one_by_one[layer], together[layer]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 sums over padded lengths
    assert together[2][0].shape == ((len(prots[0].tokens), 64) if pool == "per-residue" else (64,))
    # what each pooling means: the residues' mean (BOS excluded), the BOS position, or every residue
    with torch.no_grad():
        reps = model(torch.from_numpy(np.concatenate([[vocab.BOS], prots[0].tokens]))[None],
                     repr_layers=(2,))["representations"][2][0].numpy()
    expected = {"mean": reps[1:].mean(0), "bos": reps[0], "per-residue": reps[1:]}[pool]
    np.testing.assert_allclose(together[2][0], expected, rtol=1e-4, atol=1e-5)  # float32, batch vs alone


@pytest.mark.parametrize("attention", ["softmax", "favor-relu"])
def test_pseudo_likelihood_equals_one_by_one_loop(ckpts, attention):
    model = load_model(ckpts[("masked", attention)]).model
    prot = proteins(1, seed=3)[0]
    fast = score(model, [prot], tokens_per_batch=64)[0]  # several masked copies per batch
    seq = torch.tensor(np.concatenate([[vocab.BOS], prot.tokens]), dtype=torch.long)
    slow = []
    with torch.no_grad():
        for i in range(1, len(seq)):
            masked = seq.clone()
            masked[i] = vocab.MASK
            logp = torch.log_softmax(model(masked[None])["logits"][0, i], -1)
            slow.append(logp[seq[i]].item())
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)  # same arithmetic, batched differently


@torch.no_grad()
def test_causal_score_is_the_sum_of_next_token_log_probs(ckpts):
    model = load_model(ckpts[("causal", "favor-softmax")]).model
    prots = proteins(3)
    terms = score(model, prots, tokens_per_batch=32)
    for prot, t in zip(prots, terms):
        seq = torch.tensor(np.concatenate([[vocab.BOS], prot.tokens]), dtype=torch.long)
        logp = torch.log_softmax(model(seq[None])["logits"][0, :-1], -1)
        expected = logp[torch.arange(len(seq) - 1), seq[1:]].numpy()
        np.testing.assert_allclose(t, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["softmax", "favor-softmax", "favor-relu"])
@torch.no_grad()
def test_greedy_generation_matches_full_forward_argmax(ckpts, attention):
    model = load_model(ckpts[("causal", attention)]).model
    out = generate(model, prompt="MKV", num=1, max_length=30, temperature=0)[0]
    # the same greedy choice recomputed with a full forward pass over each prefix
    seq = [vocab.BOS, *vocab.encode("MKV").tolist()]
    while len(seq) - 1 < 30:
        logits = model(torch.tensor([seq]))["logits"][0, -1]
        logits[[vocab.BOS, vocab.PAD, vocab.MASK]] = -math.inf
        nxt = int(logits.argmax())
        if nxt == vocab.EOS:
            break
        seq.append(nxt)
    assert out == vocab.decode(seq[1:])


def test_generation_is_reproducible_with_a_seed(ckpts):
    model = load_model(ckpts[("causal", "favor-relu")]).model
    a = generate(model, num=3, max_length=40, top_k=10, top_p=0.9, seed=5)
    b = generate(model, num=3, max_length=40, top_k=10, top_p=0.9, seed=5)
    c = generate(model, num=3, max_length=40, top_k=10, top_p=0.9, seed=6)
    assert a == b and a != c
    assert all(set(s) <= set(vocab.LETTERS) and len(s) <= 40 for s in a)


def test_cli_end_to_end(ckpts, fasta, tmp_path, capsys):
    embed_main(["--ckpt", str(ckpts[("masked", "favor-relu")]), "--fasta", str(fasta), "--out", str(tmp_path / "e"),
                "--layers", "1", "2", "--tokens-per-batch", "100"])
    assert np.load(tmp_path / "e" / "layer2_mean.npy").shape == (7, 64)
    assert (tmp_path / "e" / "index.tsv").read_text().splitlines()[1].startswith("0\tp0\t")
    score_main(["--ckpt", str(ckpts[("causal", "softmax")]), "--fasta", str(fasta), "--out", str(tmp_path / "s.tsv"),
                "--per-position", str(tmp_path / "pos.tsv")])
    rows = (tmp_path / "s.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["id", "length", "scored", "log_likelihood", "perplexity", "method"] and len(rows) == 8
    ll, ppl = float(rows[1].split("\t")[3]), float(rows[1].split("\t")[4])
    n = int(rows[1].split("\t")[2])
    assert math.isclose(ppl, math.exp(-ll / n), rel_tol=1e-3)  # both printed to 4 decimals
    generate_main(["--ckpt", str(ckpts[("causal", "favor-softmax")]), "--num", "2", "--max-length", "20",
                   "--seed", "1", "--out", str(tmp_path / "g.fasta")])
    assert (tmp_path / "g.fasta").read_text().count(">generated_") == 2


def fails(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_errors_are_clear(ckpts, fasta, tmp_path, capsys):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nMKV\n>tr|Q1|BAD_1\nMKJV\n")
    msg = fails(score_main, ["--ckpt", str(ckpts[("causal", "softmax")]), "--fasta", str(bad), "--out",
                             str(tmp_path / "s.tsv")], capsys)
    assert "record 2 (tr|Q1|BAD_1)" in msg and "'J'" in msg
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    assert "no valid protein sequences" in fails(embed_main, ["--ckpt", str(ckpts[("masked", "softmax")]), "--fasta",
                                                              str(empty), "--out", str(tmp_path / "e")], capsys)
    assert "needs a causal model" in fails(generate_main, ["--ckpt", str(ckpts[("masked", "favor-relu")])], capsys)
    assert "does not exist" in fails(generate_main, ["--ckpt", str(tmp_path / "nope.ckpt")], capsys)


def test_checkpoint_from_another_version_is_refused(ckpts, tmp_path, capsys):
    ckpt = torch.load(ckpts[("causal", "favor-relu")], weights_only=True)
    ckpt["protein_performer"]["version"] = "0.0.1"
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    msg = fails(generate_main, ["--ckpt", str(old)], capsys)
    assert "written by protein_performer 0.0.1" in msg and str(old) in msg
    del ckpt["protein_performer"]
    torch.save(ckpt, old)
    assert "does not hold a protein_performer model" in fails(generate_main, ["--ckpt", str(old)], capsys)


def test_subcommands_are_dispatched_by_the_cli(ckpts, fasta, tmp_path):
    import subprocess

    res = subprocess.run(["protein-performer", "score", "--ckpt", str(ckpts[("masked", "favor-relu")]), "--fasta",
                          str(fasta), "--out", str(tmp_path / "s.tsv")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pseudo" in (tmp_path / "s.tsv").read_text()
