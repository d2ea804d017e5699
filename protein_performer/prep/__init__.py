"""Data preparation: UniProt FASTA / flat files -> tokenized, de-duplicated, split shards.

Run it as `protein-performer-prep` or `python -m protein_performer.prep` (__main__.prep); the on-disk format it
writes, and the writer of its files, are protein_performer.prepared. Modules, in the order data flows: inputs (files
and pipes -> blocks of records), records (blocks -> token ids, record checks), parallel (reader thread, worker
processes), dedup (keys, hash set), splits (OOD families, split keys, minimum counts), manifest (what it records),
output (the locked temporary directory and the final swap), pipeline (the run that ties them together). Warnings and
notes go to the `protein_performer.prep` loggers, which protein_performer.commands shows on stderr beside the
progress bar.
"""

PROG = "protein-performer-prep"
