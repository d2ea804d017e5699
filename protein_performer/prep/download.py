"""One release's inputs over HTTP(S): UniProtKB FASTA or flat files and Pfam's regions table, checked against the
checksums the providers publish with the release (UniProt's RELEASE.metalink, Pfam's md5_checksums) and by size.

A file is written to NAME.part and renamed to NAME only once its size and md5 match; its md5 is then kept in
NAME.md5 (`md5sum -c` format), which is how a rerun knows it may skip the file. An interrupted transfer resumes from
the end of NAME.part with an HTTP Range request; a server that ignores Range sends the whole file, which replaces
the part. Connection errors, timeouts, 408, 429 and 5xx answers are retried with exponential back-off (the count
starts again whenever bytes arrived); any other HTTP error stops at once. The scripts in data_prep/ drive it.

Layouts (those of ftp.ebi.ac.uk/pub/databases, which mirrors ftp.uniprot.org):
  UNIPROT/current_release/knowledgebase/complete/{uniprot_trembl,uniprot_sprot}.{fasta,dat}.gz, reldate.txt,
      RELEASE.metalink (Metalink 3 or 4: each file's name, size and md5)
  PFAM/current_release/ or PFAM/releases/PfamNN.N/: Pfam-A.regions.uniprot.tsv.gz, md5_checksums
      ("<md5>  <name>" lines), Pfam.version.gz
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

import protein_performer
from protein_performer.commands import progress_bar
from protein_performer.errors import UserError
from protein_performer.outputs import atomic_write
from protein_performer.prep.release import (
    METALINK,
    PFAM_CHECKSUMS,
    PFAM_REGIONS,
    PFAM_VERSION,
    RELDATE,
    UNIPROT_FASTA,
    UNIPROT_FLAT,
    parse_md5_checksums,
    parse_metalink,
    pfam_dir,
    pfam_release_of,
    uniprot_dir,
    uniprot_release_of,
)

log = logging.getLogger(__name__)

BASE_URL = "https://ftp.ebi.ac.uk/pub/databases"
CHUNK = 1 << 20
MAX_DELAY = 60.0  # seconds: the back-off stops growing here


@dataclass
class Remote:
    """A file of the release: where it is, its published size (None if unknown) and md5, and where these came from."""

    name: str
    url: str
    size: int | None
    md5: str
    listed_in: str


class _Transient(Exception):
    """A failure worth retrying; `progressed` when bytes arrived before it (the retry count starts again)."""

    def __init__(self, what: str, progressed: bool = False):
        super().__init__(what)
        self.progressed = progressed


class Client:
    """HTTP(S) with retries: small files into memory, release files onto disk (resumed, verified, renamed)."""

    def __init__(self, retries: int, retry_delay: float, timeout: float, progress: bool | None):
        self.retries, self.retry_delay, self.timeout, self.progress = retries, retry_delay, timeout, progress
        self.session = requests.Session()
        # identity: a server that gzips on the fly would otherwise change the bytes the checksums are of
        self.session.headers.update({"Accept-Encoding": "identity",
                                     "User-Agent": f"protein_performer/{protein_performer.__version__}"})

    def get(self, url: str) -> bytes:
        """A small file's bytes."""

        def attempt():
            with self._request("GET", url) as r:
                return self._read(r, url)

        return self._retry(url, attempt)

    def size(self, url: str) -> int | None:
        """Content-Length of a HEAD request (None if the server gives none)."""

        def attempt():
            with self._request("HEAD", url) as r:
                self._check(r, url)
                length = r.headers.get("Content-Length")
                return int(length) if length is not None else None

        return self._retry(url, attempt)

    def fetch(self, remote: Remote, out: Path) -> None:
        """Download `remote` to out/NAME.part (resuming what is there), verify it, rename it to out/NAME."""
        part = out / f"{remote.name}.part"
        md5, have = hashlib.md5(), resumable_bytes(part, remote)
        if have:
            log.info(f"{part}: resuming after {have:,} bytes (hashing them first)")
            _hash_file(part, md5)
        elif part.exists():
            _truncate(part)
        bar = progress_bar(desc=remote.name, unit="B", unit_scale=True, total=remote.size, progress=self.progress)
        bar.update(have)

        def attempt():
            nonlocal md5, have
            if remote.size is not None and have == remote.size:
                return
            headers = {"Range": f"bytes={have}-"} if have else {}
            with self._request("GET", remote.url, headers) as r:
                if r.status_code == 416 and have:  # the part already holds the whole file: the checksum decides
                    return
                self._check(r, remote.url)
                start = _range_start(r)
                if have and start != have:
                    if r.status_code == 206 and start != 0:
                        raise UserError(f"{remote.url}: asked for bytes {have}-, the server sent "
                                        f"{r.headers.get('Content-Range')}")
                    log.warning(f"{remote.url}: the server ignored the range request; fetching from the start")
                    bar.update(-have)
                    md5, have = hashlib.md5(), _truncate(part)
                arrived = 0
                try:
                    with open(part, "ab") as f:
                        for chunk in r.raw.stream(CHUNK, decode_content=False):
                            f.write(chunk)
                            md5.update(chunk)
                            have += len(chunk)
                            arrived += len(chunk)
                            bar.update(len(chunk))
                except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                    raise _Transient(f"transfer cut after {have:,} bytes ({type(e).__name__})", arrived > 0) from None
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise UserError(f"{out}: disk full after {have:,} bytes of {remote.name}; {part.name} is "
                                        "kept: free some space and run again to resume") from None
                    raise
            if remote.size is not None and have < remote.size:
                raise _Transient(f"connection closed after {have:,} of {remote.size:,} bytes", arrived > 0)

        try:
            self._retry(remote.url, attempt)
        finally:
            bar.close()
        _promote(part, out / remote.name, remote, md5.hexdigest())

    def _request(self, method: str, url: str, headers: dict | None = None) -> requests.Response:
        try:
            r = self.session.request(method, url, headers=headers, stream=True, timeout=self.timeout)
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as e:  # no retry mends a URL: a path, file://, a typo
            raise UserError(f"{url}: not an HTTP(S) URL requests can fetch ({type(e).__name__}); --base_url and "
                            "--uniprot_url / --pfam_url take http:// or https:// addresses") from None
        except requests.RequestException as e:
            raise _Transient(f"request failed ({type(e).__name__})") from None
        return r

    def _check(self, r: requests.Response, url: str) -> None:
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise _Transient(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            raise UserError(f"HTTP {r.status_code} {r.reason}: {url}")

    def _read(self, r: requests.Response, url: str) -> bytes:
        self._check(r, url)
        try:
            return r.raw.read(decode_content=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise _Transient(f"transfer cut ({type(e).__name__})") from None

    def _retry(self, url: str, attempt: Callable):
        """attempt() until it succeeds; transient failures wait retry_delay, doubled each time, up to `retries`
        times in a row."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Transient as e:
                failures = 1 if e.progressed else failures + 1
                if failures > self.retries:
                    raise UserError(f"{e}: {url} (gave up after {failures} tries)") from None
                delay = min(self.retry_delay * 2 ** (failures - 1), MAX_DELAY)
                log.warning(f"{e}: {url}; retry {failures} of {self.retries} in {delay:g} s")
                time.sleep(delay)


@dataclass
class Release:
    """What one run fetches: the release files, the metadata files to keep beside them (name -> bytes), and the
    release names."""

    files: list[Remote]
    metadata: dict[str, bytes]
    uniprot: str
    pfam: str


def plan_release(client: Client, uniprot_root: str, pfam_root: str, release: str, pfam_release: str,
                 flat_files: bool) -> Release:
    """Read the release metadata of both providers and list the files to fetch with their sizes and md5s.

    UniProt publishes the complete/ layout for its current release only (earlier ones are tarballs under
    previous_releases/), so a named UniProt release must be the current one of the server (or mirror) given."""
    if release != "current" and not re.fullmatch(r"\d{4}_\d{2}", release):
        raise UserError(f"--release {release!r}: expected 'current' or a UniProt release such as 2024_06")
    uni, pfam = uniprot_dir(uniprot_root), pfam_dir(pfam_root, pfam_release)
    metadata = {name: client.get(f"{uni}/{name}") for name in (RELDATE, METALINK)}
    metadata |= {name: client.get(f"{pfam}/{name}") for name in (PFAM_CHECKSUMS, PFAM_VERSION)}
    current = uniprot_release_of(metadata[RELDATE])
    if release not in ("current", current):
        raise UserError(f"UniProt release {release} is not the current one of {uni} ({current}); UniProt keeps "
                        "earlier releases only as tarballs under previous_releases/: give --uniprot_url of a mirror "
                        "whose current_release is that release")
    metalink = parse_metalink(metadata[METALINK], f"{uni}/{METALINK}")
    files = []
    for name in UNIPROT_FASTA + (UNIPROT_FLAT if flat_files else ()):
        if name not in metalink:
            raise UserError(f"{uni}/{METALINK} lists no {name}")
        size, md5 = metalink[name]
        files.append(Remote(name, f"{uni}/{name}", size, md5, f"{uni}/{METALINK}"))
    sums = parse_md5_checksums(metadata[PFAM_CHECKSUMS])
    if PFAM_REGIONS not in sums:
        raise UserError(f"{pfam}/{PFAM_CHECKSUMS} lists no {PFAM_REGIONS}")
    url = f"{pfam}/{PFAM_REGIONS}"
    files.append(Remote(PFAM_REGIONS, url, client.size(url), sums[PFAM_REGIONS], f"{pfam}/{PFAM_CHECKSUMS}"))
    return Release(files, metadata, current, pfam_release_of(metadata[PFAM_VERSION]))


def _range_start(r: requests.Response) -> int:
    """Where the body starts in the file: 0 for a 200, the first byte of Content-Range for a 206."""
    found = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
    return int(found.group(1)) if r.status_code == 206 and found else 0


def resumable_bytes(part: Path, remote: Remote) -> int:
    """Bytes of a part a transfer resumes after: 0 without one, or when it is longer than the file."""
    have = part.stat().st_size if part.is_file() else 0
    return 0 if remote.size is not None and have > remote.size else have


def _truncate(path: Path) -> int:
    with open(path, "wb"):
        return 0


def _hash_file(path: Path, md5) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 8):
            md5.update(chunk)


def md5_of(path: Path) -> str:
    md5 = hashlib.md5()
    _hash_file(path, md5)
    return md5.hexdigest()


def _promote(part: Path, final: Path, remote: Remote, digest: str) -> None:
    """Rename a part that matches its published size and md5 to its final name; remove one that does not."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise UserError(f"size mismatch: {final.name}: {size:,} bytes, {remote.size:,} expected (listed in "
                        f"{remote.listed_in}); the download was removed: run again to fetch it anew")
    if digest != remote.md5:
        part.unlink()
        raise UserError(f"checksum mismatch: {final.name}: md5 {digest}, {remote.md5} expected (listed in "
                        f"{remote.listed_in}); the download was removed: run again to fetch it anew")
    # the old sidecar goes first: a crash in between then leaves a file that is hashed again, never a wrong sidecar
    sidecar(final).unlink(missing_ok=True)
    os.replace(part, final)
    _write_sidecar(final, digest)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def is_verified(path: Path, remote: Remote) -> bool:
    """Whether `path` holds `remote`: its size matches and its .md5 sidecar names the published md5. A file without
    sidecar (copied in by hand) is hashed once, and gets a sidecar when it matches."""
    if not path.is_file() or (remote.size is not None and path.stat().st_size != remote.size):
        return False
    if sidecar(path).exists():
        return sidecar(path).read_text().split()[:1] == [remote.md5]
    log.info(f"{path}: no {sidecar(path).name} beside it; checking its md5")
    if md5_of(path) != remote.md5:
        return False
    _write_sidecar(path, remote.md5)
    return True


def _write_sidecar(path: Path, md5: str) -> None:
    with atomic_write(sidecar(path)) as f:
        f.write(f"{md5}  {path.name}\n")


def free_space(path: Path) -> int:
    """Free bytes on the file system that holds `path`, or would once its missing parents are made."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def human(n: float) -> str:
    """Bytes in decimal units: 52.3 GB."""
    units = ("B", "kB", "MB", "GB", "TB")
    k = 0
    while abs(n) >= 1000 and k < len(units) - 1:
        n, k = n / 1000, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"
