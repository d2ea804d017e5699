"""protein-performer-prep under misuse and accidents (issue 11): what --overwrite may replace, two runs into one
output, killed runs, tiny inputs, full disks, odd label files, nucleotide records, pipes and devices as inputs."""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser
from conftest import LAMBDA_DNA, LOW_COMPLEXITY_PROTEINS, lambda_reads

from protein_performer.errors import UserError
from protein_performer.fasta import NucleotideScreen, is_nucleotide_like
from protein_performer.prep import records
from protein_performer.prep.__main__ import main
from protein_performer.prepared import MANIFEST_FILE, OFFSETS_FILE, TOKENS_FILE, SplitWriter
from protein_performer.vocab import EOS, encode

ROOT = Path(__file__).resolve().parents[1]
FASTA = ROOT / "data" / "sample" / "mmseqs2_DB_first3000.fasta.gz"
PROTEOMES = Path(os.environ.get("PROTEOMES_DIR", "/nonexistent"))  # UniProt proteome FASTA files, optional
PROTEIN = "MKVLAAGIVALLLAAGCSSEKPQTEVRVETPSAQ"


def cli(*args: str) -> int:
    """Exit status of the command line run in this process (errors exit through SystemExit)."""
    try:
        return main(list(args))
    except SystemExit as e:
        return e.code


def prep(*args: str) -> int:
    return cli(*args, "--workers", "1", "--no_progress")


def env() -> dict:
    """The environment for a prep subprocess: this checkout first on the import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def start_prep():
    """Start a prep in a subprocess; whatever a failing test leaves running (blocked on its FIFO) is killed."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "protein_performer.prep", *args, "--workers", "1", "--no_progress"]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fasta(path: Path, n: int) -> Path:
    """n distinct protein records."""
    letters = "ACDEFGHIKLMNPQRSTVWY"
    path.write_text(
        "".join(f">tr|P{i}|X\n{PROTEIN}{''.join(letters[i // 20**k % 20] for k in range(3))}\n" for i in range(n))
    )
    return path


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


class FifoInput:
    """A named pipe as a prep input: the prep blocks reading it (holding its lock) until `feed` writes."""

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "input.fifo"
        os.mkfifo(self.path)

    def writer(self, timeout: float = 60):
        """The pipe opened for writing, once the prep opens it for reading (a daemon thread waits, not the test)."""
        opened: list = []
        thread = threading.Thread(target=lambda: opened.append(open(self.path, "wb")), daemon=True)  # noqa: SIM115
        thread.start()
        thread.join(timeout)
        if not opened:
            raise AssertionError(f"no prep opened {self.path} for reading within {timeout} s")
        return opened[0]

    def feed(self, data: bytes) -> None:
        with self.writer() as f:
            f.write(data)


def lock_holder(out: Path) -> str:
    lock = out.parent / f".{out.name}.lock"
    return lock.read_text() if lock.exists() else ""


# ---- 1. --overwrite replaces only a prepared or empty directory ----


