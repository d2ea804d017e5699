"""Keys and exact de-duplication: 64-bit keys of accessions and sequences, held in an open-addressing hash set.

Sequence keys are 64-bit BLAKE2b digests of the token sequence, so two different sequences are taken for
duplicates only if their digests collide: with n unique sequences the chance that any pair collides is about
n^2 / 2^65, i.e. 1.7e-3 for the 250 M entries of current TrEMBL (one sequence wrongly dropped, once in about
600 full runs). 128-bit keys would make that negligible but cost 32 bytes per sequence at the same load; 64 bits
keep the table within the 16-byte budget.

The table grows by 1.5x when it is 75% full, so once past its initial size it holds between 0.5 and 0.75 keys
per slot: 10.7-16 bytes per unique key. A resize holds the old and the new table at once, 26.7 bytes per key
held, plus the temporaries of reinserting at most RESIZE_CHUNK old slots (~50 MB): measured, 32 bytes per key
at 9 M keys (27 at TrEMBL scale). Linear probing, vectorised over a batch with numpy: each round resolves every
pending key whose probe hits its own key (duplicate) or an empty slot (new), the rest step to the next slot.
"""

from __future__ import annotations

import hashlib

import numpy as np

_EMPTY = np.uint64(0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PI = np.uint64(0x243F6A8885A308D3)  # digits of pi: sets the two words of a packed accession apart
ACCESSION_PACKED = 16  # bytes of an accession packed into a key (every UniProt accession fits)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_key(seed: int) -> np.uint64:
    """The salt of the split key: BLAKE2b-64 of the seed as 16 little-endian bytes (seed < 2**128)."""
    return np.frombuffer(hashlib.blake2b(seed.to_bytes(16, "little"), digest_size=8).digest(), dtype="<u8")[0]


def pack_key(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Key of an accession packed (NUL-padded) into two little-endian uint64 words."""
    return mix64(lo ^ mix64(hi ^ _PI))


def accession_keys(accessions: list[str]) -> np.ndarray:
    """64-bit keys of accessions for duplicate detection (0 = no accession), vectorised.

    An accession of at most 16 bytes (every UniProt one) is packed into two uint64 words (NUL-padded: inputs
    never hold NUL) and mixed into one; longer ones use BLAKE2b. Only equality of keys matters: they are never
    written, so the function is free to change, but every block must use the same one.
    """
    n = len(accessions)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    raw = [a.encode("latin-1") for a in accessions]
    packed = b"".join([a[:ACCESSION_PACKED].ljust(ACCESSION_PACKED, b"\0") for a in raw])
    words = np.frombuffer(packed, dtype="<u8").reshape(n, 2)
    keys = pack_key(words[:, 0], words[:, 1])
    for i, a in enumerate(raw):
        if len(a) > ACCESSION_PACKED:
            keys[i] = np.frombuffer(hashlib.blake2b(a, digest_size=8).digest(), dtype="<u8")[0]
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=n)
    return np.where(lengths == 0, np.uint64(0), np.maximum(keys, np.uint64(1)))


def sequence_digests(tokens: bytes, starts: list[int], ends: list[int], seed: np.uint64) -> np.ndarray:
    """(n, 2) uint64: dedup key, split key of each sequence tokens[start:end] (one BLAKE2b-128 each)."""
    view, blake2b = memoryview(tokens), hashlib.blake2b
    digests = b"".join([blake2b(view[a:b], digest_size=16).digest() for a, b in zip(starts, ends)])
    keys = np.frombuffer(digests, dtype="<u8").reshape(-1, 2).copy()
    # Dedup key: first 64 digest bits. Split key: last 64 bits mixed with the seed (vectorised; salting
    # blake2b itself costs 60% more per record).
    keys[:, 1] = mix64(keys[:, 1] ^ seed)
    return keys


class HashSet:
    """Set of uint64 keys; `add(keys)` says which keys are seen for the first time."""

    RESIZE_CHUNK = 1 << 20  # old slots reinserted at a time by a resize: at most 0.75 M keys, ~50 MB of temporaries

    def __init__(self, capacity: int = 1 << 20, max_load: float = 0.75, growth: float = 1.5):
        if capacity >= 1 << 32:
            raise ValueError("capacity must stay below 2**32 slots (the slot index uses 32-bit multiply-shift)")
        self.max_load, self.growth = max_load, growth
        self.table = np.zeros(capacity, dtype=np.uint64)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Insert `keys` (uint64); returns a bool mask, True where the key was not in the set before.

        Of equal keys inside the batch only the first occurrence counts as new.
        """
        keys = np.maximum(np.asarray(keys, dtype=np.uint64), np.uint64(1))  # 0 marks an empty slot
        uniq, first = np.unique(keys, return_index=True)
        while self.size + len(uniq) > self.max_load * len(self.table):
            self._resize(int(len(self.table) * self.growth) + 1)
        new_uniq = self._insert(uniq)
        self.size += int(new_uniq.sum())
        is_new = np.zeros(len(keys), dtype=bool)
        is_new[first[new_uniq]] = True
        return is_new

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        # Fibonacci mixing (so structured keys spread too), then multiply-shift maps the high 32 bits
        # onto [0, capacity) without needing a power-of-two size.
        mixed = (keys * _GOLDEN) >> np.uint64(32)
        return (mixed * np.uint64(len(self.table))) >> np.uint64(32)

    def _insert(self, keys: np.ndarray) -> np.ndarray:
        """Insert distinct keys; True where a key was absent."""
        table, cap = self.table, np.uint64(len(self.table))
        slot = self._slots(keys)
        is_new = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        while pending.size:
            k, s = keys[pending], slot[pending]
            seen = table[s]
            empty = seen == _EMPTY
            # Several pending keys may claim the same empty slot: one write wins, the others move on.
            claim, claim_s = pending[empty], s[empty]
            table[claim_s] = keys[claim]
            won = table[claim_s] == keys[claim]
            is_new[claim[won]] = True
            retry = np.concatenate([pending[~empty & (seen != k)], claim[~won]])
            nxt = slot[retry] + np.uint64(1)
            slot[retry] = np.where(nxt == cap, np.uint64(0), nxt)
            pending = retry
        return is_new

    def _resize(self, capacity: int) -> None:
        if capacity >= 1 << 32:
            raise MemoryError("hash set would exceed 2**32 slots")
        old, self.table = self.table, np.zeros(capacity, dtype=np.uint64)
        # Reinsert in chunks of the old table: _insert's temporaries (slots, indices, masks: about 70 bytes per key)
        # over every key at once made a resize peak at 98 bytes per key held (measured at 9 M keys); chunked, it
        # needs the two tables (26.7 bytes per key at 75% load) plus at most RESIZE_CHUNK slots' temporaries.
        for start in range(0, len(old), self.RESIZE_CHUNK):
            part = old[start : start + self.RESIZE_CHUNK]
            self._insert(part[part != _EMPTY])
