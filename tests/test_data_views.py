"""Dataset views over a tiny prepared directory: windows, EOS placement, crops, pickling, DataLoader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.__main__ import main
from protein_performer.data import ConcatenatedDataset, SingleSequenceDataset, load_manifest
from protein_performer.vocab import BOS, EOS, encode

_RNG = np.random.default_rng(0)
SEQS = ["".join(_RNG.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=11 * k)) for k in range(1, 25)]  # lengths 11 .. 264


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    fasta = tmp / "in.fasta"
    fasta.write_text("".join(f">tr|P{i}|X\n{s}\n" for i, s in enumerate(SEQS)))
    # Everything in train: fractions and minimums 0.
    args = ["--valid-fraction", "0", "--test-fraction", "0", "--min-valid", "0", "--min-test", "0"]
    assert main([str(fasta), "--out", str(tmp / "out"), "--workers", "1", "--no-progress", *args]) == 0
    return tmp / "out"


def stream(prepared) -> np.ndarray:
    return np.fromfile(prepared / "train" / "tokens.bin", dtype=np.uint8)


def test_single_sequence_first_crop(prepared):
    ds = SingleSequenceDataset(prepared / "train", max_len=64)
    assert len(ds) == len(SEQS)
    train = {tuple(encode(s)) for s in SEQS}
    for i in range(len(ds)):
        item = ds[i]
        assert item.dtype == torch.int64 and item[0] == BOS and EOS not in item.tolist()
        full = stream(prepared)[ds.split.bounds(i)[0] :][: ds.lengths[i]]
        assert tuple(full) in train
        assert len(item) == min(ds.lengths[i] + 1, 64) and item[1:].tolist() == full[:63].tolist()
    assert sorted(ds.lengths.tolist()) == sorted(len(s) for s in SEQS)


def test_single_sequence_random_crop(prepared):
    ds = SingleSequenceDataset(prepared / "train", max_len=16, crop="random", seed=3)
    i = int(np.argmax(ds.lengths))
    full = stream(prepared)[ds.split.bounds(i)[0] :][: ds.lengths[i]].tolist()
    crops = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        item = ds[i].tolist()
        assert len(item) == 16 and item[0] == BOS
        start = next(s for s in range(len(full) - 14) if full[s : s + 15] == item[1:])
        crops.add(start)
        assert ds[i].tolist() == item  # same (seed, epoch, index): same window
    assert len(crops) > 10  # 20 uniform draws over 250 start positions: almost all distinct


def test_concatenated_windows(prepared):
    ds = ConcatenatedDataset(prepared / "train", window=100)
    tokens = stream(prepared)
    assert len(ds) == len(tokens) // 100 and len(tokens) % 100  # last partial window dropped
    joined = torch.cat([ds[i] for i in range(len(ds))]).numpy()
    assert np.array_equal(joined, tokens[: len(ds) * 100]) and BOS not in joined
    assert (joined == EOS).sum() == (tokens[: len(ds) * 100] == EOS).sum() > 0
    # EOS sits right after each sequence: the stream is the sequences joined with EOS.
    seqs = np.split(tokens, np.flatnonzero(tokens == EOS) + 1)[:-1]
    assert all(s[-1] == EOS and EOS not in s[:-1] for s in seqs) and len(seqs) == len(SEQS)


def test_pickling_does_not_copy_the_corpus(prepared):
    ds = SingleSequenceDataset(prepared / "train", max_len=32)
    _ = ds[0], ds.lengths
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # paths and settings only; the memmaps are reopened lazily
    clone = pickle.loads(blob)
    assert all(torch.equal(clone[i], ds[i]) for i in range(len(ds)))
    cat = pickle.loads(pickle.dumps(ConcatenatedDataset(prepared / "train", window=50)))
    assert torch.equal(cat[3], ConcatenatedDataset(prepared / "train", window=50)[3])


def test_dataloader_workers(prepared):
    ds = ConcatenatedDataset(prepared / "train", window=64)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    batches = torch.cat(list(loader))
    assert torch.equal(batches, torch.stack([ds[i] for i in range(len(ds))]))


def test_missing_or_incomplete_directory(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        SingleSequenceDataset(tmp_path / "train")
    assert load_manifest(prepared)["splits"]["train"]["count"] == len(SEQS)
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "manifest.json").write_text((prepared / "manifest.json").read_text())
    (broken / "train" / "tokens.bin").write_bytes((prepared / "train" / "tokens.bin").read_bytes()[:-10])
    (broken / "train" / "offsets.npy").write_bytes((prepared / "train" / "offsets.npy").read_bytes())
    with pytest.raises(ValueError, match="truncated"):
        ConcatenatedDataset(broken / "train")
