"""Attention analysis: explicit attention maps of trained models, amino-acid similarity from attention
(Vig et al. 2020) against BLOSUM62, figures, and the helpers behind the notebooks."""

from .maps import identity_value_maps, model_input
from .report import headline, run_analysis
from .similarity import AttentionToAminoAcids, agreement, blosum62, similarity_matrix

__all__ = [
    "AttentionToAminoAcids",
    "agreement",
    "blosum62",
    "headline",
    "identity_value_maps",
    "model_input",
    "run_analysis",
    "similarity_matrix",
]
