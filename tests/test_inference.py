"""embed / score / generate: batching invariance, pseudo-likelihood, decoding, outputs, errors."""

import gzip
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import LAMBDA_DNA, LOW_COMPLEXITY_PROTEINS, lambda_reads

from protein_performer import vocab
from protein_performer.checkpoints import load_model
from protein_performer.errors import UserError
from protein_performer.inference import embed, generate, score
from protein_performer.proteins import Protein, read_proteins
from protein_performer.training import ProteinLMModule

KINDS = ("exact", "favor-softmax", "favor-relu")


def make_ckpt(path, objective, attention):
    """A real Lightning checkpoint of an untrained tiny model (training is tested elsewhere)."""
    torch.manual_seed(0)
    module = ProteinLMModule(preset="tiny", objective=objective, config={"attention": attention, "dropout": 0.0})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {(o, a): make_ckpt(d / f"{o}-{a}.ckpt", o, a)
            for o in ("masked", "causal") for a in KINDS}


def proteins(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [Protein(f"p{i}", rng.integers(0, 20, int(rng.integers(5, 60))).astype(np.uint8)) for i in range(n)]


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">tr|{p.name}|E_{p.name} x\n{p.sequence}\n" for p in proteins()))
    return path


@pytest.mark.parametrize("attention", KINDS)
@pytest.mark.parametrize("pool", ["mean", "bos", "per-residue"])
def test_embeddings_do_not_depend_on_batching(ckpts, attention, pool):
    model = load_model(ckpts[("masked", attention)]).model
    prots = proteins()
    one_by_one = embed(model, prots, [0, 2], pool, max_tokens=1)  # every sequence alone
    together = embed(model, prots, [0, 2], pool, max_tokens=10_000)  # all in one padded batch
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


