"""The prep run: input blocks -> records.process_block (in workers or here) -> de-duplication, split, write.

Blocks are processed in input order whatever the number of workers, and every decision in the main process
depends only on that order, so the output is byte-identical for any --workers.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from protein_performer.commands import progress_bar
from protein_performer.errors import UserError
from protein_performer.fasta import NucleotideScreen
from protein_performer.prep.dedup import HashSet, seed_key
from protein_performer.prep.inputs import InputFile, TruncatedInput
from protein_performer.prep.manifest import build_manifest
from protein_performer.prep.output import OutputDir
from protein_performer.prep.parallel import ordered_map, prefetch, worker_pool
from protein_performer.prep.records import BlockResult, RecordError, WorkerConfig, process_block
from protein_performer.prep.splits import OOD, assign_split, promotion_targets, read_ood_accessions, split_thresholds
from protein_performer.prepared import (
    SPLITS,
    SplitWriter,
    commit_rewrite,
    finish_split,
    read_split,
    rewrite_split,
    write_manifest,
)
from protein_performer.vocab import EOS

MAX_WARNINGS = 5  # per reason; the rest are only counted
log = logging.getLogger(__name__)


OUTPUT = {"output": True}  # field metadata: the setting decides the output, so the manifest records it


@dataclass
class Settings:
    """One run's settings, resolved by `prep` (protein_performer/prep/__main__.py), whose signature declares their
    types, defaults and meaning: those marked OUTPUT decide what is written and go into the manifest, the others
    only how the run goes."""

    inputs: list[str]
    out: str
    format: str = field(metadata=OUTPUT)
    pfam_labels: str | None = field(metadata=OUTPUT)
    ood_families: list[str] = field(metadata=OUTPUT)
    valid_fraction: float = field(metadata=OUTPUT)
    test_fraction: float = field(metadata=OUTPUT)
    min_valid: int = field(metadata=OUTPUT)
    min_test: int = field(metadata=OUTPUT)
    seed: int = field(metadata=OUTPUT)
    unknown: str = field(metadata=OUTPUT)
    fasta_parser: str
    workers: int
    block_size: int
    overwrite: bool
    progress: bool | None

    def parameters(self, n_ood_accessions: int) -> dict:
        """The settings that decide the output, as the manifest lists them."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("output")}
        return {**values, "ood_families": sorted(self.ood_families), "pfam_labels_ood_accessions": n_ood_accessions}


