"""The prep pipeline: blocks of records -> workers (parse, tokenize, hash) -> main (dedup, split, write).

Blocks are processed in input order whatever the number of workers, and every decision in the main
process depends only on that order, so the output is byte-identical for any --workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import platform
import queue
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import protein_performer
from data_prep import PrepError
from data_prep.dedup import HashSet
from data_prep.readers import PARSERS, InputFile, TruncatedInput, fasta_accession
from data_prep.splits import SPLITS, assign_split, promotion_targets, read_ood_accessions, split_thresholds
from data_prep.writer import OutputDir, SplitWriter, commit_rewrite, finish_split, read_split, rewrite_split, write_manifest
from protein_performer.vocab import BOS, BYTE_TO_ID, EOS, LETTERS, MASK, NOT_A_LETTER, PAD, TOKENS, X

FORMAT_VERSION = 1
_UNKNOWN = 255
# The vocabulary's table with lowercase letters sent to 254, so one memchr finds them.
_STRICT_TABLE = bytes(254 if 97 <= b <= 122 and BYTE_TO_ID[b] != NOT_A_LETTER else int(BYTE_TO_ID[b]) for b in range(256))
_NUCLEOTIDE_IDS = [LETTERS.index(c) for c in "ACGTUN"]
MAX_WARNINGS = 5  # per reason; the rest are only counted


@dataclass
class Settings:
    """Everything that decides the output (and so goes into the manifest), plus run-only knobs."""

    inputs: list[str]
    out: str
    format: str = "auto"
    pfam_labels: str | None = None
    ood_families: list[str] = field(default_factory=list)
    valid_fraction: float = 0.001
    test_fraction: float = 0.01
    min_valid: int = 100
    min_test: int = 100
    seed: int = 0
    unknown: str = "reject"
    fasta_parser: str = "fast"  # or "biopython": SimpleFastaParser itself (same output, slower)
    workers: int = 1
    overwrite: bool = False
    block_size: int = 4 << 20
    progress: bool | None = None  # None: only on a terminal


@dataclass
class BlockResult:
    """What a worker returns for one block: every record's accession, the accepted records' tokens."""

    accessions: str  # "\n"-joined, split only to name records in messages
    accession_keys: np.ndarray  # uint64 per record, 0 = no accession
    rejected: list[tuple[int, str, str]]  # (record index, reason, detail)
    changed: Counter
    accepted: np.ndarray  # record indices of accepted records
    tokens: bytes  # accepted sequences, each followed by EOS
    lengths: np.ndarray  # int64, without EOS
    digests: np.ndarray  # (n_accepted, 2) uint64: dedup key, split key
    ood: np.ndarray  # bool, carries a held-out family
    residues: int  # letters read, accepted or not (for the progress rate)

    @property
    def n_records(self) -> int:
        return len(self.accession_keys)

    def accession(self, i: int) -> str:
        return self.accessions.split("\n")[i]


@dataclass
class _WorkerConfig:
    unknown: str
    seed_key: np.uint64
    ood_families: frozenset[str]
    ood_accessions: frozenset[str]


_CONFIG: _WorkerConfig | None = None


def _init_worker(config: _WorkerConfig) -> None:
    global _CONFIG
    _CONFIG = config


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: bool | None):
    """tqdm bar with residues/s; without one (off, or not a terminal) tqdm is not even imported (70 ms)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="res", unit_scale=True, file=sys.stderr, desc="prep")


