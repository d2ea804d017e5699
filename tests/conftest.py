"""Test-wide settings and the fixtures several test files share.

One intra-op thread per test process: the suite runs as `pytest -n 2` on 2 cores, and two processes that
each start 2 OpenMP threads oversubscribe the machine; small ops then spend most of their time in spinning
thread barriers (measured here: a tiny model's forward pass 100x slower). Subprocesses (the CLI, DDP
ranks) inherit OMP_NUM_THREADS.
"""

import gzip
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils._device  # noqa: E402

from protein_performer import vocab  # noqa: E402
from protein_performer.prep.pipeline import write_prepared  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SAMPLE_FASTA = SAMPLE / "mmseqs2_DB_first3000.fasta.gz"
TINY = REPO / "configs" / "cpu" / "tiny.yaml"
# Real DNA for the nucleotide screen's tests: the first 480 nt of phage lambda's genome (NC_001416.1).
LAMBDA_DNA = (
    "GGGCGGCGACCTCGCGGGTTTTCGCTATTTATGAAAATTTTCCGGTTTAAGGCGTTTCCGTTCTTCTTCGTCATAACTTAATGTTTTTATTTAAAATACCCTCTGAAAAG"
    "AAAGGAAACGACAGGTGCTGAAAGCGAGGCTTTTTGGCCTCTGTCGTTTCCTTTCTCTGTTTTTGTCCGTGGAATGAACAATGGAAGTCAACAAAAAGCAGCTGGCTGAC"
    "ATTTTCGGTGCGAGTATCCGTACCATTCAGAACTGGCAGGAACAGGGAATGCCCGTTCTGCGAGGCGGTGGCAAGGGTAATGAGGTGCTTTATGACTCTGCCGCCGTCAT"
    "AAAATGGTATGCCGAAAGGGATGCTGAAATTGAGAACGAAAAGCTGCGCCGGGAGGTTGAAGAACTGCGGCAGGCCAGCGAGGCAGATCTCCAGCCAGGAACTATTGAG"
    "TACGAACGCCATCGACTTACGCGTGCGCAGGCCGACGCACA"
)

# Real proteins that nonetheless read as nucleotides (>= 90% A/C/G/T/U/N): antifreeze glycoprotein P02732 is (AAT)n,
# 31 residues; poly-A and poly-G fragments; an asparagine run as in P. falciparum's proteins.
LOW_COMPLEXITY_PROTEINS = {
    "P02732": "AAT" * 10 + "A",
    "POLYA": "A" * 24,
    "POLYG": "G" * 40,
    "NRICH": "MNNNNDNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNNK",
}


def lambda_reads(n: int) -> str:
    """n FASTA records of 60-100 nt read off LAMBDA_DNA, as a sequencer's reads file would hold them."""
    return "".join(f">read{i}\n{LAMBDA_DNA[i % 380 : i % 380 + 60 + i % 41]}\n" for i in range(n))


def make_prepared_dir(root: Path, counts=(240, 48, 48, 24), seed=0) -> Path:
    """Sequences made of a few recurring motifs and skewed amino-acid frequencies, so that a tiny model has
    something to learn within a few steps."""
    rng = np.random.default_rng(seed)
    freqs = rng.dirichlet(np.ones(vocab.NUM_AMINO_ACIDS))
    motifs = [rng.choice(vocab.NUM_AMINO_ACIDS, size=8, p=freqs) for _ in range(6)]

    def protein():
        def part():
            if rng.random() < 0.6:
                return motifs[rng.integers(6)]
            return rng.choice(vocab.NUM_AMINO_ACIDS, size=rng.integers(3, 20), p=freqs)

        parts = [part() for _ in range(rng.integers(2, 12))]
        return np.concatenate(parts).astype(np.uint8)

    splits = ("train", "valid", "test", "ood")
    return write_prepared(root, {s: [protein() for _ in range(n)] for s, n in zip(splits, counts)})


@pytest.fixture
def make_prepared():
    return make_prepared_dir


@pytest.fixture
def prepared_from():
    """write_prepared: a prepared directory from token arrays per split."""
    return write_prepared


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    return make_prepared_dir(tmp_path_factory.mktemp("prepared"))


def prep_sample(out: Path) -> Path:
    """The bundled UniProt sample prepared by `protein-performer-prep`, three Pfam families held out (as the demo)."""
    subprocess.run(
        [sys.executable, "-m", "protein_performer.prep", str(SAMPLE_FASTA), str(SAMPLE / "emboss_swiss_seq.dat.gz"),
         "--out", str(out), "--ood_families", "PF00258", "PF00001", "PF00022", "--workers", "1", "--no_progress"],
        check=True, capture_output=True, cwd=REPO,
    )
    return out


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    return prep_sample(tmp_path_factory.mktemp("sample") / "prepared")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`protein-performer ARGV` in this process: (exit status, stderr); stdout goes to the caller's capsys."""
    from protein_performer.cli import main

    err = []
    with mock.patch.object(sys, "argv", ["protein-performer"]), mock.patch.object(sys, "stderr") as stderr:
        stderr.write.side_effect = err.append
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.append(e.code)
    return code, "".join(err)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """The bundled sample FASTA prepared, a 4-step real `protein-performer fit` on it with CSV logs, and a small
    plain FASTA of its first 12 records."""
    root = tmp_path_factory.mktemp("tiny-run")
    paths = {"prepared": root / "prepared", "run": root / "run", "fasta": root / "small.fasta"}
    subprocess.run([sys.executable, "-m", "protein_performer.prep", str(SAMPLE_FASTA), "--out", str(paths["prepared"]),
                    "--workers", "1", "--no_progress"], check=True, capture_output=True, cwd=REPO)
    code, err = run_cli(["fit", "--config", TINY, "--data.data_dir", paths["prepared"], "--trainer.max_steps", "4",
                         "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                         "--trainer.default_root_dir", paths["run"], "--trainer.logger.init_args.save_dir",
                         paths["run"], "--trainer.enable_model_summary", "false", "--data.max_len", "128",
                         "--data.batch_size", "4"])
    assert code == 0, err
    with gzip.open(SAMPLE_FASTA, "rt") as f:
        text = f.read().split(">")[1:13]
    paths["fasta"].write_text("".join(">" + r for r in text))
    return paths


@pytest.fixture(scope="session")
def ckpt(tiny_run) -> Path:
    return next(tiny_run["run"].rglob("last.ckpt"))


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty, torch.empty_like and Tensor.new_empty give NaN-filled floating-point tensors (as
    flash-linear-attention's tests do), so that code reading a buffer it has not fully written, in forward or in
    backward, gives NaN. (A TorchFunctionMode would be cleaner but does not reach autograd's backward.)"""

    def filled(make):
        def make_filled(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point():
                with torch.no_grad():  # also a leaf made with requires_grad=True
                    t.fill_(math.nan)
            return t

        return make_filled

    # `with torch.device(...)` looks factory functions up in a cached list built on first use: build it from the
    # real ones now, or a first use inside this fixture would cache the wrappers for the rest of the process.
    getattr(torch.utils._device, "_device_constructors", lambda: None)()
    monkeypatch.setattr(torch, "empty", filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", filled(torch.Tensor.new_empty))