class _Prep:
    """State of one run: hash sets, split writers, counters."""

    def __init__(self, s: Settings, root: Path):
        self.s, self.root = s, root
        self.writers = {name: SplitWriter(root, name) for name in SPLITS}
        self.sequences, self.accession_keys = HashSet(), HashSet()
        self.ood_keys: set[int] = set()
        self.late_ood: set[int] = set()  # OOD sequences first seen without a held-out family
        self.t_test, self.t_valid = split_thresholds(s.valid_fraction, s.test_fraction)
        self.rejected, self.changed, self.flagged = Counter(), Counter(), Counter()
        self.warned: Counter = Counter()
        self.held: list[str] | None = None  # warnings of a file whose start may still refuse it
        self.records = self.residues_read = self.file_start = 0
        self.last_accession = ""

    def warn(
        self, path: Path, r: BlockResult, base: int, i: int, reason: str, detail: str, outcome: str = "skipped"
    ) -> None:
        """Name the first few skipped (or kept but flagged) records of each reason on stderr."""
        self.warned[reason] += 1
        if self.warned[reason] <= MAX_WARNINGS:
            accession = r.accession(i)
            what = f"record {base + i + 1}" + (f" ({accession})" if accession else "")
            self.say(f"{path}: {what}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}; {outcome}")
            if self.warned[reason] == MAX_WARNINGS:
                self.say(f"further '{reason}' records are only counted")

    def say(self, message: str) -> None:
        """A warning on stderr; held while the file's start may still refuse it, so a refusal is one line."""
        if self.held is None:
            log.warning(message)
        else:
            self.held.append(message)

    def release(self) -> None:
        for message in self.held or ():
            log.warning(message)
        self.held = None

    def read(self, f: InputFile, pool, bar) -> None:
        """Every block of one input through process_block and add_block; checks what only the whole file tells."""
        self.file_start = self.records
        screen, self.held = NucleotideScreen(f.path), []
        try:
            # f.format is read after blocks() yields: "auto" is resolved by then.
            tasks = ((_parser_name(f.format, self.s.fasta_parser), block) for block in prefetch(f.blocks()))
            for result in ordered_map(pool, process_block, tasks, 2 * self.s.workers + 2):
                screen.add(result.n_records, result.nucleotide_votes)
                self.add_block(f.path, result)
                if screen.decided:
                    self.release()
                bar.update(result.residues)
        except TruncatedInput as e:
            self.release()
            done = self.records - self.file_start
            raise UserError(
                f"{e} after record {done}" + (f" ({self.last_accession})" if done and self.last_accession else "")
            ) from None
        except RecordError as e:
            self.release()
            raise UserError(
                f"{f.path}: record {self.records - self.file_start + e.index + 1} ({e.accession}): {e.message}"
            ) from None
        f.records = self.records - self.file_start
        screen.finish()
        self.release()

    def add_block(self, path: Path, r: BlockResult) -> None:
        base = self.records - self.file_start  # records are numbered from 1 in each file
        self.records += r.n_records
        if r.n_records:
            self.last_accession = r.accessions.rsplit("\n", 1)[-1]
        self.residues_read += r.residues
        self.changed.update(r.changed)
        for i, reason, detail in r.rejected:
            self.rejected[reason] += 1
            self.warn(path, r, base, i, reason, detail)
        for i, _, detail in r.nucleotide_like:
            self.flagged["nucleotide_like"] += 1
            self.warn(path, r, base, i, "nucleotide_like", detail, "kept")

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
        dest = np.where(is_ood, OOD, assign_split(r.digests[cand, 1], self.t_test, self.t_valid))
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
        n_valid, n_test = promotion_targets(
            sum(counts.values()), counts["valid"], counts["test"], self.s.min_valid, self.s.min_test
        )
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
            incoming = [
                (*data[src], np.array(sorted(i for i, d in moving[src].items() if d == name), dtype=np.int64))
                for src in SPLITS
            ]
            rewrite_split(dirs[name], keep, [part for part in incoming if part[3].size])
        for name in touched:
            commit_rewrite(dirs[name])
        del data
        return {name: finish_split(d) for name, d in dirs.items()}

    def check_splits(self, stats: dict) -> None:
        """Refuse an output without training data; warn about an empty valid or test split."""
        counts = {name: stats[name]["count"] for name in SPLITS}
        kept = sum(counts.values())
        skipped = ", ".join(f"{reason.replace('_', ' ')} {n:,}" for reason, n in sorted(self.rejected.items()) if n)
        if kept == 0:
            raise UserError(
                f"no sequence was kept from the {self.records:,} records read"
                + (f" (skipped: {skipped})" if skipped else "")
                + "; nothing to write"
            )
        if counts["train"] == 0:
            s = self.s
            what = ", ".join(f"{name} {counts[name]}" for name in ("valid", "test", "ood") if counts[name])
            if counts["ood"] == kept:
                fix = "hold out fewer Pfam families or give more sequences"
            else:
                fix = (
                    f"give more sequences, or lower --min_valid / --min_test (now {s.min_valid} / {s.min_test}; "
                    "0 keeps the fractions alone)"
                )
            raise UserError(
                f"the train split would be empty: {kept:,} sequence{'s' * (kept != 1)} kept after "
                f"de-duplication, all in {what}; {fix}"
            )
        for name, minimum in (("valid", self.s.min_valid), ("test", self.s.min_test)):
            if counts[name] == 0:
                log.warning(
                    f"the {name} split is empty ({kept:,} sequences kept, --{name}_fraction "
                    f"{getattr(self.s, name + '_fraction')}, --min_{name} {minimum})"
                )


