"""protein-performer-prep end to end on the bundled samples, plus every bad-input case."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from Bio import SeqIO, SwissProt

from protein_performer.fasta import parse_title
from protein_performer.prep import records as R
from protein_performer.prep.__main__ import main
from protein_performer.prep.__main__ import prep as prepare
from protein_performer.prep.dedup import HashSet, accession_keys, seed_key
from protein_performer.prep.records import parse_fasta, parse_fasta_biopython
from protein_performer.prep.splits import read_ood_accessions
from protein_performer.prepared import MANIFEST_FILE, OFFSETS_FILE, SPLITS, TOKENS_FILE
from protein_performer.vocab import EOS, LETTERS, decode

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
FASTA = SAMPLE / "mmseqs2_DB_first3000.fasta.gz"
SWISS = [SAMPLE / "emboss_swiss_seq.dat.gz", SAMPLE / "emboss_swnew_trembl.dat"]



TRICKY_TITLES = [
    b"sp|P2|N d",
    b"tr|Q9|",
    b"sp|",
    b"x y",
    b"",
    b" sp|P3|",
    b"sp|P4 |x",
    b"tr|Q5\t|y",
    b"sp|Q\x85|a",
    b"sp|ABCDEFGHIJKLMNOP|x",
    b"sp|ABCDEFGHIJKLMNOPQ|x",
    b"a>b",
    b"sp|P6",
    b"tr|\xc5\xc4|x",
    b"sp|P7|\r",
    b"sp||x",
    b"SP|P8|x",
    b"tr|Q1|x|y",
    b"sp|P9\xa0|x",
    b"sp|A\x1cB|x",
    b"gi|123|ref|x",
    b"sp|P1\x0b|y",
    b"trx|P1|y",
    b"sp|P0974|BPT1_BOVIN Pancreatic trypsin inhibitor OS=Bos taurus",
]

def text(path: Path) -> str:
    """The text of a plain or gzipped file."""
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()


def cli(*args: str) -> int:
    """Exit status of the command line (errors exit through SystemExit)."""
    try:
        return main(list(args))
    except SystemExit as e:
        return e.code


def prep(tmp: Path, *args: str, name: str = "out") -> tuple[int, Path]:
    out = tmp / name
    return cli(*args, "--out", str(out), "--workers", "1", "--no_progress"), out


def split_sequences(out: Path, split: str) -> list[str]:
    """Sequences of a split read back by cutting tokens.bin at EOS (independent of offsets.npy)."""
    tokens = np.fromfile(out / split / TOKENS_FILE, dtype=np.uint8)
    ends = np.flatnonzero(tokens == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if ends.size else np.zeros(0, np.int64)
    assert np.array_equal(np.load(out / split / OFFSETS_FILE), starts)
    return [decode(tokens[a:b]) for a, b in zip(starts, ends)]


def valid_protein(seq: str) -> bool:
    return bool(seq) and set(seq.upper()) <= set(LETTERS)


@pytest.fixture(scope="module")
def fasta_out(tmp_path_factory) -> Path:
    code, out = prep(tmp_path_factory.mktemp("fasta"), str(FASTA))
    assert code == 0
    return out


def test_fasta_matches_independent_count(fasta_out):
    manifest = json.loads((fasta_out / MANIFEST_FILE).read_text())
    records = [str(r.seq) for r in SeqIO.parse(io.StringIO(text(FASTA)), "fasta")]
    expected = list(dict.fromkeys(s.upper() for s in records if valid_protein(s)))  # first occurrences, in order
    got = {split: split_sequences(fasta_out, split) for split in SPLITS}
    assert sorted(s for seqs in got.values() for s in seqs) == sorted(expected)
    assert manifest["records"]["read"] == len(records)
    assert manifest["records"]["rejected"]["unknown_letter"] == sum(1 for s in records if s and not valid_protein(s))
    assert manifest["records"]["rejected"]["duplicate_sequence"] == sum(1 for s in records if valid_protein(s)) - len(
        expected
    )
    for split, seqs in got.items():
        lengths = np.array([len(s) for s in seqs])
        st = manifest["splits"][split]
        assert (
            st["count"] == len(seqs) and st["residues"] == lengths.sum() and st["tokens"] == lengths.sum() + len(seqs)
        )
        if len(seqs):
            assert (st["min"], st["max"]) == (lengths.min(), lengths.max())
            # Same formulas, different summation order: agree to float rounding.
            assert st["mean"] == pytest.approx(lengths.mean(), rel=1e-12)
            assert st["std"] == pytest.approx(lengths.std(), rel=1e-9)
            assert st["median"] == np.median(lengths)
    # Defaults: 1% test / 0.1% valid of ~3,000 sequences is below the minimum of 100: promoted.
    assert manifest["splits"]["valid"]["count"] == 100 and manifest["splits"]["test"]["count"] == 100
    assert manifest["inputs"][0]["sha256"] == __import__("hashlib").sha256(FASTA.read_bytes()).hexdigest()
    assert manifest["inputs"][0]["size"] == FASTA.stat().st_size


def test_swiss_ood_split(tmp_path):
    entries = [r for p in SWISS for r in SwissProt.parse(io.StringIO(text(p)))]
    fams = {e.accessions[0]: {x[1] for x in e.cross_references if x[0] == "Pfam"} for e in entries}
    held_out = ["PF00001", "PF00022"]  # 7tm_1 and actin: present in seq.dat
    code, out = prep(tmp_path, *map(str, SWISS), "--ood_families", *held_out)
    assert code == 0
    got = {split: split_sequences(out, split) for split in SPLITS}
    ood_seqs = {e.sequence for e in entries if fams[e.accessions[0]] & set(held_out)}
    assert ood_seqs and set(got["ood"]) == ood_seqs
    for split in ("train", "valid", "test"):
        assert not set(got[split]) & ood_seqs
    all_seqs = [s for seqs in got.values() for s in seqs]
    assert len(all_seqs) == len(set(all_seqs)) == len({e.sequence for e in entries})
    assert all(got[s] for s in SPLITS)


def test_ood_from_labels_tsv_both_layouts(tmp_path):
    records = list(SeqIO.parse(io.StringIO(text(FASTA)), "fasta"))[:200]
    fasta = tmp_path / "in.fasta"
    SeqIO.write(records, fasta, "fasta")
    chosen = [r.id.split("|")[1] for r in records[:30:3]]
    labels = tmp_path / "labels.tsv"
    labels.write_text(
        "accession\tn_domains\tfamilies\ttop_family\ttop_family_name\n"
        + "".join(f"{a}\t2\tPF00069,PF18369\tPF00069\tPkinase\n" for a in chosen)
    )
    regions = tmp_path / "Pfam-A.regions.uniprot.tsv.gz"
    with gzip.open(regions, "wt") as f:
        f.write("uniprot_acc\tseq_version\tcrc64\tmd5\tpfamA_acc\tseq_start\tseq_end\n")
        f.writelines(f"{a}\t1\t0\t0\tPF18369\t1\t50\n" for a in chosen)
        f.write("Q00000\t1\t0\t0\tPF00069\t1\t50\n")
    assert read_ood_accessions(regions, {"PF18369"}) == set(chosen)
    outs = []
    for i, tsv in enumerate((labels, regions)):
        code, out = prep(tmp_path, str(fasta), "--pfam_labels", str(tsv), name=f"o{i}")
        assert code == 0
        expected = {str(r.seq) for r in records if r.id.split("|")[1] in chosen}
        assert set(split_sequences(out, "ood")) == expected
        outs.append(out)
    assert (outs[0] / "ood" / TOKENS_FILE).read_bytes() == (outs[1] / "ood" / TOKENS_FILE).read_bytes()


def test_dedup_and_late_ood(tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(
        ">tr|A1|X\nMKVL\n"
        ">tr|A2|X\nmkvl\n"  # duplicate after upper-casing
        ">tr|A3|X\nMKVLW\nAAA\n"
        ">tr|A4|X\nMKVLWAAA\n"  # duplicate across line breaks
        ">tr|A5|X\nMKVLJ\n"  # J: rejected
        ">tr|A6|X\nPPPP\n"
        ">tr|A7|X\nPPPP\n"  # duplicate that carries a held-out family: PPPP moves to OOD
    )
    labels = tmp_path / "labels.tsv"
    labels.write_text("accession\tn_domains\tfamilies\nA7\t1\tPF18369\n")
    code, out = prep(tmp_path, str(fasta), "--pfam_labels", str(labels), "--min_valid", "0", "--min_test", "0")
    assert code == 0
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["records"]["rejected"]["duplicate_sequence"] == 3
    assert m["records"]["rejected"]["unknown_letter"] == 1
    assert m["records"]["changed"]["lowercase"] == 1
    assert m["records"]["moved_to_ood_by_duplicate"] == 1
    got = {s: split_sequences(out, s) for s in SPLITS}
    assert got["ood"] == ["PPPP"]
    assert sorted(got["train"] + got["valid"] + got["test"]) == ["MKVL", "MKVLWAAA"]


def test_hash_set_matches_python_set():
    rng = np.random.default_rng(0)
    hs, seen = HashSet(capacity=8), set()
    for _ in range(30):
        keys = rng.integers(1, 3000, size=500).astype(np.uint64)  # many repeats, structured (small) keys
        expected = []
        for k in keys.tolist():
            expected.append(k not in seen)
            seen.add(k)
        assert np.array_equal(hs.add(keys), expected)
    assert len(hs) == len(seen) and hs.nbytes <= 16 * len(seen) + 8 * 1000


def test_fast_fasta_parser_equals_simple_fasta_parser():
    block = gzip.decompress(FASTA.read_bytes())
    assert list(parse_fasta(block)) == list(parse_fasta_biopython(block))
    odd = b"\n\n>sp|P1|N d\r\nAC D \r\nEF\n>\n>tr|Q2|M\n\nGH\t\nK\n>x y\nM M\n"
    assert list(parse_fasta(odd)) == list(parse_fasta_biopython(odd))
    assert list(parse_fasta(odd.replace(b"\t", b""))) == list(parse_fasta_biopython(odd.replace(b"\t", b"")))


def test_deterministic_across_workers_parsers_and_blocks(tmp_path):
    inputs = [str(FASTA), *map(str, SWISS)]
    runs = [
        {"workers": 1},
        {"workers": 2, "block_size": 65536},
        {"workers": 1, "block_size": 10000, "fasta_parser": "biopython"},
    ]
    outs = []
    for i, extra in enumerate(runs):
        out = tmp_path / f"o{i}"
        prepare(inputs, str(out), seed=7, progress=False, **extra)
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len(files) == 9
    for other in outs[1:]:
        assert sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file()) == files
        for f in files:
            assert (outs[0] / f).read_bytes() == (other / f).read_bytes(), f
    out = tmp_path / "seed8"
    prepare(inputs, str(out), seed=8, progress=False)
    assert (out / "test" / TOKENS_FILE).read_bytes() != (outs[0] / "test" / TOKENS_FILE).read_bytes()


def test_small_input_gets_valid_and_test(tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">tr|P{i}|X\n{'ACDEFGHIKLMNPQRSTVWY'[i % 20] * (i + 1)}\n" for i in range(12)))
    code, out = prep(tmp_path, str(fasta))
    m = json.loads((out / MANIFEST_FILE).read_text())
    # Minimum 100 capped at a quarter of the 12 sequences.
    assert code == 0 and [m["splits"][s]["count"] for s in ("train", "valid", "test")] == [6, 3, 3]


# ---- bad input: message naming the file and record, exit code, nothing corrupted ----


def run_bad(tmp_path, capsys, *args: str) -> tuple[int, str, Path]:
    code, out = prep(tmp_path, *args)
    return code, capsys.readouterr().err, out


def test_truncated_gzip(tmp_path, capsys):
    bad = tmp_path / "cut.fasta.gz"
    bad.write_bytes(FASTA.read_bytes()[:300_000])
    code, err, out = run_bad(tmp_path, capsys, str(bad))
    assert code == 2 and f"{bad}: truncated" in err and "after record" in err and not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_binary_file(tmp_path, capsys):
    bad = tmp_path / "x.bin"
    bad.write_bytes(bytes(range(256)) * 10)
    code, err, out = run_bad(tmp_path, capsys, str(bad))
    assert code == 2 and f"{bad}: binary data" in err and not out.exists()


def test_text_before_first_header(tmp_path, capsys):
    bad = tmp_path / "x.fasta"
    bad.write_text("\nsome comment\n>tr|A1|X\nMKV\n")
    code, err, _ = run_bad(tmp_path, capsys, str(bad))
    assert code == 2 and f"{bad}: line 2: text before the first '>'" in err


def test_non_protein_files(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    code, err, _ = run_bad(tmp_path, capsys, str(text))
    assert code == 2 and "not a FASTA or UniProt flat file" in err
    dna = tmp_path / "dna.fasta"
    dna.write_text("".join(f">s{i}\n{'ACGT' * 100}{i}\n".replace(str(i), "") for i in range(5)))
    code, err, _ = run_bad(tmp_path, capsys, str(dna))
    assert code == 2 and "nucleotide" in err


def test_record_level_problems_are_skipped_and_counted(tmp_path, capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">tr|A1|X\nMKV\n>tr|A2|X\n>tr|A1|Y\nWWW\n>tr|A3|X\nMKVJ\n>tr|A4|X\nPPP\n")
    swiss = tmp_path / "in.dat"
    entry = text(SWISS[0]).split("\n//\n")[0]
    no_seq = entry[: entry.index("\nSQ   ")].replace("P15455", "P99999", 1)
    swiss.write_text(entry + "\n//\n" + no_seq + "\n//\n")
    code, err, out = run_bad(tmp_path, capsys, str(fasta), str(swiss))
    assert code == 0
    m = json.loads((out / MANIFEST_FILE).read_text())["records"]
    assert m["read"] == 7 and m["kept"] == 3
    assert {k: v for k, v in m["rejected"].items() if v} == {
        "empty": 1,
        "duplicate_accession": 1,
        "unknown_letter": 1,
        "no_sequence": 1,
    }
    assert f"{fasta}: record 2 (A2): empty" in err
    assert f"{fasta}: record 3 (A1): duplicate accession" in err
    assert f"{fasta}: record 4 (A3): unknown letter: letter 'J' at position 4" in err
    assert f"{swiss}: record 2 (P99999): no sequence" in err


def test_unknown_error_policy_stops(tmp_path, capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">tr|A1|X\nMKV\n>tr|A3|X\nMKVJ\n")
    for workers in ("1", "2"):  # with 2 the error crosses a process boundary
        code = cli(
            str(fasta), "--out", str(tmp_path / "out"), "--unknown", "error", "--workers", workers, "--no_progress"
        )
        err = capsys.readouterr().err
        assert (
            code == 2 and f"{fasta}: record 2 (A3): letter 'J' at position 4" in err and not (tmp_path / "out").exists()
        )
    code, _, out = run_bad(tmp_path, capsys, str(fasta), "--unknown", "x", "--min_valid", "0", "--min_test", "0")
    assert code == 0 and json.loads((out / MANIFEST_FILE).read_text())["records"]["changed"]["unknown_to_x"] == 1


def test_unterminated_flat_file(tmp_path, capsys):
    bad = tmp_path / "cut.dat"
    bad.write_text(text(SWISS[0])[:20000])
    code, err, _ = run_bad(tmp_path, capsys, str(bad))
    assert code == 2 and f"{bad}: unterminated flat-file record" in err and "after record" in err


def test_existing_output_is_never_corrupted(tmp_path, capsys):
    code, out = prep(tmp_path, str(SWISS[1]))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err, _ = run_bad(tmp_path, capsys, str(SWISS[1]))
    assert code == 2 and "exists; pass --overwrite" in err
    bad = tmp_path / "cut.fasta.gz"
    bad.write_bytes(FASTA.read_bytes()[:100_000])
    code, err, _ = run_bad(tmp_path, capsys, str(bad), "--overwrite")
    assert code == 2 and {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert cli(str(FASTA), "--out", str(out), "--overwrite", "--no_progress", "--workers", "1") == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["records"]["read"] == 3000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_console_entry_point_without_traceback(tmp_path):
    bad = tmp_path / "x.fasta"
    bad.write_text("junk\n>a\nMKV\n")
    proc = subprocess.run(
        [sys.executable, "-m", "protein_performer.prep", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "text before the first '>'" in proc.stderr
    helped = subprocess.run([sys.executable, "-m", "protein_performer.prep", "--help"],
                            capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "--ood_families" in helped.stdout


# ---- the whole-block FASTA path (records.fast_fasta_block) against the record path ----

CONFIG = R.WorkerConfig("reject", seed_key(5), frozenset(), frozenset({"P2", "Q9"}))


def _block_results(block: bytes, monkeypatch):
    """(fast path or None, record path with parse_fasta, record path with SimpleFastaParser) of one block."""
    R.configure(CONFIG)
    fast = R.fast_fasta_block(block, CONFIG)
    with monkeypatch.context() as m:
        m.setattr(R, "fast_fasta_block", lambda block, cfg: None)
        records = R.process_block(("fasta", block))
    return fast, records, R.process_block(("fasta-biopython", block))


def _assert_same(a, b) -> None:
    for name in ("accessions", "rejected", "changed", "nucleotide_like", "tokens", "residues"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("accession_keys", "accepted", "lengths", "digests", "ood"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_block_path_equals_record_path(monkeypatch):
    import random

    clean = gzip.decompress(FASTA.read_bytes())
    fast, records, bio = _block_results(clean, monkeypatch)
    assert fast is not None and fast.n_records == 3000
    _assert_same(fast, records)
    _assert_same(fast, bio)
    odd_titles = TRICKY_TITLES
    rng = random.Random(0)
    n_fast = 0
    for _ in range(400):
        parts = [b"\n" * rng.randint(0, 1)]
        for _ in range(rng.randint(1, 6)):
            seq = "".join(
                rng.choice("ACDEFGHIKLMNPQRSTVWYBOUXZ" + rng.choice(["", "", "a", "J", " \r", "\t"]))
                for _ in range(rng.randint(0, 90))
            )
            lines = [seq[i : i + 30] for i in range(0, len(seq), 30)] or [""]
            eol = rng.choice([b"\n", b"\n", b"\r\n"])
            parts.append(b">" + rng.choice(odd_titles) + eol + eol.join(s.encode() for s in lines) + eol)
        block = b"".join(parts)
        if rng.random() < 0.1:
            block = block.rstrip(b"\n")
        fast, records, bio = _block_results(block, monkeypatch)
        _assert_same(records, bio)
        if fast is not None:
            n_fast += 1
            _assert_same(fast, records)
    assert n_fast >= 50  # the comparison ran on a good share of blocks


def test_block_paths_agree_on_nucleotide_like_records(monkeypatch):
    afgp, read, poly_g = b"AAT" * 10 + b"A", b"ACGTN\nACGTACGTACGTACGTACGT", b"G" * 30
    block = b">sp|P02732|AFG_X\n%b\n>tr|Q1|Y\nMKV\n>read1 x\n%b\n>sp|Q2\n%b\n" % (afgp, read, poly_g)
    fast, records, bio = _block_results(block, monkeypatch)
    assert fast is not None and fast.nucleotide_like == [
        (0, True, "100% of its 31 letters are A/C/G/T/U/N"),
        (2, False, "100% of its 25 letters are A/C/G/T/U/N"),
        (3, False, "100% of its 30 letters are A/C/G/T/U/N"),  # `sp|Q2` names no entry: not a UniProt title
    ]
    assert fast.nucleotide_votes == [2, 3]
    _assert_same(fast, records)
    _assert_same(fast, bio)


def test_duplicate_accession_across_block_paths(tmp_path):
    # The first block takes the whole-block path, the second (lowercase) the record path: same accession keys.
    fasta = tmp_path / "in.fasta"
    fasta.write_text(
        ">tr|A1|X\nMKV\n>sp|LONGACCESSION_ABCDEF|X\nMKW\n>B7 d\nMKY\n"
        + ">tr|A1|Y\nwww\n>sp|LONGACCESSION_ABCDEF|Y\nPPP\n>B7\nQQQ\n"
    )
    out = tmp_path / "out"
    records = prepare([str(fasta)], str(out), block_size=40, progress=False)["records"]
    assert records["read"] == 6 and records["kept"] == 3 and records["rejected"]["duplicate_accession"] == 3




def test_vectorised_accessions_equal_parse_title():
    """The whole-block path's accession extraction is parse_title's accelerated twin."""
    block = b"".join(b">" + t + b"\nMKV\n" for t in TRICKY_TITLES)
    result = R.fast_fasta_block(block, CONFIG)
    expected = [parse_title(t.decode("latin-1"))[0] for t in TRICKY_TITLES]
    assert result is not None and result.accessions.split("\n") == expected
    assert np.array_equal(result.accession_keys, accession_keys(expected))
