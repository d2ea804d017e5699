"""protein_performer: Performer (FAVOR+) protein language models, from UniProt files to analysis."""

__version__ = "0.3.0"