@pytest.mark.parametrize("attention", ["exact", "favor-relu"])
def test_pseudo_likelihood_equals_one_by_one_loop(ckpts, attention):
    model = load_model(ckpts[("masked", attention)]).model
    prot = proteins(1, seed=3)[0]
    fast = score(model, [prot], max_tokens=64)[0]  # several masked copies per batch
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
    terms = score(model, prots, max_tokens=32)
    for prot, t in zip(prots, terms):
        seq = torch.tensor(np.concatenate([[vocab.BOS], prot.tokens]), dtype=torch.long)
        logp = torch.log_softmax(model(seq[None])["logits"][0, :-1], -1)
        expected = logp[torch.arange(len(seq) - 1), seq[1:]].numpy()
        np.testing.assert_allclose(t, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", KINDS)
@torch.no_grad()
def test_greedy_generation_matches_full_forward_argmax(ckpts, attention):
    model = load_model(ckpts[("causal", attention)]).model
    out = generate(model, prompt="MKV", num_sequences=1, max_len=30, temperature=0)[0]
    # the same greedy choice recomputed with a full forward pass over each prefix
    seq = [vocab.BOS, *vocab.encode("MKV").tolist()]
    while len(seq) < 30:  # max_len counts BOS
        logits = model(torch.tensor([seq]))["logits"][0, -1]
        logits[[vocab.BOS, vocab.PAD, vocab.MASK]] = -math.inf
        nxt = int(logits.argmax())
        if nxt == vocab.EOS:
            break
        seq.append(nxt)
    assert out == vocab.decode(seq[1:])


def test_generation_is_reproducible_with_a_seed(ckpts):
    model = load_model(ckpts[("causal", "favor-relu")]).model
    a = generate(model, num_sequences=3, max_len=40, top_k=10, top_p=0.9, seed=5)
    b = generate(model, num_sequences=3, max_len=40, top_k=10, top_p=0.9, seed=5)
    c = generate(model, num_sequences=3, max_len=40, top_k=10, top_p=0.9, seed=6)
    assert a == b and a != c
    assert all(set(s) <= set(vocab.LETTERS) and len(s) <= 39 for s in a)  # 40 tokens with BOS


def test_cli_end_to_end(ckpts, fasta, tmp_path, cli, capsys):
    code, err = cli(["embed", "--ckpt_path", ckpts[("masked", "favor-relu")], "--input", fasta, "--out", tmp_path / "e",
                     "--layers", "1", "2", "--max_tokens", "100"])
    assert code == 0, err
    assert np.load(tmp_path / "e" / "layer2_mean.npy").shape == (7, 64)
    assert (tmp_path / "e" / "index.tsv").read_text().splitlines()[1].startswith("0\tp0\t")
    code, err = cli(["score", "--ckpt_path", ckpts[("causal", "exact")], "--input", fasta, "--out", tmp_path / "s.tsv",
                     "--per_position", tmp_path / "pos.tsv"])
    assert code == 0, err
    rows = (tmp_path / "s.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["id", "length", "scored", "log_likelihood", "perplexity", "method"]
    assert len(rows) == 8
    ll, ppl = float(rows[1].split("\t")[3]), float(rows[1].split("\t")[4])
    n = int(rows[1].split("\t")[2])
    assert math.isclose(ppl, math.exp(-ll / n), rel_tol=1e-3)  # both printed to 4 decimals
    positions = (tmp_path / "pos.tsv").read_text().splitlines()
    assert positions[1].split("\t")[:3] == ["p0", "1", proteins()[0].sequence[0]]  # counted from 1
    code, err = cli(["generate", "--ckpt_path", ckpts[("causal", "favor-softmax")], "--num_sequences", "2",
                     "--max_len", "20", "--seed", "1", "--out", tmp_path / "g.fasta"])
    assert code == 0, err
    assert (tmp_path / "g.fasta").read_text().count(">generated_") == 2


def test_outputs_are_never_overwritten_by_surprise(ckpts, fasta, tmp_path, cli):
    ckpt = ckpts[("masked", "favor-relu")]
    out = tmp_path / "e"
    assert cli(["embed", "--ckpt_path", ckpt, "--input", fasta, "--out", out, "--pool", "per-residue"])[0] == 0
    code, err = cli(["embed", "--ckpt_path", ckpt, "--input", fasta, "--out", out])
    assert code == 2 and "not empty" in err and "--overwrite" in err
    code, err = cli(["embed", "--ckpt_path", ckpt, "--input", fasta, "--out", out, "--overwrite"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["index.tsv", "layer2_mean.npy"]  # no stale per-residue file
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    code, err = cli(["embed", "--ckpt_path", ckpt, "--input", fasta, "--out", users, "--overwrite"])
    assert code == 2 and "not written by this command" in err and (users / "notes.txt").read_text() == "mine"
    code, err = cli(["embed", "--ckpt_path", ckpt, "--input", fasta, "--out", users / "notes.txt"])
    assert code == 2 and "not a directory" in err
    tsv = tmp_path / "s.tsv"
    tsv.write_text("earlier results")
    code, err = cli(["score", "--ckpt_path", ckpt, "--input", fasta, "--out", tsv])
    assert code == 2 and "exists" in err and tsv.read_text() == "earlier results"
    code, err = cli(["score", "--ckpt_path", ckpt, "--input", fasta, "--out", tmp_path])
    assert code == 2 and "is a directory" in err
    assert cli(["score", "--ckpt_path", ckpt, "--input", fasta, "--out", tsv, "--overwrite"])[0] == 0
    assert tsv.read_text().startswith("id\t")


def test_rejected_records_are_reported(ckpts, tmp_path, cli):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nMKV\n>tr|Q1|BAD_1\nMKJV\n>tr|Q2|BAD_2\nMK*\n")
    code, err = cli(["score", "--ckpt_path", ckpts[("causal", "exact")], "--input", bad, "--out", tmp_path / "s.tsv"])
    assert code == 0, err  # --unknown reject, the default of every command
    assert "record 2 (Q1)" in err and "record 3 (Q2)" in err and "skipped" in err
    assert len((tmp_path / "s.tsv").read_text().splitlines()) == 2


@pytest.mark.parametrize("command", ["embed", "score", "analyze", "agreement"])
def test_nucleotide_files_are_refused(ckpts, tmp_path, cli, command):
    dna = tmp_path / "reads.fasta.gz"
    dna.write_bytes(gzip.compress(lambda_reads(40).encode()))
    ckpt, out = ckpts[("causal", "exact")], tmp_path / "out"
    argv = ["agreement", ckpt] if command == "agreement" else [command, "--ckpt_path", ckpt]
    code, err = cli([*argv, "--input", dna, "--out", out])
    assert code == 2 and not out.exists()
    assert f"error: {dna}: 40 of its 40 records are nucleotide sequences (>= 90% A/C/G/T/U/N): a DNA or RNA file" in err


def test_nucleotide_screen_of_a_partly_read_file(tmp_path):
    dna = tmp_path / "reads.fasta"
    dna.write_text(lambda_reads(5))
    with pytest.raises(UserError, match="1 of its 1 records are nucleotide sequences"):
        read_proteins(dna, limit=1)  # stops after the first record: the screen judges what was read


def test_nucleotide_like_records_of_a_protein_file_are_read(ckpts, fasta, tmp_path, cli):
    alone = tmp_path / "afgp.fasta"  # UniProt entries: proteins, however they read
    alone.write_text("".join(f">sp|{acc}|{acc}_FISH\n{seq}\n" for acc, seq in LOW_COMPLEXITY_PROTEINS.items()))
    assert [p.name for p in read_proteins(alone)[0]] == list(LOW_COMPLEXITY_PROTEINS)
    with open(fasta, "a") as f:
        f.writelines(f">{acc}\n{seq}\n" for acc, seq in LOW_COMPLEXITY_PROTEINS.items())
        f.write(f">lambda\n{LAMBDA_DNA}\n")  # 5 of 12 records: still a protein file, read whole
    code, err = cli(["embed", "--ckpt_path", ckpts[("masked", "exact")], "--input", fasta, "--out", tmp_path / "e"])
    assert code == 0, err
    rows = (tmp_path / "e" / "index.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[1] for row in rows] == [f"p{i}" for i in range(7)] + [*LOW_COMPLEXITY_PROTEINS, "lambda"]


def test_errors_are_clear(ckpts, fasta, tmp_path, cli):
    def fails(*argv) -> str:
        code, err = cli(list(argv))
        assert code == 2, err
        return err

    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nMKV\n>tr|Q1|BAD_1\nMKJV\n")
    msg = fails("score", "--ckpt_path", ckpts[("causal", "exact")], "--input", bad, "--out", tmp_path / "s.tsv",
                "--unknown", "error")
    assert "record 2 (Q1)" in msg and "'J' at position 3" in msg  # positions count from 1, as in prep
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    assert "no usable protein sequence" in fails("embed", "--ckpt_path", ckpts[("masked", "exact")], "--input", empty,
                                                 "--out", tmp_path / "e")
    causal = ckpts[("causal", "favor-relu")]
    assert "needs a causal model" in fails("generate", "--ckpt_path", ckpts[("masked", "favor-relu")])
    assert "no such checkpoint" in fails("generate", "--ckpt_path", tmp_path / "nope.ckpt")
    for flag, value in (("--temperature", "-1"), ("--top_k", "-3"), ("--num_sequences", "0"), ("--top_p", "1.5"),
                        ("--top_p", "0"), ("--max_len", "0")):
        assert flag.lstrip("-") in fails("generate", "--ckpt_path", causal, flag, value), (flag, value)
    with pytest.raises(UserError, match="temperature"):  # the library function checks too
        generate(load_model(causal).model, temperature=-1)


def test_diverged_checkpoint_is_refused(ckpts, fasta, tmp_path, cli):
    ckpt = torch.load(ckpts[("causal", "favor-relu")], weights_only=True)
    ckpt["state_dict"]["model.blocks.1.mlp.fc.weight"][0, 0] = float("nan")
    diverged = tmp_path / "diverged.ckpt"
    torch.save(ckpt, diverged)
    for command in (["generate"], ["score", "--input", fasta, "--out", tmp_path / "s.tsv"],
                    ["embed", "--input", fasta, "--out", tmp_path / "e"]):
        code, err = cli([command[0], "--ckpt_path", diverged, *command[1:]])
        assert code == 2 and "not finite" in err and "blocks.1.mlp.fc.weight" in err and str(diverged) in err
    assert not (tmp_path / "s.tsv").exists() and not (tmp_path / "e").exists()


def test_checkpoints_of_release_0_1_still_load(ckpts, tmp_path):
    """0.1 named exact attention "softmax" and held the MLP as an nn.Sequential (mlp.0, mlp.2)."""
    ckpt = torch.load(ckpts[("causal", "exact")], weights_only=True)
    ckpt["protein_performer"].update(version="0.1.0", model_config={**ckpt["protein_performer"]["model_config"],
                                                                    "attention": "softmax"})
    for key in [k for k in ckpt["state_dict"] if ".mlp." in k]:
        old = key.replace("mlp.fc.", "mlp.0.").replace("mlp.proj.", "mlp.2.")
        ckpt["state_dict"][old] = ckpt["state_dict"].pop(key)
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    loaded = load_model(old)
    assert loaded.config.attention == "exact"
    reference = load_model(ckpts[("causal", "exact")]).model.state_dict()
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_checkpoint_from_a_newer_release_is_refused(ckpts, tmp_path, cli):
    ckpt = torch.load(ckpts[("causal", "favor-relu")], weights_only=True)
    ckpt["protein_performer"]["version"] = "9.0.0"
    new = tmp_path / "new.ckpt"
    torch.save(ckpt, new)
    code, err = cli(["generate", "--ckpt_path", new])
    assert code == 2 and "written by protein_performer 9.0.0" in err and str(new) in err
    del ckpt["protein_performer"]
    torch.save(ckpt, new)
    assert "does not hold a protein_performer model" in cli(["generate", "--ckpt_path", new])[1]
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "empty file" in cli(["generate", "--ckpt_path", tmp_path / "empty.ckpt"])[1]


def test_subcommands_are_dispatched_by_the_cli(ckpts, fasta, tmp_path):
    import subprocess

    res = subprocess.run(["protein-performer", "score", "--ckpt_path", str(ckpts[("masked", "favor-relu")]), "--input",
                          str(fasta), "--out", str(tmp_path / "s.tsv")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pseudo" in (tmp_path / "s.tsv").read_text()
