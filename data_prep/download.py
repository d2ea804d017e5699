"""Download the inputs of one UniProt release: UniProtKB/TrEMBL and Swiss-Prot (FASTA; flat files with --flat_files)
and Pfam's Pfam-A.regions.uniprot.tsv.gz (the held-out families' labels).

    python data_prep/download.py --out raw/
    python data_prep/download.py --out raw/ --base_url http://mirror.example/pub/databases   # a mirror or local copy

Resumable (HTTP Range), verified against the providers' published md5s and sizes, never a partial file under its
final name; a rerun skips what is verified. The machinery is protein_performer/prep/download.py; data_prep/README.md
says more.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat

from protein_performer import commands
from protein_performer.errors import UserError
from protein_performer.outputs import atomic_write
from protein_performer.prep import download as dl

PROG = "data_prep/download.py"


def download(
    out: str,
    release: str = "current",
    pfam_release: str = "current",
    flat_files: bool = False,
    base_url: str = dl.BASE_URL,
    uniprot_url: str | None = None,
    pfam_url: str | None = None,
    retries: NonNegativeInt = 5,
    retry_delay: NonNegativeFloat = 1.0,
    timeout: PositiveFloat = 60.0,
    progress: bool | None = None,
) -> None:
    """Download one UniProt release's TrEMBL and Swiss-Prot and Pfam's regions table into OUT, verified.

    Prints each file's size and the free disk space first, and refuses when the files will not fit. Each file is
    written to NAME.part, renamed to NAME once its size and md5 match those the provider lists (UniProt's
    RELEASE.metalink, Pfam's md5_checksums), and its md5 kept in NAME.md5. An interrupted run resumes where it
    stopped; a rerun skips verified files. The release metadata (reldate.txt, RELEASE.metalink, md5_checksums,
    Pfam.version.gz) is kept beside them.

    Args:
        out: directory to download into (made if missing).
        release: UniProt release: current, or YYYY_MM, which must be the current release of the server given
            (UniProt keeps earlier ones only as tarballs).
        pfam_release: Pfam release: current, or a version such as 37.0 (Pfam/releases/PfamNN.N).
        flat_files: also fetch the flat files (uniprot_trembl.dat.gz, uniprot_sprot.dat.gz; about 3x the FASTA).
        base_url: root holding uniprot/ and Pfam/ as the EBI FTP site does (a mirror or a local copy).
        uniprot_url: UniProt root (holding current_release/knowledgebase/complete/); default BASE_URL/uniprot.
        pfam_url: Pfam root (holding current_release/ and releases/); default BASE_URL/Pfam.
        retries: retries in a row after a connection error, a timeout or an HTTP 408, 429 or 5xx.
        retry_delay: seconds before the first retry, doubled for each next one (at most 60).
        timeout: seconds to wait for a connection or for the next bytes.
        progress: progress bars (default: on a terminal).
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: not a directory")
    client = dl.Client(retries, retry_delay, timeout, progress)
    plan = dl.plan_release(client, uniprot_url or f"{base_url}/uniprot", pfam_url or f"{base_url}/Pfam", release,
                           pfam_release, flat_files)
    print(f"UniProt release {plan.uniprot}, Pfam {plan.pfam} -> {out_dir}")
    todo, need = [], 0
    for remote in sorted(plan.files, key=lambda r: r.size or 0):
        size = "?" if remote.size is None else dl.human(remote.size)
        if dl.is_verified(out_dir / remote.name, remote):
            print(f"  {remote.name:32} {size:>9}  verified, skipped")
            continue
        have = dl.resumable_bytes(out_dir / f"{remote.name}.part", remote)
        need += (remote.size or 0) - have
        todo.append(remote)
        print(f"  {remote.name:32} {size:>9}  " + (f"resumes after {dl.human(have)}" if have else "to fetch"))
    free = dl.free_space(out_dir)
    print(f"  {dl.human(need)} to fetch, {dl.human(free)} free")
    if need > free:
        raise UserError(f"{out_dir}: not enough disk space: {dl.human(need)} to fetch, {dl.human(free)} free")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot write there ({e.strerror})") from None
    for remote in todo:
        client.fetch(remote, out_dir)
    # the release's metadata last: beside it, every file is the one it lists (an interrupted run into a directory
    # of an earlier release leaves that release's metadata, which prepare_paper.py checks each file against)
    for name, data in plan.metadata.items():
        with atomic_write(out_dir / name, "wb") as f:
            f.write(data)
    print(f"{len(todo)} downloaded and verified, {len(plan.files) - len(todo)} already there; "
          f"next: python data_prep/prepare_paper.py --downloads {out_dir} --out data/trembl")


if __name__ == "__main__":
    commands.run(download, sys.argv[1:], PROG)
