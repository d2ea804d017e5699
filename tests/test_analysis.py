"""Attention analysis: planted structure, permutation test, identity-values trick, checkpoints, CLI, errors."""

import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from protein_performer import vocab
from protein_performer.analysis import (
    AttentionToAminoAcids,
    agreement,
    analyze_attention,
    blosum62,
    embedding_similarity,
    identity_value_maps,
    similarity_matrix,
)
from protein_performer.checkpoints import load_model
from protein_performer.errors import UserError
from protein_performer.model import ATTENTION_KINDS, Config, ProteinLM
from protein_performer.proteins import Protein, read_proteins

# ------------------------------------------------------------------------------- agreement statistics


def symmetric(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def test_agreement_matches_scipy_and_detects_planted_similarity():
    rng = np.random.default_rng(0)
    sim = symmetric(blosum62() + rng.normal(0, 2, (20, 20)))  # BLOSUM62 plus noise of about its own spread
    g = agreement(sim, permutations=2000, seed=1)
    iu, ju = np.triu_indices(20, 1)
    assert g["pairs"] == 190 and g["amino_acids"] == vocab.AMINO_ACIDS
    assert g["pearson"] == pytest.approx(pearsonr(sim[iu, ju], blosum62()[iu, ju])[0], abs=1e-9)
    assert g["spearman"] == pytest.approx(spearmanr(sim[iu, ju], blosum62()[iu, ju])[0], abs=1e-9)
    # No permutation reaches r ~ 0.7: p is the smallest possible value, 1 / (1 + permutations).
    assert g["pearson"] > 0.5 and g["pearson_p"] == g["spearman_p"] == pytest.approx(1 / 2001)


def test_permutation_test_is_calibrated_under_the_null():
    # Random symmetric matrices: p-values are ~uniform, so about 5% fall below 0.05. With 60 draws the
    # count below 0.05 is Binomial(60, 0.05), mean 3; P(count > 9) < 0.002, so the bound is safe but
    # would catch a test that ignores the dependence of the 190 pairs or a one-sidedness error.
    rng = np.random.default_rng(0)
    ps = [agreement(symmetric(rng.normal(size=(20, 20))), permutations=999, seed=s)["pearson_p"] for s in range(60)]
    assert sum(p < 0.05 for p in ps) <= 9
    assert 0.3 < np.median(ps) < 0.7


def test_similarity_matrix_and_undefined_amino_acids():
    rng = np.random.default_rng(0)
    shares = rng.random((12, 20))
    np.testing.assert_allclose(similarity_matrix(shares), np.corrcoef(shares.T), atol=1e-12)
    shares[:, 4] = 0.0  # F never attended to: its correlation is undefined, it leaves the comparison
    sim = similarity_matrix(shares)
    assert np.isnan(sim[4]).all() and np.isnan(sim[:, 4]).all()
    g = agreement(sim, permutations=100)
    assert g["pairs"] == 171 and "F" not in g["amino_acids"]
    assert np.isnan(similarity_matrix(shares[:2])).all()  # fewer than 3 heads
    assert agreement(similarity_matrix(shares[:2]))["pearson"] is None


# ----------------------------------------------------------------- aggregation of attention per amino acid


def test_attention_to_amino_acids_counts_by_hand():
    tokens = torch.tensor([vocab.BOS, 0, 1, vocab.X])  # BOS A C X
    maps = torch.tensor([[0.1, 0.5, 0.4, 0.0],
                         [0.0, 0.2, 0.4, 0.4],
                         [0.5, 0.3, 0.1, 0.1],
                         [0.2, 0.1, 0.3, 0.4]]).expand(1, 2, 4, 4)
    stats = AttentionToAminoAcids(1, 2, threshold=0.3)
    stats.update(maps, tokens)
    p, totals = stats.shares("threshold")
    # BOS rows and columns are left out; kept (>= 0.3): row A -> C, X; row C -> A; row X -> C, X.
    assert totals[0, 0] == 5 and p[0, 0, 0] == pytest.approx(1 / 5) and p[0, 0, 1] == pytest.approx(2 / 5)
    assert p[0, 0, 2:].sum() == 0  # X counts in the total, but is not one of the 20 amino acids
    w, wt = stats.shares("weighted")
    assert wt[0, 0] == pytest.approx(2.3)
    assert w[0, 0, 0] == pytest.approx(0.6 / 2.3) and w[0, 0, 1] == pytest.approx(0.8 / 2.3)
    assert stats.head_mask("threshold", min_kept=6).sum() == 0 and stats.head_mask("threshold", min_kept=5).all()


def test_causal_first_rows_are_left_out_of_the_threshold_variant():
    # Uniform causal rows: row of n keys (BOS included) = 1/n each. Rows with n = 2, 3 reach 0.5 and 0.33 >= 0.3
    # whatever the head does; from n = 4 on uniform weights are <= 0.25. One chosen weight of 0.9 (residue 5 on
    # residue 2) must be the only one kept; the weighted variant still counts every row.
    length = 8  # BOS + 7 residues
    maps = torch.tril(torch.ones(length, length))
    maps = maps / maps.sum(-1, keepdim=True)
    maps[5] = torch.tensor([0.02, 0.02, 0.9, 0.02, 0.02, 0.02, 0.0, 0.0])
    tokens = torch.tensor([vocab.BOS, 0, 1, 2, 3, 4, 5, 6])
    stats = AttentionToAminoAcids(1, 1, threshold=0.3, causal=True)
    stats.update(maps.expand(1, 1, length, length), tokens)
    p, totals = stats.shares("threshold")
    assert totals[0, 0] == 1 and p[0, 0, 1] == 1  # residue 2 is amino acid id 1
    _, weight_totals = stats.shares("weighted")
    assert weight_totals[0, 0] == pytest.approx(float(maps[1:, 1:].sum()))


def planted_stats(planted: bool, n_layers=4, n_heads=16, proteins=40, length=80, seed=0) -> AttentionToAminoAcids:
    """Attention of synthetic proteins. planted: head h prefers residues similar to its own amino acid c_h
    (every amino acid is some head's), logit(i -> j) = 0.3 BLOSUM62[c_h, residue_j] + noise; otherwise the
    logits are pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.permutation(np.arange(n_layers * n_heads) % 20).reshape(n_layers, n_heads)
    bias = 0.3 * torch.from_numpy(blosum62()[centres]).float()  # (n_layers, H, 20)
    stats = AttentionToAminoAcids(n_layers, n_heads, threshold=0.1)
    for _ in range(proteins):
        residues = torch.from_numpy(rng.integers(0, 20, length))
        tokens = torch.cat([torch.tensor([vocab.BOS]), residues])
        logits = torch.from_numpy(rng.normal(size=(n_layers, n_heads, length + 1, length + 1))).float()
        if planted:
            logits[..., 1:] += bias[..., residues][..., None, :]
        stats.update(torch.softmax(logits, -1), tokens)
    return stats


@pytest.mark.parametrize("variant", ["threshold", "weighted"])
def test_planted_structure_is_found_and_random_attention_is_not(variant):
    # Planted: a head's share of attention on a follows BLOSUM62[c_h, a], so amino acids that BLOSUM62 scores
    # alike rise and fall together across heads. 64 heads make the estimate stable: r is 0.7-0.9 here,
    # so > 0.5 leaves a wide margin. Random attention has no such structure: the permutation null has a
    # standard deviation of about 0.1 (more than 1/sqrt(190), the pairs share amino acids), so |r| < 0.3 is
    # 3 sigma and p > 0.01 fails for 1% of seeds; the seed is fixed.
    def found(g):
        return g["pearson"] > 0.5 and g["spearman"] > 0.5 and g["pearson_p"] < 0.01 and g["spearman_p"] < 0.01

    def not_found(g):
        return abs(g["pearson"]) < 0.3 and g["pearson_p"] > 0.01 and g["spearman_p"] > 0.01

    for planted, check in ((True, found), (False, not_found)):
        stats = planted_stats(planted)
        shares, _ = stats.shares(variant)
        used = stats.head_mask(variant, min_kept=20)
        assert used.sum() >= 32
        g = agreement(similarity_matrix(shares[used]), permutations=2000)
        assert g["pairs"] == 190 and check(g), (planted, g)


# ------------------------------------------------------------------ attention maps of every attention kind


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_identity_values_trick_equals_direct_maps(kind, causal):
    torch.manual_seed(0)
    cfg = Config.from_name("tiny", attention=kind, causal=causal, n_layers=2, chunk_size=8, dropout=0.0)
    model = ProteinLM(cfg).eval()
    tokens = torch.randint(0, 20, (2, 21))
    tokens[:, 0] = vocab.BOS
    padding_mask = torch.ones_like(tokens, dtype=torch.bool)
    padding_mask[1, 15:] = False
    tokens[1, 15:] = vocab.PAD
    direct = model.attention_maps(tokens, padding_mask)  # (n_layers, B, H, L, L)
    trick = identity_value_maps(model, tokens, padding_mask)
    real = padding_mask[None, :, None, :, None]  # rows of real queries
    torch.testing.assert_close(trick * real, direct * real, atol=2e-5, rtol=1e-4)
    rows = direct.sum(-1)[real[..., 0].expand_as(direct[..., 0])]
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)
    assert (direct >= 0).all() and (direct[..., ~padding_mask[1]][:, 1] == 0).all()  # no weight on padding
    if causal:
        assert (direct.triu(1) == 0).all()


# ------------------------------------------------------------------------------ checkpoints and inputs


def test_load_model_rebuilds_the_trained_network(ckpt):
    loaded = load_model(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert loaded.config.attention == "favor-softmax" == state["hyper_parameters"]["config"]["attention"]
    assert loaded.objective == "masked"
    assert loaded.step == 4 and not loaded.model.training
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][f"model.{name}"], atol=0, rtol=0)
    assert load_model(ckpt.parents[2]).path == ckpt  # a run directory resolves to its last.ckpt


def test_offset_analyses_the_windows_after_it_and_counts_short_proteins(ckpt):
    loaded = load_model(ckpt)
    rng = np.random.default_rng(0)
    proteins = [Protein(f"p{i}", rng.integers(0, 20, n).astype(np.uint8)) for i, n in enumerate([40, 25, 9, 60])]
    shifted = analyze_attention(loaded, proteins, max_len=32, offset=10, threshold=0.05, min_kept=1,
                                permutations=100)
    # the same proteins cut by hand (the 9-residue one has nothing after residue 10): identical statistics
    cut = [Protein(p.name, p.tokens[10:]) for p in proteins if len(p.tokens) > 10]
    by_hand = analyze_attention(loaded, cut, max_len=32, threshold=0.05, min_kept=1, permutations=100)
    assert (shifted.num_sequences, shifted.short_sequences, shifted.offset) == (3, 1, 10)
    assert shifted.num_residues == by_hand.num_residues == 30 + 15 + 31
    for name in ("threshold", "weighted"):
        np.testing.assert_array_equal(shifted.similarity[name], by_hand.similarity[name])
    with pytest.raises(UserError, match="offset 60: no protein is longer than that .*has 60 residues"):
        analyze_attention(loaded, proteins, offset=60)
    with pytest.raises(UserError, match="offset -1: must be >= 0"):
        analyze_attention(loaded, proteins, offset=-1)


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="nope.ckpt"):
        load_model(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="text.ckpt"):
        load_model(tmp_path / "text.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="does not hold a protein_performer model"):
        load_model(tmp_path / "other.ckpt")


def test_read_fasta(tmp_path):
    fasta = tmp_path / "x.fasta.gz"
    with gzip.open(fasta, "wt") as f:
        f.write(">tr|Q1|E1_HUMAN some protein\nMKV\nLA\n>bad\nMKJ*\n>plain description\nacdy\n>empty\n")
    proteins, _ = read_proteins(fasta)
    assert [(p.name, p.entry, p.sequence) for p in proteins] == [("Q1", "E1_HUMAN", "MKVLA"), ("plain", "", "ACDY")]
    assert [p.name for p in read_proteins(fasta, limit=1)[0]] == ["Q1"]
    assert read_proteins(fasta, limit=1, also="plain")[1].sequence == "ACDY"  # found in the same pass


# ------------------------------------------------------------------------------------------------ CLI


def check_outputs(out: Path) -> dict:
    for name in ("attention_grid.png", "attention_head.png", "similarity.png", "agreement_by_layer.png", "summary.json",
                 "similarity_threshold.csv", "similarity_weighted.csv", "similarity_embedding.csv",
                 "similarity_output.csv", "blosum62.csv", "agreement_by_layer.csv", "head_shares.csv",
                 "attention_entropy.csv", "attention_maps.npz"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["attention"] == "favor-softmax" and summary["model"]["n_layers"] == 2
    for variant in ("threshold", "weighted"):
        g = summary[f"{variant}_similarity"]
        assert g["heads_total"] == 8 and 0 <= g["heads_used"] <= 8
        if g["pearson"] is not None:
            assert -1 <= g["pearson"] <= 1 and -1 <= g["spearman"] <= 1 and 0 < g["pearson_p"] <= 1
    assert len(summary["by_layer"]) == 2 * 2
    for control in ("embedding", "output"):  # 20 amino acids' rows: always defined
        assert summary[f"{control}_similarity"]["pairs"] == 190
    assert 0 < summary["mean_attention_entropy"] <= 1
    assert summary["featured"]["identity_trick_max_abs_diff"] < 1e-4
    maps = np.load(out / "attention_maps.npz")["maps"].astype(np.float32)
    assert maps.shape[:2] == (2, 4) and np.allclose(maps.sum(-1), 1, atol=1e-2)
    return summary


def test_cli_end_to_end_prepared_dir(tiny_run, ckpt, tmp_path, cli, capsys):
    out = tmp_path / "out"
    code, err = cli(["analyze", "--ckpt_path", ckpt, "--input", tiny_run["prepared"], "--out", out,
                     "--num_sequences", "6", "--max_len", "64", "--threshold", "0.05", "--min_kept", "1",
                     "--permutations", "500", "--offset", "2"])
    assert code == 0, err
    summary = check_outputs(out)
    assert summary["split"] == "test" and summary["num_sequences"] == 6 and summary["max_len"] == 64
    assert summary["offset"] == 2 and summary["short_sequences"] == 0
    assert summary["featured"]["name"] == "test/0" and summary["featured"]["length"] <= 63
    assert summary["weighted_similarity"]["pairs"] > 0 and summary["weighted_similarity"]["heads_used"] == 8
    printed = capsys.readouterr().out
    assert str(out) in printed and "Pearson" in printed and "windows from residue 3" in printed


def test_cli_end_to_end_fasta_with_accession(tiny_run, ckpt, tmp_path, cli):
    accession = read_proteins(tiny_run["fasta"])[0][5].name
    out = tmp_path / "out"
    code, err = cli(["analyze", "--ckpt_path", ckpt, "--input", tiny_run["fasta"], "--out", out, "--num_sequences", "3",
                     "--max_len", "48", "--accession", accession, "--head", "1", "2", "--permutations", "200"])
    assert code == 0, err
    summary = check_outputs(out)
    assert summary["featured"]["name"] == accession and summary["featured"]["head"] == {"layer": 1, "head": 2}
    assert summary["split"] is None and summary["num_sequences"] == 3


def test_cli_subcommand_through_a_pipe(tiny_run, ckpt, tmp_path):
    """The installed console script, reading its FASTA from a pipe (as `<(zcat ...)` hands it)."""
    out = tmp_path / "out"
    result = subprocess.run(
        f"protein-performer analyze --ckpt_path {ckpt} --input <(cat {tiny_run['fasta']}) --out {out} "
        "--num_sequences 2 --max_len 32 --permutations 100",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    check_outputs(out)


def test_cli_errors_name_the_path(tiny_run, ckpt, tmp_path, cli):
    base = ["--out", tmp_path / "out", "--num_sequences", "2", "--permutations", "10"]

    def failure(*argv) -> str:
        code, err = cli(["analyze", *argv, *base])
        assert code == 2, err
        assert "protein-performer analyze: error: " in err
        return err

    fasta, prepared = tiny_run["fasta"], tiny_run["prepared"]
    missing = tmp_path / "missing.ckpt"
    assert str(missing) in failure("--ckpt_path", missing, "--input", fasta)
    not_ckpt = tmp_path / "x.ckpt"
    not_ckpt.write_bytes(b"\x00garbage")
    assert str(not_ckpt) in failure("--ckpt_path", not_ckpt, "--input", fasta)
    missing_input = tmp_path / "missing.fasta"
    assert str(missing_input) in failure("--ckpt_path", ckpt, "--input", missing_input)
    assert "is a directory" in failure("--ckpt_path", ckpt, "--input", tmp_path)
    junk = tmp_path / "junk.fasta"
    junk.write_text(">a\nMKJ1*\n>b\n\n>c\n12 34\n")
    message = failure("--ckpt_path", ckpt, "--input", junk)
    assert str(junk) in message and "no usable protein sequence" in message
    message = failure("--ckpt_path", ckpt, "--input", prepared, "--split", "nosuch")
    assert "nosuch" in message and str(prepared) in message
    assert "NOPE_HUMAN" in failure("--ckpt_path", ckpt, "--input", fasta, "--accession", "NOPE_HUMAN")
    assert "head" in failure("--ckpt_path", ckpt, "--input", fasta, "--head", "5", "0")


def test_cli_refuses_to_overwrite(tiny_run, ckpt, tmp_path, cli):
    def analyze(out, *extra):
        return cli(["analyze", "--ckpt_path", ckpt, "--input", tiny_run["fasta"], "--out", out, "--num_sequences", "2",
                    "--max_len", "32", "--permutations", "10", *extra])

    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("a user's file")
    code, err = analyze(users)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    code, err = analyze(users, "--overwrite")
    assert code == 2 and "not written by this command" in err and (users / "notes.txt").exists()
    ours = tmp_path / "analysis"  # what an earlier analyze left: its summary.json, a stale figure, a user's note
    ours.mkdir()
    for name, text in (("summary.json", "{}"), ("attention_grid.png", "stale"), ("notes.txt", "kept")):
        (ours / name).write_text(text)
    code, err = analyze(ours, "--overwrite")
    assert code == 0, err
    assert (ours / "notes.txt").read_text() == "kept" and (ours / "summary.json").read_text() != "{}"
    assert (ours / "attention_grid.png").read_bytes().startswith(b"\x89PNG")


def test_embedding_similarity_is_the_row_correlation():
    rows = np.random.default_rng(0).normal(size=(20, 16))
    sim = embedding_similarity(rows)
    assert sim.shape == (20, 20) and sim[3, 7] == pytest.approx(np.corrcoef(rows[3], rows[7])[0, 1])
    planted = embedding_similarity(blosum62() + np.random.default_rng(1).normal(0, 0.5, (20, 20)))
    assert agreement(planted, permutations=500)["pearson"] > 0.5  # rows that encode BLOSUM62 agree with it


def test_agreement_over_training_cli(tiny_run, tmp_path, cli):
    out = tmp_path / "agreement"
    args = ["agreement", tiny_run["run"], "--input", tiny_run["fasta"], "--out", out, "--num_sequences", "3",
            "--max_len", "32", "--permutations", "50"]
    code, err = cli(args)
    assert code == 0, err
    import pandas as pd

    table = pd.read_csv(out / "agreement_over_training.csv")
    steps = sorted(torch.load(p, weights_only=True)["global_step"] for p in tiny_run["run"].rglob("*.ckpt"))
    assert table["step"].tolist() == sorted(set(steps))  # one row per step: last.ckpt repeats one
    assert {"weighted_r", "weighted_p", "threshold_heads", "embedding_r", "output_r", "entropy"} <= set(table)
    assert (table["attention"] == "favor-softmax").all() and (out / "agreement_over_training.png").exists()
    code, err = cli(args)
    assert code == 2 and "--overwrite" in err


def test_attention_entropy_by_hand():
    """Uniform rows have relative entropy 1, one-hot rows 0; a causal model's uniform row spreads over its
    prefix only (row i over i + 1 keys), which must count as uniform too."""
    length = 6
    tokens = torch.tensor([vocab.BOS, 0, 1, 2, 3, 4])
    uniform = torch.full((1, 1, length, length), 1 / length)
    causal = torch.ones(length, length).tril()
    causal = (causal / causal.sum(-1, keepdim=True))[None, None]
    onehot = torch.zeros(1, 1, length, length)
    onehot[..., 0] = 1.0
    for maps, is_causal, expected in ((uniform, False, 1.0), (causal, True, 1.0), (onehot, False, 0.0)):
        stats = AttentionToAminoAcids(1, 1, threshold=0.3, causal=is_causal)
        stats.update(maps, tokens)
        assert stats.mean_entropy()[0, 0] == pytest.approx(expected, abs=1e-6)  # float32 maps: terms to ~1e-7


def test_a_run_directory_resolves_to_its_newest_last_checkpoint(tmp_path, ckpt):
    """A second run into the same folder writes last-v1.ckpt beside the first run's last.ckpt (Lightning's
    numbering); the newer one is the run's."""
    import os
    import shutil

    from protein_performer.checkpoints import find_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(ckpt, folder / "last.ckpt")
    shutil.copy(ckpt, folder / "last-v1.ckpt")
    os.utime(folder / "last.ckpt", (1, 1))  # the older run's
    assert find_checkpoint(tmp_path / "run") == folder / "last-v1.ckpt"


def test_split_table_reads_table_1_from_the_manifest(sample_dir):
    from protein_performer.analysis import overview
    from protein_performer.prepared import PreparedDir

    table, corpus = overview.split_table(sample_dir), PreparedDir(sample_dir)
    assert list(table.index) == corpus.splits
    for split in corpus.splits:
        n = corpus.split(split).lengths
        assert table.loc[split, "sequences"] == n.size and table.loc[split, "residues"] == n.sum()
        assert table.loc[split, "median"] == pytest.approx(np.median(n))
        assert table.loc[split, "std"] == pytest.approx(n.std())