def _write(message: str) -> None:
    """A line on stderr that does not break a running progress bar."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        tqdm.tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


class RecordError(Exception):
    """A record problem that stops the run (unknown letter with --unknown error)."""

    def __init__(self, index: int, accession: str, message: str):
        super().__init__(index, accession, message)  # args make it picklable back from a worker
        self.index, self.accession, self.message = index, accession, message


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_key(seed: int) -> np.uint64:
    return np.frombuffer(hashlib.blake2b(seed.to_bytes(16, "little"), digest_size=8).digest(), dtype="<u8")[0]


def accession_keys(accessions: list[str]) -> np.ndarray:
    """64-bit keys of accessions for duplicate detection (0 = no accession), vectorised.

    An accession of at most 16 bytes (every UniProt one) is packed into two uint64 words (NUL-padded:
    inputs never hold NUL) and mixed into one; longer ones use BLAKE2b. Only equality of keys matters:
    they are never written, so the function is free to change, but every block must use the same one.
    """
    n = len(accessions)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    raw = [a.encode("latin-1") for a in accessions]
    packed = np.frombuffer(b"".join([a[:16].ljust(16, b"\0") for a in raw]), dtype="<u8").reshape(n, 2)
    keys = _pack_key(packed[:, 0], packed[:, 1])
    for i, a in enumerate(raw):
        if len(a) > 16:
            keys[i] = np.frombuffer(hashlib.blake2b(a, digest_size=8).digest(), dtype="<u8")[0]
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=n)
    return np.where(lengths == 0, np.uint64(0), np.maximum(keys, np.uint64(1)))


def _pack_key(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return _mix64(lo ^ _mix64(hi ^ np.uint64(0x243F6A8885A308D3)))


def _digests(tokens: bytes, starts: list[int], ends: list[int], seed: np.uint64) -> np.ndarray:
    """(n, 2) uint64: dedup key, split key of each sequence tokens[start:end] (one BLAKE2b-128 each)."""
    view, blake2b = memoryview(tokens), hashlib.blake2b
    digests = b"".join([blake2b(view[a:b], digest_size=16).digest() for a, b in zip(starts, ends)])
    keys = np.frombuffer(digests, dtype="<u8").reshape(-1, 2).copy()
    # Dedup key: first 64 digest bits. Split key: last 64 bits mixed with the seed (vectorised; salting
    # blake2b itself costs 60% more per record).
    keys[:, 1] = _mix64(keys[:, 1] ^ seed)
    return keys


# Fast FASTA path: the vocabulary table with NUL (the record separator here; inputs never hold NUL) -> EOS.
_EOS_TABLE = bytes([EOS]) + _STRICT_TABLE[1:]
_GT, _PIPE = 62, 124
_ACC_MAX = 16
# Bytes that end a `sp|ACC|` accession for str.split() (whitespace of latin-1 text) or make it odd.
_ACC_BAD = np.zeros(256, dtype=bool)
_ACC_BAD[[*b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0"]] = True


def _fasta_block_fast(block: bytes, cfg: _WorkerConfig) -> BlockResult | None:
    """Whole-block FASTA processing with a handful of C-level passes; None if the block needs the record path.

    Gives exactly what the record path (parse_fasta = SimpleFastaParser) gives for blocks whose records
    are all non-empty and whose letters are all uppercase vocabulary letters: bodies are cut out at
    once, joined with NUL, newlines (and ' ', '\r') deleted and tokenized by one translate (NUL -> EOS).
    """
    arr = np.frombuffer(block, dtype=np.uint8)
    gt = np.flatnonzero(arr == _GT)  # '>' is rare: header starts plus any inside titles
    if gt.size and gt[0] == 0:
        heads = np.concatenate([gt[:1], gt[1:][arr[gt[1:] - 1] == 10]])
    else:
        heads = gt[arr[gt - 1] == 10] if gt.size else gt
    n = heads.size
    if n == 0:
        return None
    hl = heads.tolist()
    if block.find(b"\n", hl[-1]) < 0:
        return None  # header without a newline at the end of the input: an empty record
    find = block.find
    # Bodies joined by NUL, with a NUL after the last one too (the trailing empty item).
    body = b"\0".join([block[find(b"\n", a) + 1 : b] for a, b in zip(hl, hl[1:] + [len(block)])] + [b""])
    body = body.replace(b"\n", b"")
    if b" " in body or b"\r" in body:
        body = body.replace(b" ", b"").replace(b"\r", b"")
    tokens = body.translate(_EOS_TABLE)
    if not tokens.isascii():  # lowercase, unknown letters, other whitespace: record path
        return None
    ends = np.flatnonzero(np.frombuffer(tokens, dtype=np.uint8) == EOS)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    lengths = ends - starts
    if ends.size != n or not lengths.all():
        return None  # empty records: record path counts them

    # Accessions of `sp|ACC|...` / `tr|ACC|...` titles (ACC of 1-16 bytes, no whitespace), vectorised over
    # the first 20 bytes of each title; any other title goes through fasta_accession.
    idx = np.minimum(heads[:, None] + np.arange(1, 4 + _ACC_MAX + 1), arr.size - 1)
    head = arr[idx]
    is_pipe = head[:, 3:] == _PIPE  # 17 bytes: ACC (at most 16) and its closing '|'
    acc_len = is_pipe.argmax(axis=1)
    acc = head[:, 3 : 3 + _ACC_MAX] * (np.arange(_ACC_MAX) < acc_len[:, None])
    ok = (
        (head[:, 2] == _PIPE)
        & (((head[:, 0] == 115) & (head[:, 1] == 112)) | ((head[:, 0] == 116) & (head[:, 1] == 114)))  # sp, tr
        & (acc_len > 0)
        & ~_ACC_BAD[acc].any(axis=1)  # also catches a '\n' ending the title before the '|'
    )
    acc[~ok] = 0
    acc_len[~ok] = 0
    packed = acc.view("<u8")
    keys = np.maximum(_pack_key(packed[:, 0], packed[:, 1]), np.uint64(1))
    text = np.zeros((n, _ACC_MAX + 1), dtype=np.uint8)
    text[:, :_ACC_MAX] = acc
    text[np.arange(n), acc_len] = 10
    names = text.tobytes().translate(None, b"\0").decode("latin-1").split("\n")[:-1]
    if not ok.all():
        odd = np.flatnonzero(~ok).tolist()
        for i in odd:
            names[i] = fasta_accession(block[hl[i] + 1 : block.find(b"\n", hl[i])].decode("latin-1"))
        keys[odd] = accession_keys([names[i] for i in odd])
    accessions = "\n".join(names)
    if cfg.ood_accessions:
        ood = np.fromiter((a in cfg.ood_accessions for a in names), dtype=bool, count=n)
    else:
        ood = np.zeros(n, dtype=bool)
    return BlockResult(
        accessions=accessions,
        accession_keys=keys,
        rejected=[],
        changed=Counter(),
        accepted=np.arange(n, dtype=np.int64),
        tokens=tokens,
        lengths=lengths,
        digests=_digests(tokens, starts.tolist(), ends.tolist(), cfg.seed_key),
        ood=ood,
        residues=int(lengths.sum()),
    )


def process_block(task: tuple[str, bytes]) -> BlockResult:
    """Parse, check, tokenize and hash one block of records (runs in a worker); task = (parser, block)."""
    cfg, (parser, block) = _CONFIG, task
    if parser == "fasta":
        result = _fasta_block_fast(block, cfg)
        if result is not None:
            return result
    accessions, families_of, rejected, changed = [], [], [], Counter()
    accepted, toks = [], []
    residues = 0
    for i, (acc, families, raw, error) in enumerate(PARSERS[parser](block)):
        accessions.append(acc)
        if error is not None:  # unreadable flat-file entry
            rejected.append((i, "malformed", error))
            continue
        residues += len(raw)
        if not raw:
            rejected.append((i, "empty" if parser.startswith("fasta") else "no_sequence", ""))
            continue
        tok = raw.translate(_STRICT_TABLE)
        lower = False
        if not tok.isascii():  # ids are < 128; lowercase (254) and unknown (255) are not: one fast scan for both
            lower = b"\xfe" in tok
            if lower:
                tok = raw.upper().translate(_STRICT_TABLE)
            if b"\xff" in tok:
                pos = tok.index(b"\xff")
                detail = f"letter {chr(raw[pos])!r} at position {pos + 1} is not in the vocabulary"
                if cfg.unknown == "error":
                    raise RecordError(i, acc, detail)
                if cfg.unknown == "reject":
                    rejected.append((i, "unknown_letter", detail))
                    continue
                tok = tok.replace(b"\xff", bytes([X]))
                changed["unknown_to_x"] += 1
            if lower:
                changed["lowercase"] += 1
        accepted.append(i)
        toks.append(tok)
        families_of.append(acc in cfg.ood_accessions or not cfg.ood_families.isdisjoint(families))
    lengths = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    ends = np.cumsum(lengths + 1) - 1
    tokens = bytes([EOS]).join(toks) + bytes([EOS]) if toks else b""
    return BlockResult(
        accessions="\n".join(accessions),
        accession_keys=accession_keys(accessions),
        rejected=rejected,
        changed=changed,
        accepted=np.array(accepted, dtype=np.int64),
        tokens=tokens,
        lengths=lengths,
        digests=_digests(tokens, (ends - lengths).tolist(), ends.tolist(), cfg.seed_key),
        ood=np.array(families_of, dtype=bool),
        residues=residues,
    )


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator `items` in a thread, `depth` items ahead; its exceptions come out here, in order.

    Used for decompression (isal releases the GIL while inflating), which then overlaps with parsing.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((0, item)):
                    return
            put((1, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((2, e))
        finally:
            if stop.is_set() and hasattr(items, "close"):
                items.close()

    thread = threading.Thread(target=produce, name="prep-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 0:
                yield item
            elif kind == 1:
                break
            else:
                raise item
    finally:
        stop.set()
    thread.join()


def _ordered_map(pool, fn: Callable, items: Iterable, max_pending: int) -> Iterator:
    """fn over items in order, at most max_pending in flight; an error of `items` comes after the results before it."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    error = None
    try:
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
    except PrepError as e:
        error = e
    while pending:
        yield pending.popleft().get()
    if error is not None:
        raise error