def _parser_name(fmt: str, fasta_parser: str) -> str:
    return "fasta-biopython" if fmt == "fasta" and fasta_parser == "biopython" else fmt


def run(s: Settings) -> dict:
    """Prepare `s.out` from `s.inputs`; returns the manifest. Problems with what the user gave are UserErrors."""
    # cheap checks (seed, fractions, inputs, output) before the labels file, which can take minutes to stream
    if not 0 <= s.seed < 2**128:
        raise UserError("--seed must lie in [0, 2**128)")
    split_thresholds(s.valid_fraction, s.test_fraction)
    files = [InputFile(p, s.format, s.block_size) for p in s.inputs]
    start = time.perf_counter()
    with OutputDir(s.out, s.overwrite, tuple(f.path for f in files)) as root:
        ood_families = frozenset(s.ood_families)
        ood_accessions = (
            frozenset(read_ood_accessions(s.pfam_labels, set(ood_families))) if s.pfam_labels else frozenset()
        )
        prep = _Prep(s, root)
        with worker_pool(s.workers, WorkerConfig(s.unknown, seed_key(s.seed), ood_families, ood_accessions)) as pool:
            bar = progress_bar(desc="prep", unit="res", progress=s.progress, unit_scale=True)
            try:
                for f in files:
                    prep.read(f, pool, bar)
            finally:
                bar.close()
        stats = prep.finish()
        prep.check_splits(stats)
        records = {
            "read": prep.records,
            "residues_read": prep.residues_read,
            "moved_to_ood_by_duplicate": len(prep.late_ood),
        }
        manifest = build_manifest(
            s.parameters(len(ood_accessions)), files, stats, records, prep.rejected, prep.changed, prep.flagged
        )
        write_manifest(root, manifest)
    elapsed = time.perf_counter() - start
    print(
        f"prep: {prep.records:,} records, {prep.residues_read / 1e6:.1f} M residues in {elapsed:.1f} s "
        f"({prep.residues_read / elapsed / 1e6:.1f} M residues/s); kept {manifest['records']['kept']:,} "
        f"(train {stats['train']['count']:,}, valid {stats['valid']['count']:,}, test {stats['test']['count']:,}, "
        f"ood {stats['ood']['count']:,}); skipped {sum(prep.rejected.values()):,} "
        f"{dict(sorted((k, v) for k, v in prep.rejected.items() if v))}; "
        + "".join(f"{reason.replace('_', ' ')} (kept) {n:,}; " for reason, n in sorted(prep.flagged.items()))
        + f"wrote {Path(s.out)}",
        file=sys.stderr,
    )
    return manifest


def write_prepared(root: Path, splits: dict[str, Sequence[np.ndarray]]) -> Path:
    """A prepared directory from residue ids per split, written the way a prep run writes it (SplitWriter,
    finish_split, the manifest), for sequences that are already tokens: the tests build their corpora with it."""
    root.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, seqs in splits.items():
        writer = SplitWriter(root, name)
        lengths = np.array([len(seq) for seq in seqs], dtype=np.int64)
        stream = np.concatenate([np.append(seq, EOS) for seq in seqs] or [np.zeros(0)]).astype(np.uint8)
        starts = np.cumsum(lengths + 1) - (lengths + 1)
        writer.append(memoryview(stream), starts, lengths, np.arange(len(seqs)), np.zeros((len(seqs), 2), np.uint64))
        writer.close()
        stats[name] = finish_split(root / name)
    kept = sum(st["count"] for st in stats.values())
    records = {"read": kept, "residues_read": sum(st["residues"] for st in stats.values()),
               "moved_to_ood_by_duplicate": 0}
    write_manifest(root, build_manifest({}, [], stats, records, Counter(), Counter(), Counter()))
    return root
