"""The de-duplication hash set across resizes: the same answers as a Python set, and a resize's memory bounded."""

from __future__ import annotations

import tracemalloc

import numpy as np

from protein_performer.prep.dedup import HashSet


def test_resizes_in_chunks_find_the_same_duplicates_as_a_set():
    rng = np.random.default_rng(7)
    chunked, whole, seen = HashSet(capacity=16), HashSet(capacity=16), set()
    chunked.RESIZE_CHUNK = 5  # many chunks per resize, the last one partial
    for i in range(40):  # the table grows from 16 to ~6000 slots: 13 resizes
        if i % 2:
            keys = rng.integers(1, 2**64 - 1, size=100, dtype=np.uint64)  # random 64-bit keys
        else:
            keys = rng.integers(1, 3000, size=150).astype(np.uint64)  # small ones, repeated in and across batches
        keys = np.concatenate([keys, rng.choice(np.array(sorted(seen) or [1], dtype=np.uint64), size=20)])
        expected = []
        for k in keys.tolist():
            expected.append(k not in seen)
            seen.add(k)
        assert np.array_equal(chunked.add(keys), expected)
        assert np.array_equal(whole.add(keys), expected)
    assert len(chunked.table) == len(whole.table) > 16 * 1.5**12
    assert len(chunked) == len(seen)
    assert np.array_equal(np.sort(chunked.table[chunked.table != 0]), np.array(sorted(seen), dtype=np.uint64))


def test_resize_needs_the_new_table_plus_one_chunk():
    rng = np.random.default_rng(0)
    hs = HashSet(capacity=1 << 16)
    hs.RESIZE_CHUNK = 1 << 10
    hs.add(rng.integers(1, 2**64 - 1, size=int(hs.max_load * len(hs.table)), dtype=np.uint64))  # 49,152 keys
    old_keys = np.sort(hs.table[hs.table != 0])
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    try:
        before = tracemalloc.get_traced_memory()[0]
        hs._resize(int(len(hs.table) * hs.growth) + 1)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # The old table was allocated before: the resize adds the new one (786 KB) and _insert's temporaries for at
    # most RESIZE_CHUNK old slots, ~70 bytes per key at 0.75 keys per slot (measured: 73 KB); 128 bytes per chunk
    # slot leaves room for numpy's own bookkeeping. Reinserting all keys at once peaked at ~87 bytes per key held
    # above the old table (4.3 MB here).
    assert peak < hs.table.nbytes + 128 * hs.RESIZE_CHUNK, peak
    assert np.array_equal(np.sort(hs.table[hs.table != 0]), old_keys)
