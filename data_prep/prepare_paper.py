"""The paper's preparation in one command, on what data_prep/download.py fetched: UniProtKB/TrEMBL FASTA, the paper's
20 held-out Pfam families (labels from Pfam-A.regions.uniprot.tsv.gz) as the ood split, the rest train/valid/test.

    python data_prep/prepare_paper.py --downloads raw/ --out data/trembl

Prints the time, peak memory and disk it will need first (from data_prep/prep_costs.json, measured by
benchmarks/prep_scale.py), then runs protein-performer-prep and prints Table 1 and how to train on either view.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse.typing import PositiveInt

from protein_performer import commands
from protein_performer.errors import UserError
from protein_performer.prep import download as dl
from protein_performer.prep.__main__ import prep
from protein_performer.prep.estimate import count_fasta, estimate, read_costs
from protein_performer.prep.parallel import default_workers
from protein_performer.prep.release import PFAM_REGIONS, RELDATE, published_md5s, uniprot_release_of
from protein_performer.prep.splits import PAPER_OOD_FAMILIES

PROG = "data_prep/prepare_paper.py"
COSTS = Path(__file__).resolve().parent / "prep_costs.json"
TREMBL, SPROT = "uniprot_trembl.fasta.gz", "uniprot_sprot.fasta.gz"
WINDOW = 8192  # the concatenated view's L (configs/paper/concat-*.yaml)
TRAIN_SINGLE = "configs/paper/masked-performer-relu.yaml"
TRAIN_CONCAT = "configs/paper/concat-performer.yaml"


def prepare_paper(
    downloads: str,
    out: str,
    swissprot: bool = False,
    costs: str = str(COSTS),
    workers: PositiveInt | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> None:
    """Prepare the paper's corpus (TrEMBL, 20 held-out Pfam families) from DOWNLOADS into OUT.

    One prepared directory serves both of the paper's views: single sequences (L = 1024) and the concatenated
    stream (L = 8192). The time, memory and disk it will need are printed before it starts.

    Args:
        downloads: directory data_prep/download.py filled (verified files only: each needs its NAME.md5).
        out: the prepared directory to write (protein-performer-prep's --out).
        swissprot: add Swiss-Prot (uniprot_sprot.fasta.gz) to TrEMBL; the paper used TrEMBL alone.
        costs: per-record costs of prep (JSON written by benchmarks/prep_scale.py --write_costs).
        workers: parser processes (default: prep's, 1 on up to 2 cores, else one per core).
        dry_run: print the inputs and the estimate, prepare nothing.
        overwrite: replace OUT if it is a prepared directory.
        progress: progress bar (default: on a terminal).
    """
    raw = Path(downloads)
    inputs = [verified(raw, TREMBL)] + ([verified(raw, SPROT)] if swissprot else [])
    labels = verified(raw, PFAM_REGIONS)
    release = uniprot_release_of((raw / RELDATE).read_bytes()) if (raw / RELDATE).is_file() else "?"
    workers = default_workers() if workers is None else workers
    measured = read_costs(costs)
    count = count_fasta(inputs[0], measured)
    for path in inputs[1:]:
        count += count_fasta(path, measured)
    need = estimate(count, measured, workers)
    how = "counted" if count.exact else "estimated from the compressed size"
    print(f"UniProt release {release}: {', '.join(p.name for p in inputs)}; {count.records:,.0f} records, "
          f"{count.residues:,.0f} residues ({how}); held out: the paper's {len(PAPER_OOD_FAMILIES)} Pfam families")
    print(f"needs about {duration(need.seconds)} with {workers} worker{'s' * (workers > 1)} "
          f"({duration(need.cpu_seconds)} of CPU; decompression runs in one thread, so more workers gain less), "
          f"plus reading {labels.name} ({dl.human(labels.stat().st_size)})")
    print(f"peak memory about {dl.human(need.peak_bytes)} (every record taken as unique); "
          f"disk {dl.human(need.output_bytes)} for {out}, up to twice that while sequences move between splits; "
          f"{dl.human(dl.free_space(Path(out)))} free")
    if dry_run:
        return
    manifest = prep(inputs=[str(p) for p in inputs], out=out, pfam_labels=str(labels), workers=workers,
                    overwrite=overwrite, progress=progress)
    print_table1(manifest)
    print(f"single sequence (L = 1024): protein-performer fit --config {TRAIN_SINGLE} --data.data_dir {out}")
    print(f"concatenated (L = {WINDOW}):   protein-performer fit --config {TRAIN_CONCAT} --data.data_dir {out}")


def verified(raw: Path, name: str) -> Path:
    """raw/name as data_prep/download.py left it: its .md5 sidecar names the md5 that the release metadata beside it
    publishes (so a file of another release, left by an interrupted run, is refused)."""
    path = raw / name
    if not path.is_file() or not dl.sidecar(path).is_file():
        raise UserError(f"{path}: not downloaded and verified (no {dl.sidecar(path).name}); "
                        f"run python data_prep/download.py --out {raw} first")
    have, published = dl.sidecar(path).read_text().split()[:1], published_md5s(raw).get(name)
    if have != [published]:
        raise UserError(f"{path}: its md5 ({' '.join(have) or 'none'}) is not the one the release metadata in {raw} "
                        f"lists ({published or 'no entry'}): run python data_prep/download.py --out {raw} again")
    return path


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else "< 1 min"


def print_table1(manifest: dict) -> None:
    """The paper's Table 1 (residues per sequence) and the concatenated view's windows, per split."""
    print(f"{'Table 1':8} {'sequences':>13} {'residues':>16} {'min':>6} {'max':>7} {'mean ± std':>17} {'median':>7} "
          f"{f'windows of {WINDOW}':>16}")
    for name, split in manifest["splits"].items():
        if split["count"]:
            lengths = (f"{split['min']:>6} {split['max']:>7} {split['mean']:>8.2f} ± {split['std']:<6.2f} "
                       f"{split['median']:>7g}")
        else:
            lengths = " " * 40
        print(f"{name:8} {split['count']:>13,} {split['residues']:>16,} {lengths} {split['tokens'] // WINDOW:>16,}")


if __name__ == "__main__":
    commands.run(prepare_paper, sys.argv[1:], PROG)
