"""Data preparation: UniProt FASTA / flat files -> tokenized, de-duplicated, split shards.

Run it as `protein-performer-prep` or `python -m data_prep`; the on-disk format it writes is read
by `protein_performer.data`.
"""

class PrepError(Exception):
    """A problem with the input or the output that stops the run; the CLI prints it without a traceback."""
