"""data_prep/download.py and data_prep/prepare_paper.py against a real HTTP server on 127.0.0.1, started here, that
serves small fixture files in the providers' layouts (UniProt's RELEASE.metalink and reldate.txt, Pfam's
md5_checksums and Pfam.version.gz) and answers Range requests; faults (a cut transfer, a server that ignores Range,
500s) are set per path. No network beyond the loopback."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from protein_performer.prep.estimate import SAMPLE_BYTES, SERIAL_SHARE, Count, count_fasta, estimate
from protein_performer.prep.release import parse_md5_checksums, parse_metalink

UNIPROT = "uniprot/current_release/knowledgebase/complete"
PFAM = "Pfam/current_release"
TREMBL, SPROT, REGIONS = "uniprot_trembl.fasta.gz", "uniprot_sprot.fasta.gz", "Pfam-A.regions.uniprot.tsv.gz"
HELD_OUT = ("PF18369", "PF04680")  # two of the paper's 20 families
AMINO = "ACDEFGHIKLMNPQRSTVWY"


class Handler(BaseHTTPRequestHandler):
    """Files under server.root with Range support; server.faults[path] lists what the next GETs of path do:
    500, 'cut' (the headers of the whole answer, then only server.cut_at bytes), or None (serve)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool):
        srv = self.server
        path = srv.root / self.path.lstrip("/")
        faults = srv.faults.get(self.path, [])
        fault = faults.pop(0) if body and faults else None
        entry = {"method": self.command, "path": self.path, "range": self.headers.get("Range"), "sent": 0}
        srv.log.append(entry)
        if fault == 500:
            self.send_error(500)
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and srv.ranges else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            sent = data[start:][: srv.cut_at] if fault == "cut" else data[start:]
            self.wfile.write(sent)
            entry["sent"] = len(sent)
            self.close_connection = fault == "cut"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """The two providers' release directories with small files: TrEMBL (600 records, some in held-out families),
    Swiss-Prot (50), Pfam's regions table."""
    root = tmp_path_factory.mktemp("mirror")
    rng = random.Random(0)

    def fasta(prefix: str, n: int) -> bytes:
        records = []
        for i in range(n):
            seq = "M" + "".join(rng.choice(AMINO) for _ in range(rng.randint(30, 400)))
            lines = "\n".join(seq[j : j + 60] for j in range(0, len(seq), 60))
            records.append(f">{prefix}|{prefix.upper()}{i:05d}|X_HUMAN protein {i} OS=Homo sapiens\n{lines}\n")
        return gzip.compress("".join(records).encode(), mtime=0)

    uni, pfam = root / UNIPROT, root / PFAM
    uni.mkdir(parents=True)
    pfam.mkdir(parents=True)
    (uni / TREMBL).write_bytes(fasta("tr", 600))
    (uni / SPROT).write_bytes(fasta("sp", 50))
    (uni / "reldate.txt").write_text("UniProt Knowledgebase Release 2099_01 consists of:\n"
                                     "UniProtKB/Swiss-Prot Release 2099_01 of 01-Jan-2099\n"
                                     "UniProtKB/TrEMBL Release 2099_01 of 01-Jan-2099\n")
    write_metalink(uni, {name: (uni / name).read_bytes() for name in (TREMBL, SPROT)})
    rows = ["uniprot_acc\tseq_version\tcrc64\tmd5\tpfamA_acc\tseq_start\tseq_end"]
    rows += [f"TR{i:05d}\t1\t0\t0\t{HELD_OUT[i % 2] if i % 20 == 0 else 'PF00001'}\t1\t30" for i in range(600)]
    (pfam / REGIONS).write_bytes(gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0))
    (pfam / "Pfam.version.gz").write_bytes(gzip.compress(b"Pfam release       : 99.0\nPfam-A families    : 1\n",
                                                          mtime=0))
    (pfam / "md5_checksums").write_text(
        "".join(f"{hashlib.md5((pfam / n).read_bytes()).hexdigest()}  {n}\n" for n in (REGIONS, "Pfam.version.gz")))
    return root


def write_metalink(directory: Path, files: dict[str, bytes], sizes: dict[str, int] | None = None,
                   md5s: dict[str, str] | None = None) -> None:
    """RELEASE.metalink (Metalink 4) listing `files` with their size and md5, or the ones given instead."""
    entries = "".join(
        f'  <file name="{name}">\n    <size>{(sizes or {}).get(name, len(data))}</size>\n'
        f'    <hash type="md5">{(md5s or {}).get(name, hashlib.md5(data).hexdigest())}</hash>\n'
        f"    <url>https://example.org/{name}</url>\n  </file>\n"
        for name, data in files.items())
    (directory / "RELEASE.metalink").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<metalink xmlns="urn:ietf:params:xml:ns:metalink">\n{entries}'
        "</metalink>\n")


