"""Attention analysis: explicit attention maps of trained models, amino-acid similarity from attention
(Vig et al. 2020) against BLOSUM62, figures, and the helpers behind the notebooks."""

from .checkpoint import AnalysisError, LoadedModel, load_model
from .maps import identity_value_maps, model_input
from .report import headline, run_analysis
from .sequences import Protein, find_protein, iter_proteins, read_proteins
from .similarity import AttentionToAminoAcids, agreement, blosum62, similarity_matrix

__all__ = [
    "AnalysisError",
    "AttentionToAminoAcids",
    "LoadedModel",
    "Protein",
    "agreement",
    "blosum62",
    "find_protein",
    "headline",
    "identity_value_maps",
    "iter_proteins",
    "load_model",
    "model_input",
    "read_proteins",
    "run_analysis",
    "similarity_matrix",
]
