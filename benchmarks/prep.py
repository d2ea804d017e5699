"""Benchmark of protein-performer-prep against `gzip -dc` on a >= 100 M-residue gzipped FASTA.

Builds /tmp/prep_bench.fasta.gz (once) from ../shared/data proteomes: the originals plus copies in
which 70% of sequences carry 1-3 point mutations and 30% are exact duplicates under new
accessions, so de-duplication has work. Prints rates, peak memory and the projected time for full
TrEMBL (87 G residues); appends a row to benchmarks/results/prep.csv.

    python benchmarks/prep.py [--workers N] [--copies 11]

Without --workers the prep runs with its own default (1 on a 2-core machine: parsing in the main
process while a thread decompresses). The load average is recorded with each row: on a shared
machine both timings stretch, and the ratio is only meaningful when they ran under the same load.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from Bio.SeqIO.FastaIO import SimpleFastaParser
from results_io import parse_args

ROOT = Path(__file__).resolve().parents[1]
PROTEOMES = ROOT.parent / "shared" / "data" / "proteomes"
TREMBL_RESIDUES = 87e9


def build_input(path: Path, copies: int) -> int:
    """Write the benchmark FASTA; returns its residue count."""
    records = []
    for f in sorted(PROTEOMES.glob("*.fasta.gz")):
        with gzip.open(f, "rt") as h:
            records += list(SimpleFastaParser(h))
    rng, residues = random.Random(0), 0
    with gzip.open(path, "wt", compresslevel=6) as out:
        for k in range(copies):
            for title, seq in records:
                if k and rng.random() < 0.7:
                    seq = list(seq)
                    for _ in range(rng.randint(1, 3)):
                        seq[rng.randrange(len(seq))] = rng.choice("ACDEFGHIKLMNPQRSTVWY")
                    seq = "".join(seq)
                parts = title.split("|")
                if k:
                    parts[1] += f"-c{k}"
                lines = "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))
                out.write(">" + "|".join(parts) + "\n" + lines + "\n")
                residues += len(seq)
    return residues


def timed(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=None, help="default: the prep's own default")
    p.add_argument("--copies", type=int, default=11, help="11 copies of the four proteomes = 102 M residues")
    p.add_argument("--input", type=Path, default=Path("/tmp/prep_bench.fasta.gz"))
    p.add_argument("--repeats", type=int, default=3, help="best of N for both timings")
    args = parse_args(p)

    if not args.input.exists():
        print(f"building {args.input} ...", file=sys.stderr)
        build_input(args.input, args.copies)
    with gzip.open(args.input, "rb") as f:
        residues = sum(len(line) - 1 for line in f if not line.startswith(b">"))
    out = Path("/tmp/prep_bench_out")
    load_before = os.getloadavg()[0]
    gzip_s, prep_s = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        with open(os.devnull, "wb") as null:
            gzip_s.append(timed(["gzip", "-dc", str(args.input)], stdout=null))
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "protein_performer.prep", str(args.input), "--out", str(out), "--no_progress"]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        prep_s.append(timed(cmd))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest child: prep main or a worker
    g, t = min(gzip_s), min(prep_s)
    row = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers if args.workers is not None else "default",
        "residues": residues,
        "gzip_dc_s": round(g, 3),
        "prep_s": round(t, 3),
        "gzip_dc_Mres_s": round(residues / g / 1e6, 1),
        "prep_Mres_s": round(residues / t / 1e6, 1),
        "ratio": round(g / t, 3),
        "peak_rss_MB": round(peak_mb),
        "trembl_projected_h": round(TREMBL_RESIDUES / (residues / t) / 3600, 2),
        "load_avg_1min": f"{load_before:.2f}-{os.getloadavg()[0]:.2f}",  # before - after
    }
    for k, v in row.items():
        print(f"{k:>20}: {v}")
    print(f"{'target':>20}: prep >= 0.8 x gzip -dc -> {'met' if row['ratio'] >= 0.8 else 'missed'}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "prep.csv"
    rows = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    fields = list(dict.fromkeys([*(rows[0].keys() if rows else []), *row]))  # older rows lack newer columns
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows([*rows, row])
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
