"""Dataset views over a tiny prepared directory: windows, EOS placement, crops, pickling, DataLoader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protein_performer.data import ConcatenatedDataset, SingleSequenceDataset
from protein_performer.errors import UserError
from protein_performer.prep.__main__ import main
from protein_performer.prepared import MANIFEST_FILE, OFFSETS_FILE, TOKENS_FILE, PreparedDir
from protein_performer.vocab import BOS, EOS, encode

_RNG = np.random.default_rng(0)
SEQS = ["".join(_RNG.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=11 * k)) for k in range(1, 25)]  # lengths 11 .. 264


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    fasta = tmp / "in.fasta"
    fasta.write_text("".join(f">tr|P{i}|X\n{s}\n" for i, s in enumerate(SEQS)))
    # Everything in train: fractions and minimums 0.
    args = ["--valid_fraction", "0", "--test_fraction", "0", "--min_valid", "0", "--min_test", "0"]
    assert main([str(fasta), "--out", str(tmp / "out"), "--workers", "1", "--no_progress", *args]) == 0
    return tmp / "out"


def train_split(prepared):
    return PreparedDir(prepared).split("train")


def stream(prepared) -> np.ndarray:
    return np.fromfile(prepared / "train" / TOKENS_FILE, dtype=np.uint8)


def test_single_sequence_first_crop(prepared):
    ds = SingleSequenceDataset(train_split(prepared), max_len=64)
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
    ds = SingleSequenceDataset(train_split(prepared), max_len=16, crop="random", seed=3)
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
    ds = ConcatenatedDataset(train_split(prepared), window=100)
    tokens = stream(prepared)
    assert len(ds) == len(tokens) // 100 and len(tokens) % 100  # last partial window dropped
    joined = torch.cat([ds[i] for i in range(len(ds))]).numpy()
    assert np.array_equal(joined, tokens[: len(ds) * 100]) and BOS not in joined
    assert (joined == EOS).sum() == (tokens[: len(ds) * 100] == EOS).sum() > 0
    # EOS sits right after each sequence: the stream is the sequences joined with EOS.
    seqs = np.split(tokens, np.flatnonzero(tokens == EOS) + 1)[:-1]
    assert all(s[-1] == EOS and EOS not in s[:-1] for s in seqs) and len(seqs) == len(SEQS)


def test_pickling_does_not_copy_the_corpus(prepared):
    ds = SingleSequenceDataset(train_split(prepared), max_len=32)
    _ = ds[0], ds.lengths
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # paths and settings only; the memmaps are reopened lazily
    clone = pickle.loads(blob)
    assert all(torch.equal(clone[i], ds[i]) for i in range(len(ds)))
    cat = pickle.loads(pickle.dumps(ConcatenatedDataset(train_split(prepared), window=50)))
    assert torch.equal(cat[3], ConcatenatedDataset(train_split(prepared), window=50)[3])


def test_dataloader_workers(prepared):
    ds = ConcatenatedDataset(train_split(prepared), window=64)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    batches = torch.cat(list(loader))
    assert torch.equal(batches, torch.stack([ds[i] for i in range(len(ds))]))


def copy_prepared(prepared, tmp_path):
    out = tmp_path / "copy"
    for f in prepared.rglob("*"):
        if f.is_file():
            (out / f.relative_to(prepared)).parent.mkdir(parents=True, exist_ok=True)
            (out / f.relative_to(prepared)).write_bytes(f.read_bytes())
    return out


def test_missing_or_incomplete_directory(prepared, tmp_path):
    with pytest.raises(UserError, match="manifest.json"):
        PreparedDir(tmp_path)
    with pytest.raises(UserError, match="no such data directory"):
        PreparedDir(tmp_path / "nowhere")
    assert PreparedDir(prepared).manifest["splits"]["train"]["count"] == len(SEQS)
    with pytest.raises(UserError, match="no split 'nosuch'"):
        PreparedDir(prepared).split("nosuch")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train" / TOKENS_FILE).write_bytes((d / "train" / TOKENS_FILE).read_bytes()[:-10]), "truncated"),
    (lambda d: (d / "train" / OFFSETS_FILE).write_bytes((d / "train" / OFFSETS_FILE).read_bytes()[:-9]), "offsets.npy"),
    (lambda d: (d / "train" / OFFSETS_FILE).write_bytes(b""), "offsets.npy"),
    (lambda d: (d / MANIFEST_FILE).write_text((d / MANIFEST_FILE).read_text()[:-30]), "not valid JSON"),
    (lambda d: (d / MANIFEST_FILE).write_text('{"splits": {"train": {"count": "many"}}, "vocabulary": {}}'),
     "format_version"),
    (lambda d: np.save(d / "train" / OFFSETS_FILE, np.load(d / "train" / OFFSETS_FILE)[::-1].copy()),
     "offsets do not describe"),
])
def test_damaged_directories_are_clear_errors(prepared, tmp_path, damage, message):
    broken = copy_prepared(prepared, tmp_path)
    damage(broken)
    with pytest.raises(UserError, match=message) as e:
        PreparedDir(broken).split("train")
    assert str(broken) in str(e.value)


def test_a_byte_outside_the_vocabulary_is_found(prepared, tmp_path):
    broken = copy_prepared(prepared, tmp_path)
    tokens = bytearray((broken / "train" / TOKENS_FILE).read_bytes())
    tokens[5] = 77
    (broken / "train" / TOKENS_FILE).write_bytes(bytes(tokens))
    with pytest.raises(UserError, match="byte 77 at offset 5 is not a token id"):
        PreparedDir(broken).split("train").token_counts()