class _Prep:
    """State of one run: hash sets, split writers, counters."""

    def __init__(self, s: Settings, root: Path):
        self.s, self.root = s, root
        self.writers = {name: SplitWriter(root, name) for name in SPLITS}
        self.sequences, self.accession_keys = HashSet(), HashSet()
        self.ood_keys: set[int] = set()
        self.late_ood: set[int] = set()  # OOD sequences first seen without a held-out family
        self.t_test, self.t_valid = split_thresholds(s.valid_fraction, s.test_fraction)
        self.rejected, self.changed = Counter(), Counter()
        self.warned: Counter = Counter()
        self.records = self.residues_read = self.file_start = 0
        self.last_accession = ""

    def warn(self, path: Path, r: BlockResult, base: int, i: int, reason: str, detail: str) -> None:
        """Name the first few skipped records of each reason on stderr."""
        self.warned[reason] += 1
        if self.warned[reason] <= MAX_WARNINGS:
            accession = r.accession(i)
            what = f"record {base + i + 1}" + (f" ({accession})" if accession else "")
            _write(f"warning: {path}: {what}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}; skipped")
            if self.warned[reason] == MAX_WARNINGS:
                _write(f"warning: further '{reason}' records are only counted")

    def add_block(self, path: Path, r: BlockResult, first_block: bool) -> None:
        base = self.records - self.file_start  # records are numbered from 1 in each file
        self.records += r.n_records
        if r.n_records:
            self.last_accession = r.accessions.rsplit("\n", 1)[-1]
        self.residues_read += r.residues
        self.changed.update(r.changed)
        for i, reason, detail in r.rejected:
            self.rejected[reason] += 1
            self.warn(path, r, base, i, reason, detail)
        if first_block and r.lengths.sum() >= 1000:
            counts = np.bincount(np.frombuffer(r.tokens, np.uint8), minlength=len(TOKENS))
            if counts[_NUCLEOTIDE_IDS].sum() >= 0.9 * r.lengths.sum():
                raise PrepError(f"{path}: looks like nucleotide sequences (>= 90% A/C/G/T/U/N), not protein")

        # Accessions: every record registers its accession; a repeat is skipped even if the first was rejected.
        acc = r.accession_keys
        has_acc = acc != 0
        fresh = np.ones(len(acc), dtype=bool)
        fresh[has_acc] = self.accession_keys.add(acc[has_acc])
        keep = fresh[r.accepted]
        for j in np.flatnonzero(~keep).tolist():
            i = int(r.accepted[j])
            self.rejected["duplicate_accession"] += 1
            self.warn(path, r, base, i, "duplicate_accession", "accession seen before")

        cand = np.flatnonzero(keep)
        keys = r.digests[cand, 0]
        new = self.sequences.add(keys)
        self.rejected["duplicate_sequence"] += int((~new).sum())
        for k in keys[~new & r.ood[cand]].tolist():
            if k not in self.ood_keys:  # kept earlier in train/valid/test: moved to OOD at the end
                self.late_ood.add(k)
                self.ood_keys.add(k)
        cand, keys = cand[new], keys[new]
        is_ood = r.ood[cand]
        self.ood_keys.update(keys[is_ood].tolist())
        dest = np.where(is_ood, 3, assign_split(r.digests[cand, 1], self.t_test, self.t_valid))
        starts = np.cumsum(r.lengths + 1) - (r.lengths + 1)
        view = memoryview(r.tokens)
        for code, name in enumerate(SPLITS):
            self.writers[name].append(view, starts, r.lengths, cand[dest == code], r.digests)

    def finish(self) -> dict:
        """Move late-OOD sequences to OOD, promote for the minimum counts, then statistics per split."""
        for w in self.writers.values():
            w.close()
        dirs = {name: self.root / name for name in SPLITS}
        data = {name: read_split(d) for name, d in dirs.items()}
        moving: dict[str, dict[int, str]] = {name: {} for name in SPLITS}  # split -> {index: new split}
        if self.late_ood:
            late = np.array(sorted(self.late_ood), dtype=np.uint64)
            for name in ("train", "valid", "test"):
                for i in np.flatnonzero(np.isin(np.maximum(data[name][2][:, 0], 1), late)).tolist():
                    moving[name][i] = "ood"
        counts = {name: len(data[name][1]) - len(moving[name]) for name in ("train", "valid", "test")}
        n_valid, n_test = promotion_targets(sum(counts.values()), counts["valid"], counts["test"], self.s.min_valid, self.s.min_test)
        if (n_valid, n_test) != (counts["valid"], counts["test"]):
            # Rank the non-OOD sequences by split key: test takes the first n_test, valid the next n_valid.
            # Only train's k smallest keys can reach the top k, so train is not sorted whole.
            k, cands = n_valid + n_test, []
            for name in ("train", "valid", "test"):
                alive = np.setdiff1d(np.arange(len(data[name][1])), list(moving[name]))
                keys = data[name][2][alive, 1]
                if name == "train" and len(alive) > k:
                    part = np.argpartition(keys, k)[:k]
                    alive, keys = alive[part], keys[part]
                cands += [(key, name, i) for key, i in zip(keys.tolist(), alive.tolist())]
            for rank, (_, name, i) in enumerate(sorted(cands)):
                dst = "test" if rank < n_test else "valid" if rank < k else "train"
                if dst != name:
                    moving[name][i] = dst
        touched = {name for name in SPLITS if moving[name]} | {dst for m in moving.values() for dst in m.values()}
        for name in sorted(touched):
            keep = np.setdiff1d(np.arange(len(data[name][1])), list(moving[name]))
            incoming = [(*data[src], np.array(sorted(i for i, d in moving[src].items() if d == name), dtype=np.int64)) for src in SPLITS]
            rewrite_split(dirs[name], keep, [part for part in incoming if part[3].size])
        for name in touched:
            commit_rewrite(dirs[name])
        del data
        return {name: finish_split(d) for name, d in dirs.items()}


