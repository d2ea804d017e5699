"""Blocks of records -> token ids, in one place: FASTA and UniProt flat-file parsing, tokenisation, the
record-level checks (empty, unknown letter), the nucleotide-like records and the keys of every record.

A block (whole records, from inputs.InputFile) is processed by `process_block`, in the main process or in a
worker (parallel.py). Clean FASTA blocks take a whole-block path of a few C-level passes (`fast_fasta_block`);
any other block goes record by record through the fast FASTA parser (SimpleFastaParser's rules on whole
blocks), SimpleFastaParser itself, or Biopython's SwissProt reader. Tests assert both paths give the same result.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from protein_performer.fasta import (
    NUCLEOTIDE_IDS,
    NUCLEOTIDE_MIN_LENGTH,
    NUCLEOTIDE_PERCENT,
    is_nucleotide_like,
    nucleotide_detail,
    parse_title,
)
from protein_performer.prep.dedup import ACCESSION_PACKED, accession_keys, pack_key, sequence_digests
from protein_performer.vocab import BYTE_TO_ID, EOS, NOT_A_LETTER, X

# Biopython is imported where it is used: importing Bio.SwissProt / Bio.SeqIO costs 0.2 s of start-up, and the
# whole-block FASTA path never needs it.

# ---- tokenisation ----

# The vocabulary's table with lowercase letters sent to a byte no token id takes, so one scan finds them.
_LOWER_MARK = NOT_A_LETTER - 1
_STRICT_TABLE = bytes(
    _LOWER_MARK if bytes([b]).islower() and BYTE_TO_ID[b] != NOT_A_LETTER else int(BYTE_TO_ID[b]) for b in range(256)
)
_LOWER_BYTE, _UNKNOWN_BYTE, _EOS_BYTE = bytes([_LOWER_MARK]), bytes([NOT_A_LETTER]), bytes([EOS])
# Whole-block path: NUL (its record separator; inputs never hold NUL) -> EOS.
_EOS_TABLE = _EOS_BYTE + _STRICT_TABLE[1:]

# ---- nucleotide-like records (the rule and the file-level screen: protein_performer.fasta) ----

_NUCLEOTIDE_TABLE = bytes(int(b in NUCLEOTIDE_IDS) for b in range(256))  # token id -> 1 if nucleotide letter
_SCREEN_STRIDE = 4  # nucleotide_like_records looks at every 4th letter first
_SCREEN_PAD = _EOS_BYTE * _SCREEN_STRIDE


def nucleotide_like_records(tokens: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """is_nucleotide_like of every record tokens[start : start + length] at once (bool), for the whole-block path.

    Counting every letter added about 15% to the whole-block path; this exact screen on every 4th letter costs a
    third of that. A nucleotide-like record has at most a tenth of its letters outside A/C/G/T/U/N, so at most that
    many among its sampled letters: only records within that bound (21 of the 37,086 records of the prep benchmark's
    input) are checked letter by letter.
    """
    k = _SCREEN_STRIDE
    sample = (np.frombuffer(tokens, dtype=np.uint8)[::k].tobytes() + _SCREEN_PAD).translate(_NUCLEOTIDE_TABLE)
    first = (starts + k - 1) // k  # index of each record's first sampled letter
    sampled = (starts + lengths + k - 1) // k - first
    # Each sum runs up to the next record's first sampled letter: this record's, plus its EOS (which counts 0).
    nucleotide = np.add.reduceat(np.frombuffer(sample, dtype=np.uint8), first, dtype=np.uint32)
    bound = (100 - NUCLEOTIDE_PERCENT) * lengths
    maybe = np.flatnonzero((lengths >= NUCLEOTIDE_MIN_LENGTH) & (100 * (sampled - nucleotide) <= bound))
    flags = np.zeros(starts.size, dtype=bool)
    for i in maybe.tolist():
        flags[i] = is_nucleotide_like(tokens[starts[i] : starts[i] + lengths[i]])
    return flags


# ---- parsers: a parsed record is (accession or "", whether it is a UniProt entry, Pfam families from the entry,
# sequence bytes, error or None); UniProt entries: flat-file entries, FASTA titles `sp|ACC|NAME` / `tr|ACC|NAME` ----

Parsed = tuple[str, bool, tuple[str, ...], bytes, str | None]


def _fasta_record(title: str, sequence: bytes) -> Parsed:
    accession, entry = parse_title(title)
    return accession, bool(entry), (), sequence, None


# Whitespace that str.rstrip() removes at line ends besides ' ' and '\r' (see parse_fasta).
_RARE_SPACE = tuple(bytes([c]) for c in range(256) if chr(c).isspace() and c not in b" \r\n")


def parse_fasta_biopython(block: bytes) -> Iterator[Parsed]:
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    for title, seq in SimpleFastaParser(io.StringIO(block.decode("latin-1"))):
        yield _fasta_record(title, seq.encode("latin-1"))


def parse_fasta(block: bytes) -> Iterator[Parsed]:
    """Records of a FASTA block, exactly as Bio.SeqIO.FastaIO.SimpleFastaParser reads them, 4x faster.

    SimpleFastaParser loops over lines in Python (about 0.7 us a line). It strips trailing whitespace of every
    line, joins, and removes ' ' and '\r'. When the only whitespace is ' ', '\r' and '\n' that equals removing
    those three characters from the record's body, which bytes.replace does in C. Blocks holding any other
    whitespace character go to SimpleFastaParser itself.
    """
    if any(c in block for c in _RARE_SPACE):  # one memchr each: 10x faster than a regex class
        yield from parse_fasta_biopython(block)
        return
    start = 0 if block.startswith(b">") else block.find(b"\n>") + 1
    if start == 0 and not block.startswith(b">"):
        return  # only blank lines (text before the first '>' was refused by InputFile)
    for rec in block[start + 1 :].split(b"\n>"):
        title, _, body = rec.partition(b"\n")
        sequence = body.replace(b"\n", b"").replace(b" ", b"").replace(b"\r", b"")
        yield _fasta_record(title.decode("latin-1"), sequence)


_AC_LINE = re.compile(r"^AC   (\S+?);", re.MULTILINE)


def _swiss_record(rec) -> Parsed:
    families = tuple(x[1] for x in rec.cross_references if x[0] == "Pfam")
    return rec.accessions[0] if rec.accessions else "", True, families, rec.sequence.encode("latin-1"), None


def parse_swiss(block: bytes) -> Iterator[Parsed]:
    """Records of a block of flat-file entries (Bio.SwissProt); an entry it cannot read comes with its error.

    The whole block goes through one SwissProt.parse call (20% faster than entry by entry); only a block with a
    malformed entry is re-read entry by entry to find and skip that entry.
    """
    from Bio import SwissProt

    text = block.decode("latin-1")
    try:
        records = [_swiss_record(r) for r in SwissProt.parse(io.StringIO(text))]
    except (ValueError, SwissProt.SwissProtParserError):
        records = None
    if records is not None:
        yield from records
        return
    for entry in re.split(r"(?<=\n)//[ \t\r]*\n", text):
        if not entry.strip():
            continue
        try:
            yield _swiss_record(SwissProt.read(io.StringIO(entry + "//\n")))
        except (ValueError, SwissProt.SwissProtParserError) as e:
            m = _AC_LINE.search(entry)
            yield (m.group(1) if m else ""), True, (), b"", str(e).splitlines()[0]


PARSERS = {"fasta": parse_fasta, "fasta-biopython": parse_fasta_biopython, "swiss": parse_swiss}


# ---- blocks ----


@dataclass
class BlockResult:
    """What a worker returns for one block: every record's accession, the accepted records' tokens."""

    accessions: str  # "\n"-joined, split only to name records in messages
    accession_keys: np.ndarray  # uint64 per record, 0 = no accession
    rejected: list[tuple[int, str, str]]  # (record index, reason, detail)
    changed: Counter
    nucleotide_like: list[tuple[int, bool, str]]  # accepted ones: (record index, of a UniProt entry, detail)
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

    @property
    def nucleotide_votes(self) -> list[int]:
        """The nucleotide-like records that count towards refusing the file (fasta.NucleotideScreen)."""
        return [i for i, uniprot, _ in self.nucleotide_like if not uniprot]


@dataclass
class WorkerConfig:
    unknown: str
    seed_key: np.uint64
    ood_families: frozenset[str]
    ood_accessions: frozenset[str]


class RecordError(Exception):
    """A record problem that stops the run (unknown letter with --unknown error)."""

    def __init__(self, index: int, accession: str, message: str):
        super().__init__(index, accession, message)  # args make it picklable back from a worker
        self.index, self.accession, self.message = index, accession, message


_CONFIG: WorkerConfig | None = None


def configure(config: WorkerConfig) -> None:
    """Set the configuration process_block uses in this process (the pool initializer of workers)."""
    global _CONFIG
    _CONFIG = config


_GT, _PIPE, _NEWLINE = b">"[0], b"|"[0], b"\n"[0]
_UNIPROT_PREFIXES = np.frombuffer(b"sptr", dtype=np.uint8).reshape(2, 2)  # titles `sp|ACC|...`, `tr|ACC|...`
# Bytes that end a word for str.split() (whitespace of latin-1 text): such a byte inside `sp|ACC|` sends the
# title to parse_title.
_SPACE = np.array([chr(b).isspace() for b in range(256)])


def _fast_accessions(arr: np.ndarray, heads: np.ndarray, block: bytes) -> tuple[list[str], np.ndarray]:
    """Accessions and their keys of the titles starting after `heads` ('>' offsets): vectorised for
    `sp|ACC|...` / `tr|ACC|...` titles (ACC of 1-16 bytes, no whitespace), parse_title for any other title."""
    n, width = heads.size, ACCESSION_PACKED
    idx = np.minimum(heads[:, None] + np.arange(1, 4 + width + 1), arr.size - 1)
    head = arr[idx]  # the title's first 3 + 17 bytes: prefix, '|', ACC (at most 16) and its closing '|'
    acc_len = (head[:, 3:] == _PIPE).argmax(axis=1)
    acc = head[:, 3 : 3 + width] * (np.arange(width) < acc_len[:, None])
    ok = (
        (head[:, None, :2] == _UNIPROT_PREFIXES).all(axis=2).any(axis=1)
        & (head[:, 2] == _PIPE)
        & (acc_len > 0)
        & ~_SPACE[acc].any(axis=1)  # also catches a '\n' ending the title before the '|'
    )
    acc[~ok] = 0
    acc_len[~ok] = 0
    words = acc.view("<u8")
    keys = np.maximum(pack_key(words[:, 0], words[:, 1]), np.uint64(1))
    text = np.zeros((n, width + 1), dtype=np.uint8)
    text[:, :width] = acc
    text[np.arange(n), acc_len] = _NEWLINE
    names = text.tobytes().translate(None, b"\0").decode("latin-1").split("\n")[:-1]
    if not ok.all():
        odd = np.flatnonzero(~ok).tolist()
        for i in odd:
            a = int(heads[i])
            names[i] = parse_title(block[a + 1 : block.find(b"\n", a)].decode("latin-1"))[0]
        keys[odd] = accession_keys([names[i] for i in odd])
    return names, keys


def fast_fasta_block(block: bytes, cfg: WorkerConfig) -> BlockResult | None:
    """Whole-block FASTA processing with a handful of C-level passes; None if the block needs the record path.

    Gives exactly what the record path (parse_fasta = SimpleFastaParser) gives for blocks whose records are all
    non-empty and whose letters are all uppercase vocabulary letters: bodies are cut out at once,
    joined with NUL, newlines (and ' ', '\r') deleted and tokenized by one translate (NUL -> EOS).
    """
    arr = np.frombuffer(block, dtype=np.uint8)
    gt = np.flatnonzero(arr == _GT)  # '>' is rare: header starts plus any inside titles
    if gt.size and gt[0] == 0:
        heads = np.concatenate([gt[:1], gt[1:][arr[gt[1:] - 1] == _NEWLINE]])
    else:
        heads = gt[arr[gt - 1] == _NEWLINE] if gt.size else gt
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
    nucleotide_like = []
    for i in np.flatnonzero(nucleotide_like_records(tokens, starts, lengths)).tolist():  # rare in a protein file
        a, s = hl[i], int(starts[i])
        title = block[a + 1 : find(b"\n", a)].decode("latin-1")
        nucleotide_like.append((i, bool(parse_title(title)[1]), nucleotide_detail(tokens[s : s + int(lengths[i])])))
    names, keys = _fast_accessions(arr, heads, block)
    if cfg.ood_accessions:
        ood = np.fromiter((a in cfg.ood_accessions for a in names), dtype=bool, count=n)
    else:
        ood = np.zeros(n, dtype=bool)
    return BlockResult(
        accessions="\n".join(names),
        accession_keys=keys,
        rejected=[],
        changed=Counter(),
        nucleotide_like=nucleotide_like,
        accepted=np.arange(n, dtype=np.int64),
        tokens=tokens,
        lengths=lengths,
        digests=sequence_digests(tokens, starts.tolist(), ends.tolist(), cfg.seed_key),
        ood=ood,
        residues=int(lengths.sum()),
    )


def process_block(task: tuple[str, bytes]) -> BlockResult:
    """Parse, check, tokenize and hash one block of records (runs in a worker); task = (parser, block)."""
    cfg, (parser, block) = _CONFIG, task
    if parser == "fasta":
        result = fast_fasta_block(block, cfg)
        if result is not None:
            return result
    accessions, families_of, rejected, changed, nucleotide_like = [], [], [], Counter(), []
    accepted, toks = [], []
    residues = 0
    for i, (acc, uniprot, families, raw, error) in enumerate(PARSERS[parser](block)):
        accessions.append(acc)
        if error is not None:  # unreadable flat-file entry
            rejected.append((i, "malformed", error))
            continue
        residues += len(raw)
        if not raw:
            rejected.append((i, "empty" if parser.startswith("fasta") else "no_sequence", ""))
            continue
        tok = raw.translate(_STRICT_TABLE)
        changes = []  # counted only if the record is kept
        if not tok.isascii():  # ids are < 128, the two marks are not: one fast scan for both
            if _LOWER_BYTE in tok:
                tok = raw.upper().translate(_STRICT_TABLE)
                changes.append("lowercase")
            if _UNKNOWN_BYTE in tok:
                pos = tok.index(_UNKNOWN_BYTE)
                detail = f"letter {chr(raw[pos])!r} at position {pos + 1} is not in the vocabulary"
                if cfg.unknown == "error":
                    raise RecordError(i, acc, detail)
                if cfg.unknown == "reject":
                    rejected.append((i, "unknown_letter", detail))
                    continue
                tok = tok.replace(_UNKNOWN_BYTE, bytes([X]))
                changes.append("unknown_to_x")
        if is_nucleotide_like(tok):
            nucleotide_like.append((i, uniprot, nucleotide_detail(tok)))
        changed.update(changes)
        accepted.append(i)
        toks.append(tok)
        families_of.append(acc in cfg.ood_accessions or not cfg.ood_families.isdisjoint(families))
    lengths = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    ends = np.cumsum(lengths + 1) - 1
    tokens = _EOS_BYTE.join(toks) + _EOS_BYTE if toks else b""
    return BlockResult(
        accessions="\n".join(accessions),
        accession_keys=accession_keys(accessions),
        rejected=rejected,
        changed=changed,
        nucleotide_like=nucleotide_like,
        accepted=np.array(accepted, dtype=np.int64),
        tokens=tokens,
        lengths=lengths,
        digests=sequence_digests(tokens, (ends - lengths).tolist(), ends.tolist(), cfg.seed_key),
        ood=np.array(families_of, dtype=bool),
        residues=residues,
    )