@pytest.fixture
def server(fixtures, tmp_path):
    """A server over a copy of the fixtures (tests may change theirs)."""
    root = tmp_path / "served"
    shutil.copytree(fixtures, root)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.root, srv.faults, srv.log, srv.ranges, srv.cut_at = root, {}, [], True, 1000
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"data_prep/{script}", *args, "--no_progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def download(srv, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run("download.py", "--out", str(out), "--base_url", srv.url, "--retry_delay", "0", *args)


def gets(srv, name: str) -> list[dict]:
    return [e for e in srv.log if e["method"] == "GET" and e["path"].endswith("/" + name)]


def assert_downloaded(srv, out: Path, names=(TREMBL, SPROT, REGIONS)) -> None:
    for name in names:
        served = next(srv.root.rglob(name)).read_bytes()
        assert (out / name).read_bytes() == served
        assert (out / f"{name}.md5").read_text() == f"{hashlib.md5(served).hexdigest()}  {name}\n"
        assert not (out / f"{name}.part").exists()


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The error line of a failed run: exit 2, `data_prep/download.py: error: ...`."""
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("data_prep/download.py: error: ") and "Traceback" not in r.stderr
    return line


def test_whole_download(server, tmp_path):
    out = tmp_path / "raw"
    r = download(server, out)
    assert r.returncode == 0, r.stderr
    assert_downloaded(server, out)
    assert "UniProt release 2099_01, Pfam 99.0" in r.stdout and "free" in r.stdout
    for name in ("reldate.txt", "RELEASE.metalink", "md5_checksums", "Pfam.version.gz"):
        assert (out / name).is_file()
    assert all(e["range"] is None for e in server.log)


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    out = tmp_path / "raw"
    path = f"/{UNIPROT}/{TREMBL}"
    server.faults[path] = ["cut"]
    r = download(server, out)
    assert r.returncode == 0, r.stderr
    assert_downloaded(server, out)
    first, second = gets(server, TREMBL)
    size = (out / TREMBL).stat().st_size
    assert (first["range"], first["sent"]) == (None, 1000)
    assert (second["range"], second["sent"]) == ("bytes=1000-", size - 1000)
    assert "retry 1 of 5" in r.stderr


def test_rerun_resumes_a_part_left_by_a_killed_run(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    data = (server.root / UNIPROT / SPROT).read_bytes()
    (out / f"{SPROT}.part").write_bytes(data[:777])
    r = download(server, out)
    assert r.returncode == 0, r.stderr
    assert_downloaded(server, out)
    (get,) = gets(server, SPROT)
    assert (get["range"], get["sent"]) == ("bytes=777-", len(data) - 777)
    assert "resumes after 777 B" in r.stdout


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / f"{SPROT}.part").write_bytes(b"stale bytes of another try")
    server.ranges = False
    r = download(server, out)
    assert r.returncode == 0, r.stderr
    assert_downloaded(server, out)
    (get,) = gets(server, SPROT)
    assert get["range"] == "bytes=26-" and get["sent"] == (out / SPROT).stat().st_size
    assert "ignored the range request" in r.stderr


def test_checksum_mismatch_is_not_promoted(server, tmp_path):
    uni = server.root / UNIPROT
    wrong = "0" * 32
    write_metalink(uni, {n: (uni / n).read_bytes() for n in (TREMBL, SPROT)}, md5s={SPROT: wrong})
    out = tmp_path / "raw"
    line = one_error_line(download(server, out))
    actual = hashlib.md5((uni / SPROT).read_bytes()).hexdigest()
    assert f"checksum mismatch: {SPROT}: md5 {actual}, {wrong} expected" in line and "RELEASE.metalink" in line
    assert not (out / SPROT).exists() and not (out / f"{SPROT}.part").exists()


def test_404_fails_at_once_naming_the_url(server, tmp_path):
    (server.root / UNIPROT / SPROT).unlink()
    line = one_error_line(download(server, tmp_path / "raw"))
    assert line.endswith(f"HTTP 404 Not Found: {server.url}/{UNIPROT}/{SPROT}")
    assert len(gets(server, SPROT)) == 1


def test_500_is_retried_then_served(server, tmp_path):
    out = tmp_path / "raw"
    server.faults[f"/{PFAM}/{REGIONS}"] = [500, 500]
    r = download(server, out, "--retries", "2")
    assert r.returncode == 0, r.stderr
    assert_downloaded(server, out)
    assert len(gets(server, REGIONS)) == 3
    assert "HTTP 500 Internal Server Error" in r.stderr and "retry 2 of 2" in r.stderr


def test_500_past_the_retries_is_one_clear_error(server, tmp_path):
    out = tmp_path / "raw"
    server.faults[f"/{UNIPROT}/{TREMBL}"] = [500] * 4
    line = one_error_line(download(server, out, "--retries", "3"))
    assert line.endswith(f"HTTP 500 Internal Server Error: {server.url}/{UNIPROT}/{TREMBL} (gave up after 4 tries)")
    assert len(gets(server, TREMBL)) == 4
    assert_downloaded(server, out, (SPROT, REGIONS))  # verified before TrEMBL (smallest first): kept
    assert not (out / TREMBL).exists()


def test_rerun_skips_verified_files(server, tmp_path):
    out = tmp_path / "raw"
    assert download(server, out).returncode == 0
    server.log.clear()
    r = download(server, out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("verified, skipped") == 3 and "0 downloaded and verified, 3 already there" in r.stdout
    for name in (TREMBL, SPROT, REGIONS):
        assert gets(server, name) == []


def test_a_file_copied_in_by_hand_is_checked_not_fetched(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    shutil.copy(server.root / UNIPROT / TREMBL, out / TREMBL)
    r = download(server, out)
    assert r.returncode == 0, r.stderr
    assert_downloaded(server, out)
    assert gets(server, TREMBL) == []


def test_refuses_a_directory_that_cannot_hold_the_files(server, tmp_path):
    uni = server.root / UNIPROT
    free = shutil.disk_usage(tmp_path).free
    write_metalink(uni, {n: (uni / n).read_bytes() for n in (TREMBL, SPROT)}, sizes={TREMBL: 2 * free})
    out = tmp_path / "raw"
    line = one_error_line(download(server, out))
    assert f"{out}: not enough disk space:" in line and "to fetch" in line
    assert not out.exists()
    assert all(gets(server, name) == [] for name in (TREMBL, SPROT, REGIONS))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_and_keeps_what_is_verified(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / f"{TREMBL}.part").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    line = one_error_line(download(server, out))
    assert f"{out}: disk full after " in line and f"bytes of {TREMBL}; {TREMBL}.part is kept" in line
    assert_downloaded(server, out, (SPROT, REGIONS))
    assert not (out / TREMBL).exists()


def test_named_release_must_be_the_current_one(server, tmp_path):
    assert download(server, tmp_path / "a", "--release", "2099_01").returncode == 0
    line = one_error_line(download(server, tmp_path / "b", "--release", "2098_12"))
    assert "UniProt release 2098_12 is not the current one" in line and "(2099_01)" in line


def test_metalink_3_and_md5_checksums_parse():
    v3 = b"""<?xml version="1.0"?><metalink xmlns="http://www.metalinker.org/" version="3.0"><files>
    <file name="uniprot_sprot.fasta.gz"><size>42</size><verification><hash type="md5">ABCDEF0123456789abcdef0123456789
    </hash><hash type="sha1">x</hash></verification></file></files></metalink>"""
    assert parse_metalink(v3, "u") == {"uniprot_sprot.fasta.gz": (42, "abcdef0123456789abcdef0123456789")}
    sums = parse_md5_checksums(b"0123456789abcdef0123456789abcdef  Pfam-A.hmm.gz\nnot a line\n"
                               b"fedcba9876543210fedcba9876543210 *Pfam.version.gz\n")
    assert sums == {"Pfam-A.hmm.gz": "0123456789abcdef0123456789abcdef",
                    "Pfam.version.gz": "fedcba9876543210fedcba9876543210"}


def test_a_large_input_is_estimated_from_its_compressed_size(tmp_path):
    rng = np.random.default_rng(0)
    letters = np.frombuffer(AMINO.encode(), dtype=np.uint8)
    sequences = letters[rng.integers(0, 20, size=(40_000, 300))]
    text = b"".join(b">tr|Q%05d|X\n" % i + seq.tobytes() + b"\n" for i, seq in enumerate(sequences))
    path = tmp_path / "big.fasta.gz"
    path.write_bytes(gzip.compress(text, compresslevel=1, mtime=0))
    assert path.stat().st_size > SAMPLE_BYTES
    count = count_fasta(path, {"input_gz_bytes_per_residue": 0.5})
    assert not count.exact
    assert count.residues == path.stat().st_size / 0.5
    assert count.records == pytest.approx(count.residues / 300, rel=1e-3)
    small = tmp_path / "small.fasta"
    small.write_bytes(text[: text.index(b">tr|Q00100|")])
    assert count_fasta(small, {}) == Count(100, 30_000, True)


def test_estimate_from_the_costs():
    costs = {"cpu_seconds_per_record": 1e-6, "cpu_seconds_per_residue": 1e-8, "peak_bytes_base": 1e8,
             "peak_bytes_per_unique_sequence": 100, "output_bytes_per_residue": 1.0,
             "output_bytes_per_sequence": 9.0, "input_gz_bytes_per_residue": 0.5}
    e = estimate(Count(250e6, 87e9, False), costs, workers=2)
    assert e.cpu_seconds == pytest.approx(250 + 870)
    assert e.seconds == pytest.approx(1120 * SERIAL_SHARE)  # the main process's share does not spread over workers
    assert estimate(Count(250e6, 87e9, False), costs, workers=32).seconds == pytest.approx(1120 * SERIAL_SHARE)
    assert estimate(Count(250e6, 87e9, False), costs, workers=1).seconds == pytest.approx(1120)
    assert e.peak_bytes == pytest.approx(1e8 + 2.5e10)
    assert e.output_bytes == pytest.approx(87e9 + 9 * 250e6)


def test_download_then_prepare_the_paper_corpus(server, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "trembl"
    assert download(server, raw).returncode == 0
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"cpu_seconds_per_record": 3.6, "cpu_seconds_per_residue": 0.0,
                                 "peak_bytes_base": 1e9, "peak_bytes_per_unique_sequence": 1e6,
                                 "output_bytes_per_residue": 1.0, "output_bytes_per_sequence": 9.0,
                                 "input_gz_bytes_per_residue": 0.6}))
    dry = run("prepare_paper.py", "--downloads", str(raw), "--out", str(out), "--costs", str(costs), "--dry_run",
              "--workers", "1")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    residues = sum(map(len, fasta_sequences(raw / TREMBL)))
    assert f"600 records, {residues:,} residues (counted)" in lines[0]
    assert "needs about 36 min with 1 worker" in lines[1]  # 600 records x 3.6 s
    assert "peak memory about 1.6 GB" in lines[2] and f"disk {(residues + 5400) / 1e3:.1f} kB" in lines[2]
    assert not out.exists()

    r = run("prepare_paper.py", "--downloads", str(raw), "--out", str(out), "--costs", str(costs), "--workers", "1")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["ood"]["count"] == 30  # every 20th TrEMBL record carries a held-out family
    assert sum(s["count"] for s in manifest["splits"].values()) == 600
    table = r.stdout[r.stdout.index("Table 1"):]
    assert "ood" in table and f"{manifest['splits']['train']['count']:,}" in table
    assert f"--config configs/paper/concat-performer.yaml --data.data_dir {out}" in r.stdout


def test_prepare_refuses_a_file_of_another_release(server, tmp_path):
    # an interrupted run into a directory of an earlier release: the metadata beside the files lists other md5s
    raw = tmp_path / "raw"
    assert download(server, raw).returncode == 0
    have = (raw / f"{TREMBL}.md5").read_text().split()[0]
    metalink = raw / "RELEASE.metalink"
    metalink.write_text(metalink.read_text().replace(have, "0" * 32))
    r = run("prepare_paper.py", "--downloads", str(raw), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip() == (f"data_prep/prepare_paper.py: error: {raw / TREMBL}: its md5 ({have}) is not the one "
                                 f"the release metadata in {raw} lists ({'0' * 32}): run python data_prep/download.py "
                                 f"--out {raw} again")


def test_a_path_as_base_url_is_one_line_at_once(tmp_path):
    r = run("download.py", "--out", str(tmp_path / "raw"), "--base_url", str(tmp_path), "--retry_delay", "30")
    assert r.returncode == 2 and "not an HTTP(S) URL" in one_error_line(r)  # no retries: 30 s delays would show


def test_prepare_refuses_unverified_downloads(tmp_path):
    (tmp_path / TREMBL).write_bytes(b"")
    r = run("prepare_paper.py", "--downloads", str(tmp_path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"data_prep/prepare_paper.py: error: {tmp_path / TREMBL}: not downloaded and verified "
                                f"(no {TREMBL}.md5); run python data_prep/download.py --out {tmp_path} first")


def fasta_sequences(path: Path) -> list[str]:
    text = gzip.decompress(path.read_bytes()).decode()
    return ["".join(rec.split("\n")[1:]) for rec in text.split(">")[1:]]
