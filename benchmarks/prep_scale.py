"""Scale of protein-performer-prep: time, peak memory and output against records (issue 24, item 3).

Builds gzipped FASTA inputs of 1, 4 and 16 M records by repeating the four reference proteomes of
../shared/data/proteomes under new accessions (`ACC-cK` in copy K): in every copy after the first, 30% of the
sequences are exact duplicates (so de-duplication drops them) and 70% carry 1-3 point mutations (new sequences,
so the de-duplication table grows). Two more 1 M-record inputs come from the short-protein proteomes (E. coli,
S. elongatus) and the long-protein ones (P. falciparum, S. cerevisiae), so that time per record and per residue
can be told apart. Inputs are compressed once with python-isal level 1 (0.64 bytes per residue, the ratio of
UniProt's own gzip -6 files within 2%) and kept in --dir for re-runs.

For each input it times, in separate processes (wall and CPU seconds and peak RSS of each, from /usr/bin/time):
  gzip_dc  `gzip -dc INPUT > /dev/null` (the reference decompressor)
  read     prep's reader alone: python-isal decompression, SHA-256 of the input, cut into blocks
  parse    read + prep's parsing, checks, tokenisation and BLAKE2b keys (records.process_block), no de-dup or output
  prep     the whole `python -m protein_performer.prep INPUT --out DIR --workers 1`
and, on the 4 M input, prep with --workers 2. Rows go to benchmarks/results/prep_scale.csv (machine beside it);
--write_costs fits the per-record costs (least squares) and writes data_prep/prep_costs.json.

    python benchmarks/prep_scale.py --write_costs                # about 20 min on 2 shared EPYC cores, 13 GB in /tmp
    python benchmarks/prep_scale.py --records 1 --no_length_mix   # a quick look

The load average is recorded with every row: on a shared machine wall time stretches, CPU time much less.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from Bio.SeqIO.FastaIO import SimpleFastaParser

ROOT = Path(__file__).resolve().parents[1]
PROTEOMES = ROOT.parent / "shared" / "data" / "proteomes"
COSTS = ROOT / "data_prep" / "prep_costs.json"
SCRIPT = str(Path(__file__).resolve())
SHORT = ("E.coli", "S.elongatus")  # proteome file names containing these: mean length ~300
LONG = ("P.falciparum", "S.cerevisiae")  # mean length ~600
AMINO = [bytes([c]) for c in b"ACDEFGHIKLMNPQRSTVWY"]
WIDTH = 60  # FASTA line width, as UniProt writes it
DUPLICATE = 0.3  # share of exact duplicates in every copy after the first; the rest are mutated


# ---- inputs ----

def load_proteomes(only: tuple[str, ...] = ()) -> list[tuple[bytes, bytes, bytes, bytes, int]]:
    """Records of the proteomes (those whose file name contains one of `only`, or all) as
    (">db|", accession, "|rest of the title\\n", sequence wrapped at 60 columns, length)."""
    records = []
    for f in sorted(PROTEOMES.glob("*.fasta.gz")):
        if only and not any(name in f.name for name in only):
            continue
        with gzip.open(f, "rt") as h:
            for title, seq in SimpleFastaParser(h):
                parts = title.split("|", 2)
                if len(parts) == 3:
                    head, acc, tail = f">{parts[0]}|", parts[1], f"|{parts[2]}\n"
                else:
                    acc, _, rest = title.partition(" ")
                    head, tail = ">", f" {rest}\n"
                wrapped = "\n".join(seq[i : i + WIDTH] for i in range(0, len(seq), WIDTH)) + "\n"
                records.append((head.encode(), acc.encode(), tail.encode(), wrapped.encode(), len(seq)))
    return records


def copy_bytes(records: list, k: int, rng: np.random.Generator, limit: int) -> bytes:
    """Copy k of the records (the first `limit`): copy 0 as they are, later ones under accession ACC-cK with
    DUPLICATE of the sequences unchanged and the rest carrying 1-3 point mutations."""
    records = records[:limit]
    n = len(records)
    if k == 0:
        return b"".join(b"".join((h, a, t, s)) for h, a, t, s, _ in records)
    duplicate = (rng.random(n) < DUPLICATE).tolist()
    n_mut = rng.integers(1, 4, n).tolist()
    where = rng.random((n, 3)).tolist()
    letter = rng.integers(0, len(AMINO), (n, 3)).tolist()
    suffix = b"-c%d" % k
    parts = []
    for i, (head, acc, tail, seq, length) in enumerate(records):
        if not duplicate[i]:
            for j in range(n_mut[i]):
                p = int(where[i][j] * length)
                q = p + p // WIDTH  # position in the wrapped text
                seq = seq[:q] + AMINO[letter[i][j]] + seq[q + 1 :]
        parts += (head, acc, suffix, tail, seq)
    return b"".join(parts)


def build_input(path: Path, n_records: int, only: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Write `n_records` records (copies of the proteomes, see the module doc) to `path`, gzipped (one isal
    level-1 stream); returns its records, residues and gz bytes."""
    from isal import isal_zlib

    records = load_proteomes(only)
    rng = np.random.default_rng(seed)
    copies = math.ceil(n_records / len(records))
    residues = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        z = isal_zlib.compressobj(1, wbits=31)
        for k in range(copies):
            limit = min(len(records), n_records - k * len(records))
            out.write(z.compress(copy_bytes(records, k, rng, limit)))
            residues += sum(r[4] for r in records[:limit])
        out.write(z.flush())
    tmp.rename(path)
    info = {"records": n_records, "residues": residues, "gz_bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(info) + "\n")
    return info


# ---- stages (run in a child process each) ----

def stage(name: str, path: str) -> dict:
    """The read or parse stage on `path`, in this process; returns records and residues."""
    from protein_performer.prep.dedup import seed_key
    from protein_performer.prep.inputs import InputFile
    from protein_performer.prep.parallel import prefetch
    from protein_performer.prep.records import WorkerConfig, configure, process_block
    from protein_performer.prep.splits import PAPER_OOD_FAMILIES

    f = InputFile(path, "fasta")
    records = residues = size = 0
    if name == "read":
        for block in f.blocks():
            size += len(block)
    else:
        configure(WorkerConfig("reject", seed_key(0), frozenset(PAPER_OOD_FAMILIES), frozenset()))
        for block in prefetch(f.blocks()):  # decompression in a thread, as in prep
            r = process_block(("fasta", block))
            records, residues, size = records + r.n_records, residues + r.residues, size + len(block)
    return {"records": records, "residues": residues, "bytes": size}


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/PID/task/*/children)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            try:
                pids += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def _anon_bytes(pids: list[int]) -> int:
    """Anonymous resident memory (RssAnon) of the processes: what a run needs in RAM, unlike the pages of files it
    maps (prep memory-maps tokens.bin to check it), which count in its peak RSS but are page cache."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(cmd: list[str], stdout=None, cwd: Path | None = None) -> dict:
    """Run cmd under /usr/bin/time: wall seconds, CPU seconds (user + system, its waited-for children included),
    peak RSS (the largest of the process and its children; /usr/bin/time rather than os.wait4 here, as Linux keeps
    a child's peak from before exec, which would be this process's) and the peak of the anonymous memory of the
    process tree, sampled every 20 ms."""
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(["/usr/bin/time", "-o", t.name, "-f", "%e %U %S %M", *cmd], stdout=stdout, stderr=err,
                             cwd=cwd)
        anon = 0
        while p.poll() is None:
            anon = max(anon, _anon_bytes(_tree(p.pid)))
            time.sleep(0.02)
        out = p.stdout.read() if p.stdout else b""
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.read().decode()[-2000:]}")
        wall, user, system, peak_kb = t.read().split()[-4:]
    return {
        "wall_s": float(wall),
        "cpu_s": round(float(user) + float(system), 2),
        "user_s": float(user),
        "peak_rss_MB": round(int(peak_kb) / 1024, 1),
        "peak_anon_MB": round(anon / 2**20, 1),
        "load_1min": f"{load:.2f}-{os.getloadavg()[0]:.2f}",
        "stdout": out,
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_input(name: str, path: Path, info: dict, stages: list[str], workers: list[int], out_root: Path) -> list[dict]:
    rows = []
    base = {"input": name, "records": info["records"], "residues": info["residues"], "gz_bytes": info["gz_bytes"]}
    for st in stages:
        if st == "gzip_dc":
            with open(os.devnull, "wb") as null:
                m = measure(["gzip", "-dc", str(path)], stdout=null)
        elif st in ("read", "parse"):
            m = measure([sys.executable, SCRIPT, "--stage", st, str(path)], stdout=subprocess.PIPE)
            got = json.loads(m["stdout"])
            assert st == "read" or got["records"] == info["records"], (got, info)
        else:
            raise ValueError(f"unknown stage {st!r}")
        m.pop("stdout")
        rows.append({**base, "stage": st, **m})
        print(rows[-1], flush=True)
    for w in workers:
        out = out_root / f"{name}_out"
        shutil.rmtree(out, ignore_errors=True)
        # run in out_root: `python -m` puts its working directory first on sys.path, so from the repository root it
        # would run the working tree's package even when PYTHONPATH names another copy
        m = measure([sys.executable, "-m", "protein_performer.prep", str(path), "--out", str(out), "--no_progress",
                     "--workers", str(w)], cwd=out_root)
        m.pop("stdout")
        manifest = json.loads((out / "manifest.json").read_text())
        splits = manifest["splits"]
        kept = sum(s["count"] for s in splits.values())
        kept_residues = sum(s["residues"] for s in splits.values())
        assert manifest["records"]["read"] == info["records"], manifest["records"]
        rows.append({**base, "stage": "prep" if w == 1 else f"prep_workers{w}", **m, "kept": kept,
                     "kept_residues": kept_residues, "out_bytes": dir_bytes(out)})
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    for r in rows:
        r["Mres_per_s"] = round(r["residues"] / r["wall_s"] / 1e6, 1)
        r["Mres_per_cpu_s"] = round(r["residues"] / r["cpu_s"] / 1e6, 1)
        r["records_per_s"] = round(r["records"] / r["wall_s"])
    return rows


# ---- the fit ----

def fit_costs(rows: list[dict]) -> dict:
    """Per-record costs of prep (workers 1) by least squares over the `prep` rows:
    CPU s = c0 + a * records + b * residues; peak anonymous bytes = base + k * unique (kept) sequences;
    output bytes = o0 + p * kept residues + q * kept sequences (the format: 1 byte per residue, EOS + int64
    offset = 9 per sequence). The constants c0, o0 (start-up, manifest) are fitted but not returned."""
    prep = [r for r in rows if r["stage"] == "prep"]
    if len(prep) < 3:
        raise ValueError("the fit needs prep rows of at least 3 inputs")

    def lstsq(columns: list[list[float]], y: list[float]) -> np.ndarray:
        a = np.column_stack([np.ones(len(y)), *map(np.asarray, columns)]).astype(float)
        return np.linalg.lstsq(a, np.asarray(y, dtype=float), rcond=None)[0]

    records = [r["records"] for r in prep]
    residues = [r["residues"] for r in prep]
    _, per_record, per_residue = lstsq([records, residues], [r["cpu_s"] for r in prep])
    base, per_unique = lstsq([[r["kept"] for r in prep]], [r["peak_anon_MB"] * 2**20 for r in prep])
    _, out_res, out_seq = lstsq([[r["kept_residues"] for r in prep], [r["kept"] for r in prep]],
                                [r["out_bytes"] for r in prep])
    return {
        "cpu_seconds_per_record": float(f"{per_record:.4g}"),
        "cpu_seconds_per_residue": float(f"{per_residue:.4g}"),
        "peak_bytes_base": int(round(base)),
        "peak_bytes_per_unique_sequence": round(float(per_unique), 1),
        "output_bytes_per_residue": round(float(out_res), 4),
        "output_bytes_per_sequence": round(float(out_seq), 2),
    }


def uniprot_gz_bytes_per_residue() -> float:
    """Compressed bytes per residue of UniProt's own gzipped FASTA (the proteome files as downloaded)."""
    gz = residues = 0
    for f in sorted(PROTEOMES.glob("*.fasta.gz")):
        gz += f.stat().st_size
        with gzip.open(f, "rb") as h:
            residues += sum(len(line) - 1 for line in h if not line.startswith(b">"))
    return gz / residues


def main() -> None:
    # results_io imports torch (protein_performer.machine): not in the stage children, whose memory is measured
    if sys.argv[1:2] == ["--stage"]:  # a child's stage: before importing results_io
        print(json.dumps(stage(*sys.argv[2:4])))
        return
    from results_io import RESULTS, machine_line, parse_args, write_csv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=float, nargs="+", default=[1, 4, 16], help="input sizes, millions of records")
    p.add_argument("--no_length_mix", action="store_true", help="skip the short- and long-protein 1 M inputs")
    p.add_argument("--workers_check", type=float, default=4, help="size (M records) also run with --workers 2; 0: none")
    p.add_argument("--stages", nargs="*", default=["gzip_dc", "read", "parse"],
                   help="timed besides the whole prep (none: `--stages` alone)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/prep_scale"), help="inputs (kept) and outputs (removed)")
    p.add_argument("--write_costs", action="store_true", help=f"fit and write {COSTS.relative_to(ROOT)}")
    args = parse_args(p)

    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    print(f"{args.dir}: {free / 1e9:.0f} GB free", file=sys.stderr)
    inputs = [(f"mix_{m:g}M", int(m * 1e6), ()) for m in args.records]
    if not args.no_length_mix:
        inputs += [("short_1M", 1_000_000, SHORT), ("long_1M", 1_000_000, LONG)]
    rows = []
    for name, n, only in inputs:
        path = args.dir / f"{name}.fasta.gz"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            info = json.loads(meta.read_text())
        else:
            t = time.perf_counter()
            info = build_input(path, n, only)
            print(f"built {path}: {info} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        workers = [1, 2] if args.workers_check and name == f"mix_{args.workers_check:g}M" else [1]
        stages = args.stages if name.startswith("mix") else []
        rows += run_input(name, path, info, stages, workers, args.dir)
        keys = list(dict.fromkeys(k for r in rows for k in r))  # the prep rows have more columns
        write_csv([{k: r.get(k, "") for k in keys} for r in rows], RESULTS / "prep_scale.csv")  # after every input

    if args.write_costs:
        costs = {
            "machine": machine_line(),
            "command": "python benchmarks/prep_scale.py --write_costs",
            "measured": datetime.date.today().isoformat(),
            **fit_costs(rows),
            "input_gz_bytes_per_residue": round(uniprot_gz_bytes_per_residue(), 4),
        }
        COSTS.parent.mkdir(exist_ok=True)
        COSTS.write_text(json.dumps(costs, indent=1) + "\n")
        print(json.dumps(costs, indent=1))
        print(f"wrote {COSTS}")


if __name__ == "__main__":
    main()
