"""Exact de-duplication in bounded memory: an open-addressing hash set of 64-bit keys.

Keys are 64-bit BLAKE2b digests of the token sequence, so two different sequences are taken for
duplicates only if their digests collide: with n unique sequences the chance that any pair collides
is about n^2 / 2^65, i.e. 1.7e-3 for the 250 M entries of current TrEMBL (one sequence wrongly
dropped, once in about 600 full runs). 128-bit keys would make that negligible but cost 32 bytes
per sequence at the same load; 64 bits keep the table within the 16-byte budget.

The table grows by 1.5x when it is 75% full, so once past its initial size it holds between
0.5 and 0.75 keys per slot: at most 16 bytes per unique key (plus a transient 2.5x during a resize).
Linear probing, vectorised over a batch with numpy: each round resolves every pending key whose
probe hits its own key (duplicate) or an empty slot (new), the rest step to the next slot.
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.uint64(0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class HashSet:
    """Set of uint64 keys; `add(keys)` says which keys are seen for the first time."""

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
        old = self.table[self.table != _EMPTY]
        self.table = np.zeros(capacity, dtype=np.uint64)
        self._insert(old)