def _parser_name(fmt: str, fasta_parser: str) -> str:
    return "fasta-biopython" if fmt == "fasta" and fasta_parser == "biopython" else fmt


def run(s: Settings) -> dict:
    """Prepare `s.out` from `s.inputs`; returns the manifest."""
    # cheap checks (seed, inputs, output) before the labels file, which can take minutes to stream
    if s.seed < 0 or s.seed >= 2**128:
        raise PrepError("--seed must lie in [0, 2**128)")
    files = [InputFile(p, s.format, s.block_size) for p in s.inputs]
    out_dir = OutputDir(s.out, s.overwrite)
    ood_families = frozenset(s.ood_families)
    ood_accessions = frozenset(read_ood_accessions(s.pfam_labels, set(ood_families))) if s.pfam_labels else frozenset()
    config = _WorkerConfig(s.unknown, seed_key(s.seed), ood_families, ood_accessions)
    start = time.perf_counter()
    with out_dir as root:
        prep = _Prep(s, root)
        pool = mp.get_context().Pool(s.workers, _init_worker, (config,)) if s.workers > 1 else None
        if pool is None:
            _init_worker(config)
        bar = _progress_bar(s.progress)
        try:
            for f in files:
                records_before = prep.file_start = prep.records
                try:
                    # f.format is read after blocks() yields: "auto" is resolved by then.
                    tasks = ((_parser_name(f.format, s.fasta_parser), block) for block in _prefetch(f.blocks()))
                    for n, result in enumerate(_ordered_map(pool, process_block, tasks, 2 * s.workers + 2)):
                        prep.add_block(f.path, result, n == 0)
                        bar.update(result.residues)
                except TruncatedInput as e:
                    done = prep.records - records_before
                    raise PrepError(f"{e} after record {done}" + (f" ({prep.last_accession})" if done and prep.last_accession else "")) from None
                except RecordError as e:
                    raise PrepError(f"{f.path}: record {prep.records - records_before + e.index + 1} ({e.accession}): {e.message}") from None
                f.records = prep.records - records_before
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        stats = prep.finish()
        kept = sum(st["count"] for st in stats.values())
        if kept == 0:
            raise PrepError("no sequence was kept from the inputs; nothing to write")
        manifest = _manifest(s, files, prep, stats, len(ood_accessions))
        write_manifest(root, manifest)
    elapsed = time.perf_counter() - start
    print(
        f"prep: {prep.records:,} records, {prep.residues_read / 1e6:.1f} M residues in {elapsed:.1f} s "
        f"({prep.residues_read / elapsed / 1e6:.1f} M residues/s); kept {kept:,} "
        f"(train {stats['train']['count']:,}, valid {stats['valid']['count']:,}, test {stats['test']['count']:,}, "
        f"ood {stats['ood']['count']:,}); skipped {sum(prep.rejected.values()):,} "
        f"{dict(sorted((k, v) for k, v in prep.rejected.items() if v))}; wrote {Path(s.out)}",
        file=sys.stderr,
    )
    return manifest


