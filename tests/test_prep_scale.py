"""benchmarks/prep_scale.py's pure parts: the synthetic copies and the cost fit."""

import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("prep_scale", REPO / "benchmarks" / "prep_scale.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_copies_rename_accessions_and_mutate_the_rest(scale):
    seq = "M" * 130
    wrapped = ("\n".join(seq[i : i + 60] for i in range(0, 130, 60)) + "\n").encode()
    records = [(b">tr|", f"A{i}".encode(), b"|X_Y desc\n", wrapped, 130) for i in range(200)]
    assert scale.copy_bytes(records, 0, np.random.default_rng(0), 200) == b"".join(
        b">tr|A%d|X_Y desc\n" % i + wrapped for i in range(200)
    )
    text = scale.copy_bytes(records, 3, np.random.default_rng(0), 150).decode()
    entries = text.split(">")[1:]
    assert len(entries) == 150 and all(e.startswith(f"tr|A{i}-c3|X_Y desc\n") for i, e in enumerate(entries))
    seqs = ["".join(e.split("\n")[1:]) for e in entries]
    assert all(len(s) == 130 for s in seqs)  # point mutations keep the length and the line layout
    assert all(len(line) <= 60 for e in entries for line in e.split("\n")[1:])
    unchanged = sum(s == seq for s in seqs) / len(seqs)
    assert 0.15 < unchanged < 0.5  # DUPLICATE = 0.3 exact copies (a mutation to M also leaves one unchanged)


def test_fit_recovers_linear_costs(scale):
    rows = []
    for records, residues in [(1e6, 3e8), (1e6, 6e8), (4e6, 2e9), (16e6, 8e9)]:
        kept = 0.7 * records
        rows.append({
            "stage": "prep", "records": records, "residues": residues, "kept": kept, "kept_residues": 0.7 * residues,
            "cpu_s": 0.5 + 1.5e-6 * records + 8e-9 * residues,
            "peak_anon_MB": (1e8 + 60 * kept) / 2**20,
            "out_bytes": 5000 + 0.7 * residues + 9 * kept,
        })
    rows.append({"stage": "gzip_dc", "records": 1, "residues": 1, "cpu_s": 99})  # other stages are not fitted
    costs = scale.fit_costs(rows)
    assert costs["cpu_seconds_per_record"] == pytest.approx(1.5e-6, rel=1e-3)
    assert costs["cpu_seconds_per_residue"] == pytest.approx(8e-9, rel=1e-3)
    assert costs["peak_bytes_base"] == pytest.approx(1e8, rel=1e-3)
    assert costs["peak_bytes_per_unique_sequence"] == pytest.approx(60, rel=1e-3)
    assert costs["output_bytes_per_residue"] == pytest.approx(1.0)
    assert costs["output_bytes_per_sequence"] == pytest.approx(9.0)
    with pytest.raises(ValueError):
        scale.fit_costs(rows[:2])