def test_overwrite_refuses_a_folder_with_the_input_and_other_files(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    fasta(folder / "my_proteins.fasta", 20)
    (folder / "notes.txt").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # exactly as reported: run inside the folder with --out .
    proc = subprocess.run(
        [sys.executable, "-m", "protein_performer.prep", "my_proteins.fasta", "--out", ".", "--overwrite"],
        cwd=folder,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "my_proteins.fasta: input lies inside the output directory" in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("extra", ["notes.txt", "train/notes.txt"])
def test_overwrite_refuses_foreign_files(tmp_path, capsys, extra):
    inp = fasta(tmp_path / "in.fasta", 20)
    out = tmp_path / "out"
    assert prep(str(inp), "--out", str(out)) == 0
    (out / extra).write_text("keep me\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me\n")
    capsys.readouterr()
    for target in (out, tmp_path / "other"):
        code = prep(str(inp), "--out", str(target), "--overwrite")
        err = capsys.readouterr().err
        assert (
            code == 2
            and f"{target}: " in err
            and "--overwrite replaces only a prepared directory or an empty one" in err
        )
        assert (target / ("notes.txt" if target.name == "other" else extra)).read_text() == "keep me\n"
    if extra == "train/notes.txt":  # a file prep did not write inside a split directory: its own check
        return
    (out / extra).unlink()
    assert prep(str(inp), "--out", str(out), "--overwrite") == 0  # a prepared directory is replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prep(str(inp), "--out", str(empty), "--overwrite") == 0 and (empty / MANIFEST_FILE).is_file()
    assert leftovers(tmp_path) == []


def test_overwrite_is_checked_again_at_the_swap(tmp_path, start_prep):
    inp = fasta(tmp_path / "in.fasta", 20)
    out = tmp_path / "out"
    assert prep(str(inp), "--out", str(out)) == 0
    manifest = (out / MANIFEST_FILE).read_bytes()
    fifo = FifoInput(tmp_path)
    proc = start_prep(str(fifo.path), "--out", str(out), "--overwrite")
    wait_for(lambda: f"pid {proc.pid}" in lock_holder(out), "the run to take its lock")
    (out / "notes.txt").write_text("written while the run was going\n")
    fifo.feed(inp.read_bytes())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "holds files protein-performer-prep did not write (notes.txt)" in err
    assert "during this run" in err
    assert (out / MANIFEST_FILE).read_bytes() == manifest and (out / "notes.txt").exists()
    assert leftovers(tmp_path) == []


# ---- 2. one run at a time per output; 3. what killed runs leave is removed by the next run ----


def test_second_run_into_the_same_new_output_fails_fast(tmp_path, start_prep, capsys):
    inp = fasta(tmp_path / "in.fasta", 20)
    out = tmp_path / "out"
    fifo = FifoInput(tmp_path)
    first = start_prep(str(fifo.path), "--out", str(out))
    wait_for(lambda: f"pid {first.pid}" in lock_holder(out), "the first run to take its lock")
    started = time.monotonic()
    code = prep(str(FASTA), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 10
    assert f"{out}: another protein-performer-prep run is writing it (pid {first.pid}" in err
    assert len([n for n in leftovers(tmp_path) if ".tmp-" in n]) == 1  # the first run's work is left alone
    fifo.feed(inp.read_bytes())
    _, first_err = first.communicate(timeout=60)
    assert first.returncode == 0, first_err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["inputs"][0]["path"] == str(fifo.path) and manifest["records"]["read"] == 20
    assert leftovers(tmp_path) == []
    # the next run finds the finished output and refuses it (no lock left behind)
    assert prep(str(FASTA), "--out", str(out)) == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def test_output_created_during_the_run_is_not_replaced(tmp_path, start_prep):
    inp = fasta(tmp_path / "in.fasta", 20)
    out = tmp_path / "out"
    fifo = FifoInput(tmp_path)
    proc = start_prep(str(fifo.path), "--out", str(out))
    wait_for(lambda: f"pid {proc.pid}" in lock_holder(out), "the run to take its lock")
    out.mkdir()  # e.g. another tool, or a prep of an older version that takes no lock
    fifo.feed(inp.read_bytes())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{out}: output directory exists (it appeared or changed during this run)" in err
    assert out.is_dir() and not any(out.iterdir()) and leftovers(tmp_path) == []


def test_killed_run_leaves_temporary_directory_that_the_next_run_removes(tmp_path, start_prep, capsys):
    inp = fasta(tmp_path / "in.fasta", 20)
    out = tmp_path / "out"
    fifo = FifoInput(tmp_path)
    proc = start_prep(str(fifo.path), "--out", str(out))
    wait_for(lambda: f"pid {proc.pid}" in lock_holder(out), "the run to take its lock")
    writer = fifo.writer()  # held open across the kill
    writer.write(inp.read_bytes()[:200])
    writer.flush()
    (tmp_dir,) = [tmp_path / n for n in leftovers(tmp_path) if ".tmp-" in n]
    (tmp_dir / "train" / TOKENS_FILE).write_bytes(bytes(1_500_000))  # as a killed run's partial shard
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    writer.close()
    assert tmp_dir.exists()
    assert prep(str(inp), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert f"note: removed 1 temporary directory left beside {out} by killed runs (1.5 MB): {tmp_dir.name}" in err
    assert leftovers(tmp_path) == [] and (out / MANIFEST_FILE).is_file()


def test_file_system_without_locks_runs_unlocked(tmp_path, capsys, monkeypatch):
    stale = tmp_path / ".out.tmp-0000dead"
    stale.mkdir()

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    assert prep(str(fasta(tmp_path / "in.fasta", 20)), "--out", str(tmp_path / "out")) == 0
    assert "does not support locks (No locks available)" in capsys.readouterr().err
    assert stale.is_dir() and (tmp_path / "out" / MANIFEST_FILE).is_file() and leftovers(tmp_path) == [stale.name]


# ---- 4. tiny inputs ----


@pytest.mark.parametrize("n", [1, 2])
def test_input_too_small_for_a_train_split_is_refused(tmp_path, capsys, n):
    out = tmp_path / "out"
    code = prep(str(fasta(tmp_path / "in.fasta", n)), "--out", str(out))
    err = capsys.readouterr().err
    s = "s" if n > 1 else ""
    assert code == 2 and f"the train split would be empty: {n} sequence{s} kept after de-duplication" in err
    assert "--min_valid" in err and not out.exists() and leftovers(tmp_path) == []
    assert prep(str(tmp_path / "in.fasta"), "--out", str(out), "--min_valid", "0", "--min_test", "0") == 0


def test_empty_valid_or_test_split_is_a_warning(tmp_path, capsys):
    out = tmp_path / "out"
    code = prep(str(fasta(tmp_path / "in.fasta", 12)), "--out", str(out), "--min_valid", "0", "--valid_fraction", "0")
    err = capsys.readouterr().err
    assert code == 0 and "warning: the valid split is empty (12 sequences kept" in err and "test split" not in err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--min_valid", "-1"),
        ("--min_test", "-3"),
        ("--valid_fraction", "1"),
        ("--test_fraction", "-0.1"),
        ("--valid_fraction", "1.5"),
        ("--workers", "0"),
        ("--seed", "-1"),
        ("--format", "genbank"),
        ("--unknown", "skip"),
    ],
)
def test_nonsense_numbers_and_choices_are_argument_errors(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    code = prep(str(fasta(tmp_path / "in.fasta", 12)), "--out", str(out), flag, value)
    err = capsys.readouterr().err
    assert code == 2 and "usage: protein-performer-prep" in err and flag[2:] in err and not out.exists()


# ---- 5. one-line errors instead of tracebacks ----


def test_write_error_mid_run_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    calls = []

    def full(self, *args):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return append(self, *args)

    append = SplitWriter.append
    monkeypatch.setattr(SplitWriter, "append", full)
    out = tmp_path / "out"
    code = cli(str(FASTA), "--out", str(out), "--no_progress", "--workers", "1")
    err = capsys.readouterr().err
    assert code == 2 and calls
    assert f"{out}: cannot write the prepared data: No space left on device; nothing was written" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_file_size_limit_of_the_operating_system_is_a_one_line_error(tmp_path):
    """A real OSError from write(2) (EFBIG under RLIMIT_FSIZE, as ENOSPC on a full disk), in a subprocess."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # tokens.bin of the sample is 1.4 MB

    proc = subprocess.run(
        [sys.executable, "-m", "protein_performer.prep", str(FASTA), "--out", str(out), "--no_progress"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{out}: cannot write the prepared data: File too large; nothing was written" in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["binary", "binary_after_header", "truncated_gzip"])
def test_bad_pfam_labels_file_names_file_and_line(tmp_path, capsys, kind):
    labels = tmp_path / "labels.tsv"
    rows = "".join(f"A{i}\t1\tPF18369\n" for i in range(5000))
    if kind == "binary":
        labels.write_bytes(bytes(range(256)) * 10)
        where = "line 1: binary data"
    elif kind == "binary_after_header":
        labels.write_bytes(b"accession\tn_domains\tfamilies\n" + bytes(range(256)) * 10)
        where = "line 2: binary data"
    else:
        labels = tmp_path / "labels.tsv.gz"
        data = gzip.compress(("accession\tn_domains\tfamilies\n" + rows).encode())
        labels.write_bytes(data[: len(data) // 2])
        where = "truncated or corrupt gzip stream"
    out = tmp_path / "out"
    code = prep(str(FASTA), "--out", str(out), "--pfam_labels", str(labels))
    err = capsys.readouterr().err
    assert code == 2 and re.search(rf"error: {re.escape(str(labels))}: line \d+: ", err) and where in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_empty_input_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.fasta"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.fasta.gz"
    blank.write_bytes(gzip.compress(b"\n\n"))
    for bad in (empty, blank):
        code = prep(str(FASTA), str(bad), "--out", str(tmp_path / "out"))
        err = capsys.readouterr().err
        assert code == 2 and f"error: {bad}: empty input: no records" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


# ---- 6. nucleotide records and nucleotide files ----

DNA = "ACGTTGCAAGGCTTACGATCGATCGGATCCATGCAAGCTTGACGTACGATNNACGT" * 5  # 280 nt


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_FILE).read_text())


@pytest.mark.parametrize("uniprot", [True, False])
def test_low_complexity_proteins_are_kept(tmp_path, capsys, uniprot):
    # alone, they are a UniProt file of proteins; among proteins, a protein file whatever their titles
    path = tmp_path / "low.fasta"
    if uniprot:
        path.write_text("".join(f">sp|{acc}|{acc}_FISH\n{seq}\n" for acc, seq in LOW_COMPLEXITY_PROTEINS.items()))
    else:
        fasta(path, 100)
        with open(path, "a") as f:
            f.writelines(f">{acc}\n{seq}\n" for acc, seq in LOW_COMPLEXITY_PROTEINS.items())
    out = tmp_path / "out"
    code = prep(str(path), "--out", str(out), "--min_valid", "0", "--min_test", "0")
    err = capsys.readouterr().err
    assert code == 0, err
    m = manifest(out)
    assert m["records"]["flagged"] == {"nucleotide_like": 4} and sum(m["records"]["rejected"].values()) == 0
    assert m["records"]["kept"] == m["records"]["read"] == (4 if uniprot else 104)
    record = 1 if uniprot else 101
    assert f"{path}: record {record} (P02732): nucleotide like: 100% of its 31 letters are A/C/G/T/U/N; kept" in err


@pytest.mark.parametrize("records", [1, 40, 1500])
@pytest.mark.parametrize("gzipped", [False, True])
def test_nucleotide_files_are_refused(tmp_path, capsys, records, gzipped):
    text = f">NC_001416.1 Enterobacteria phage lambda\n{LAMBDA_DNA}\n" if records == 1 else lambda_reads(records)
    dna = tmp_path / ("dna.fasta.gz" if gzipped else "dna.fasta")
    dna.write_bytes(gzip.compress(text.encode()) if gzipped else text.encode())
    code = prep(str(dna), "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    which = "first " if records > 1000 else ""
    n = min(records, 1000)
    assert code == 2 and err.strip().splitlines() == [
        f"protein-performer-prep: error: {dna}: {n:,} of its {which}{n:,} records are nucleotide sequences "
        "(>= 90% A/C/G/T/U/N): a DNA or RNA file, not protein"
    ]
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_nucleotide_records_among_proteins_are_kept_and_counted(tmp_path, capsys):
    mixed = tmp_path / "mixed.fasta"
    fasta(mixed, 100)
    with open(mixed, "a") as f:  # some soft-masked (lowercase)
        f.writelines(f">dna{i}\n{DNA[i:]}{DNA[:i].lower()}\n" for i in range(50))
    out = tmp_path / "out"
    code = prep(str(mixed), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 0, err
    m = manifest(out)
    assert m["records"]["flagged"]["nucleotide_like"] == 50 and m["records"]["kept"] == 150
    assert m["records"]["changed"]["lowercase"] == 49
    assert f"{mixed}: record 101 (dna0): nucleotide like: 100% of its 280 letters are A/C/G/T/U/N; kept" in err
    assert "further 'nucleotide_like' records are only counted" in err
    assert "nucleotide like (kept) 50" in err  # the closing summary


def test_one_nucleotide_record_in_a_protein_file(tmp_path, capsys):
    path = fasta(tmp_path / "in.fasta", 30)
    with open(path, "a") as f:
        f.write(f">NC_001416.1 lambda\n{LAMBDA_DNA}\n")
    out = tmp_path / "out"
    assert prep(str(path), "--out", str(out)) == 0
    assert "record 31 (NC_001416.1): nucleotide like: 100% of its 480 letters" in capsys.readouterr().err
    assert manifest(out)["records"]["flagged"]["nucleotide_like"] == 1 and manifest(out)["records"]["kept"] == 31


@pytest.mark.parametrize(
    ("proteins", "dna", "after", "refused"),
    [
        (10, 11, 0, "11 of its 21 records"),  # mostly nucleotide, decided at the end
        (1000, 1001, 0, "1,001 of its 2,001 records"),  # DNA appended to proteins
        (499, 501, 2000, "501 of its first 1,000 records"),  # decided on the first records, the rest unread
        (500, 501, 2000, None),  # 500 of the first 1,000, 501 of 3,001: a protein file
    ],
)
def test_the_file_rule_on_mixed_files(tmp_path, capsys, proteins, dna, after, refused):
    path = fasta(tmp_path / "mixed.fasta", proteins + after)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: 2 * proteins]) + lambda_reads(dna) + "".join(lines[2 * proteins :]))
    for block_size in ("512", "4194304"):  # the first 1,000 records are counted exactly, across blocks
        out = tmp_path / f"out{block_size}"
        code = prep(str(path), "--out", str(out), "--block_size", block_size)
        err = capsys.readouterr().err
        if refused:
            assert code == 2 and err.strip().splitlines()[-1] == (
                f"protein-performer-prep: error: {path}: {refused} are nucleotide sequences (>= 90% A/C/G/T/U/N): "
                "a DNA or RNA file, not protein"
            )
        else:
            assert code == 0 and manifest(out)["records"]["flagged"]["nucleotide_like"] == dna


def test_screen_counts_the_first_records_exactly():
    for sizes in ([1000], [1, 999, 5], [999, 1], [400, 700], [1200]):
        for votes_at, refused in ((range(501), True), (range(499, 1000), True), (range(500, 1500), False)):
            screen, seen = NucleotideScreen("x.fasta"), 0
            try:
                for n in sizes:
                    screen.add(n, [i - seen for i in votes_at if seen <= i < seen + n])
                    seen += n
                assert not refused, (sizes, votes_at)
            except UserError as e:
                assert refused and "of its first 1,000 records" in str(e)


def test_nucleotide_rule_twins_agree():
    rng = np.random.default_rng(0)
    # boundaries (19/20 letters, exactly 90%), then records the every-4th-letter screen sees at any alignment
    seqs = [
        PROTEIN,
        DNA,
        "ACGT" * 4 + "ACG",
        "ACGT" * 5,
        "A" * 18 + "WW",
        "A" * 27 + "WWW",
        "A" * 26 + "WWWW",
        "N" * 300,
        "U" * 40 + "M" * 4,
        "GATTACA" * 3,
        "WACG" * 10,
        "AAAAAAAAAW" * 5,
        "W" + "ACGT" * 50,
        "WWW" * 9,
    ]
    for _ in range(300):
        n, share = int(rng.integers(1, 120)), rng.random()
        seqs.append(
            "".join(
                rng.choice(list("ACGTUN")) if rng.random() < share else rng.choice(list("DEFHIKLMPQRSVWY"))
                for _ in range(n)
            )
        )
    tokens = [encode(s).tobytes() for s in seqs]
    joined = b"".join(t + bytes([EOS]) for t in tokens)
    lengths = np.array([len(t) for t in tokens])
    starts = np.cumsum(lengths + 1) - lengths - 1
    flags = records.nucleotide_like_records(joined, starts, lengths)
    assert flags.tolist() == [is_nucleotide_like(t) for t in tokens]
    assert flags[1:7].tolist() == [True, False, True, True, True, False] and 10 < flags.sum() < len(seqs) - 10


@pytest.mark.skipif(not PROTEOMES.is_dir(), reason="set PROTEOMES_DIR to a folder of UniProt proteomes (*.fasta.gz)")
def test_no_real_protein_is_nucleotide_like():
    tokens, n = [], 0
    for path in sorted(PROTEOMES.glob("*.fasta.gz")):
        with gzip.open(path, "rt") as f:
            for _, seq in SimpleFastaParser(f):
                tokens.append(encode(seq, "x").tobytes())
                n += 1
    joined = b"".join(t + bytes([EOS]) for t in tokens)
    lengths = np.array([len(t) for t in tokens])
    assert n > 0 and not records.nucleotide_like_records(joined, np.cumsum(lengths + 1) - lengths - 1, lengths).any()


# ---- 7. directories, devices and pipes as inputs ----


def test_directory_and_empty_device_inputs_say_what_they_are(tmp_path, capsys):
    assert prep(str(tmp_path), "--out", str(tmp_path / "out")) == 2
    assert f"error: {tmp_path}: is a directory, not a file (input)" in capsys.readouterr().err
    assert prep("/dev/null", "--out", str(tmp_path / "out")) == 2
    assert "error: /dev/null: empty input: no records" in capsys.readouterr().err
    assert prep(str(tmp_path / "nowhere.fasta"), "--out", str(tmp_path / "out")) == 2
    assert f"error: {tmp_path / 'nowhere.fasta'}: no such file (input)" in capsys.readouterr().err


def test_pipe_inputs_are_read_once(tmp_path):
    """`prep <(cat x.fasta.gz)`: gzip recognised on the pipe, size and SHA-256 those of the bytes read."""
    out_file, out_pipe = tmp_path / "from_file", tmp_path / "from_pipe"
    assert prep(str(FASTA), "--out", str(out_file)) == 0
    command = (f'"{sys.executable}" -m protein_performer.prep <(cat "{FASTA}") --out "{out_pipe}" '
               "--workers 1 --no_progress")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out_pipe / MANIFEST_FILE).read_text())["inputs"][0]
    data = FASTA.read_bytes()
    assert entry["path"].startswith("/dev/fd/") and entry["gzip"] is True and entry["records"] == 3000
    assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    for split in ("train", "valid", "test", "ood"):
        for name in (TOKENS_FILE, OFFSETS_FILE):
            assert (out_pipe / split / name).read_bytes() == (out_file / split / name).read_bytes()


def test_fifo_input_written_slowly(tmp_path):
    """A named pipe fed in small pieces (partial reads, a gzip member split anywhere) gives the file's result."""
    fifo = FifoInput(tmp_path)
    data = FASTA.read_bytes()

    def feed() -> None:
        with open(fifo.path, "wb") as f:
            for i in range(0, len(data), 65_537):
                f.write(data[i : i + 65_537])
                f.flush()

    thread = threading.Thread(target=feed, daemon=True)  # a failing prep must not leave the test waiting
    thread.start()
    out = tmp_path / "out"
    code = prep(str(fifo.path), "--out", str(out))
    thread.join(60)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (
        code == 0
        and manifest["records"]["read"] == 3000
        and manifest["inputs"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    )