REJECT_REASONS = ("empty", "no_sequence", "malformed", "unknown_letter", "duplicate_accession", "duplicate_sequence")
CHANGE_REASONS = ("lowercase", "unknown_to_x")


def _versions() -> dict:
    import Bio
    import isal

    return {
        "protein_performer": protein_performer.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "biopython": Bio.__version__,
        "isal": isal.__version__,
    }


def _manifest(s: Settings, files: list[InputFile], prep: _Prep, stats: dict, n_ood_accessions: int) -> dict:
    """Everything a later step needs to trust and describe the output; deterministic (no timestamps, no --workers)."""
    kept = sum(st["count"] for st in stats.values())
    return {
        "format_version": FORMAT_VERSION,
        "layout": {
            "tokens": "<split>/tokens.bin: uint8 token ids, every sequence followed by EOS",
            "offsets": "<split>/offsets.npy: int64 start of each sequence in tokens.bin",
        },
        "vocabulary": {"tokens": list(TOKENS), "bos": BOS, "eos": EOS, "pad": PAD, "mask": MASK},
        "splits": stats,
        "records": {
            "read": prep.records,
            "residues_read": prep.residues_read,
            "kept": kept,
            "rejected": {reason: prep.rejected.get(reason, 0) for reason in REJECT_REASONS},
            "changed": {reason: prep.changed.get(reason, 0) for reason in CHANGE_REASONS},
            "moved_to_ood_by_duplicate": len(prep.late_ood),
        },
        "inputs": [
            {"path": str(f.path), "format": f.format, "gzip": f.gzipped, "size": f.size, "sha256": f.sha256, "records": f.records}
            for f in files
        ],
        "parameters": {
            "format": s.format,
            "pfam_labels": s.pfam_labels,
            "pfam_labels_ood_accessions": n_ood_accessions,
            "ood_families": sorted(s.ood_families),
            "valid_fraction": s.valid_fraction,
            "test_fraction": s.test_fraction,
            "min_valid": s.min_valid,
            "min_test": s.min_test,
            "seed": s.seed,
            "unknown": s.unknown,
            "hash": "d = blake2b(token ids, digest_size=16); de-duplication key = d[:8] (little-endian uint64); "
            "split key = splitmix64(d[8:] xor blake2b(seed as 16 bytes little-endian, digest_size=8)); "
            "test if key < test_fraction * 2**64, valid if below (test_fraction + valid_fraction) * 2**64",
        },
        "versions": _versions(),
    }
