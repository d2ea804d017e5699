"""What a release directory of UniProt or Pfam publishes: where its files are, which release it is, and the md5s
(and UniProt's sizes) of its files, from UniProt's RELEASE.metalink and Pfam's md5_checksums. download.py fetches
by it; data_prep/prepare_paper.py checks a download directory against the metadata kept in it."""

from __future__ import annotations

import gzip
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from protein_performer.errors import UserError

UNIPROT_FASTA = ("uniprot_sprot.fasta.gz", "uniprot_trembl.fasta.gz")
UNIPROT_FLAT = ("uniprot_sprot.dat.gz", "uniprot_trembl.dat.gz")
PFAM_REGIONS = "Pfam-A.regions.uniprot.tsv.gz"
RELDATE, METALINK = "reldate.txt", "RELEASE.metalink"
PFAM_CHECKSUMS, PFAM_VERSION = "md5_checksums", "Pfam.version.gz"


def uniprot_dir(root: str) -> str:
    """The directory of UniProtKB's current release under a UniProt root (…/databases/uniprot)."""
    return f"{root.rstrip('/')}/current_release/knowledgebase/complete"


def pfam_dir(root: str, release: str) -> str:
    """The directory of a Pfam release ('current' or 'NN.N') under a Pfam root (…/databases/Pfam)."""
    if release == "current":
        return f"{root.rstrip('/')}/current_release"
    if not re.fullmatch(r"\d+\.\d+", release):
        raise UserError(f"--pfam_release {release!r}: expected 'current' or a Pfam version such as 37.0")
    return f"{root.rstrip('/')}/releases/Pfam{release}"


def uniprot_release_of(reldate: bytes) -> str:
    """'2024_06' from reldate.txt ('UniProt Knowledgebase Release 2024_06 consists of: ...')."""
    found = re.search(rb"Release (\d{4}_\d{2})", reldate)
    if not found:
        raise UserError(f"{RELDATE}: no 'Release YYYY_MM' in it")
    return found.group(1).decode()


def pfam_release_of(version_gz: bytes) -> str:
    """'37.0' from Pfam.version.gz's 'Pfam release : 37.0' line ('?' if absent)."""
    try:
        version = gzip.decompress(version_gz)
    except (OSError, EOFError):
        return "?"
    found = re.search(rb"Pfam release\s*:\s*(\S+)", version)
    return found.group(1).decode() if found else "?"


def parse_metalink(text: bytes, url: str) -> dict[str, tuple[int | None, str]]:
    """name -> (size, md5) of every file a Metalink document lists (version 3 or 4: tags matched by local name)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise UserError(f"{url}: not a Metalink document ({e})") from None
    files = {}
    for element in root.iter():
        if _local(element.tag) != "file":
            continue
        size = md5 = None
        for child in element.iter():
            tag = _local(child.tag)
            if tag == "size" and child.text:
                size = int(child.text)
            elif tag == "hash" and child.get("type", "").lower() == "md5" and child.text:
                md5 = child.text.strip().lower()
        if md5:
            files[element.get("name")] = (size, md5)
    return files


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_md5_checksums(text: bytes) -> dict[str, str]:
    """name -> md5 from `md5sum` output ('<md5>  <name>' or '<md5> *<name>' lines)."""
    sums = {}
    for line in text.decode("utf-8", "replace").splitlines():
        found = re.fullmatch(r"([0-9a-fA-F]{32}) [ *](.+)", line.strip())
        if found:
            sums[found.group(2)] = found.group(1).lower()
    return sums


def published_md5s(directory: Path) -> dict[str, str]:
    """name -> md5 that the release metadata kept in `directory` (RELEASE.metalink, md5_checksums) publishes."""
    sums = {}
    if (directory / METALINK).is_file():
        metalink = directory / METALINK
        sums |= {name: md5 for name, (_, md5) in parse_metalink(metalink.read_bytes(), str(metalink)).items()}
    if (directory / PFAM_CHECKSUMS).is_file():
        sums |= parse_md5_checksums((directory / PFAM_CHECKSUMS).read_bytes())
    return sums
