"""What a prep run will cost in time, peak memory and disk, from per-record costs measured by
benchmarks/prep_scale.py (data_prep/prep_costs.json) and the size of the inputs.

An input is counted over its first SAMPLE_BYTES: a smaller file is counted whole (exact), a larger one's residues are
its compressed size over the measured `input_gz_bytes_per_residue`, and its records those residues over the mean
length of the sample.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from protein_performer.errors import UserError
from protein_performer.fasta import open_binary

COST_KEYS = ("cpu_seconds_per_record", "cpu_seconds_per_residue", "peak_bytes_base", "peak_bytes_per_unique_sequence",
             "output_bytes_per_residue", "output_bytes_per_sequence", "input_gz_bytes_per_residue")
# The share of prep's CPU time that stays in its one main process whatever the workers (de-duplication, writing,
# receiving the workers' blocks, the reader thread's single gzip stream): about 0.2-0.3 h of 0.35 at full TrEMBL
# (docs/data_scale.md), so more workers than 1 gain at most 1 / SERIAL_SHARE.
SERIAL_SHARE = 0.7
SAMPLE_BYTES = 4 << 20  # compressed bytes counted per input (about 20,000 UniProt records): 0.1 s
_HEADER = re.compile(rb"^>[^\n]*", re.M)


@dataclass
class Count:
    """Records and residues of the inputs; `exact` when every input was counted whole."""

    records: float
    residues: float
    exact: bool

    def __add__(self, other: Count) -> Count:
        return Count(self.records + other.records, self.residues + other.residues, self.exact and other.exact)


@dataclass
class Estimate:
    count: Count
    cpu_seconds: float
    seconds: float  # with `workers` parser processes
    peak_bytes: float
    output_bytes: float


def read_costs(path: str | Path) -> dict:
    """The measured costs; a UserError naming the file if it is missing or lacks a key."""
    try:
        costs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the prep costs ({e})") from None
    missing = [key for key in COST_KEYS if not isinstance(costs.get(key), (int, float))]
    if missing:
        raise UserError(f"{path}: no number for {', '.join(missing)}")
    return costs


def count_fasta(path: Path, costs: dict) -> Count:
    """Records and residues of a FASTA file (plain or gzipped): counted if it fits the sample, else estimated."""
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as raw:
        stream, gzipped = open_binary(path, raw)
        data = bytearray()
        while block := stream.read(1 << 20):
            data += block
            if raw.tell() >= SAMPLE_BYTES:
                break
        whole = not stream.read(1)
    headers = _HEADER.findall(data)
    records = len(headers)
    residues = len(data) - sum(map(len, headers)) - data.count(b"\n") - data.count(b"\r")
    if whole:
        return Count(records, residues, True)
    if gzipped:
        total = size / costs["input_gz_bytes_per_residue"]
    else:  # a plain file: the sample's share of it
        total = residues * size / len(data)
    return Count(total * records / max(residues, 1), total, False)


def estimate(count: Count, costs: dict, workers: int) -> Estimate:
    """Time = records x per-record + residues x per-residue CPU seconds, shared by the workers down to the serial
    share; peak memory = base + per unique sequence x records (every record taken as unique: an upper bound);
    output = tokens and offsets."""
    cpu = count.records * costs["cpu_seconds_per_record"] + count.residues * costs["cpu_seconds_per_residue"]
    peak = costs["peak_bytes_base"] + costs["peak_bytes_per_unique_sequence"] * count.records
    output = count.residues * costs["output_bytes_per_residue"] + count.records * costs["output_bytes_per_sequence"]
    return Estimate(count, cpu, cpu * max(SERIAL_SHARE, 1 / workers), peak, output)
