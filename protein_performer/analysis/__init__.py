"""Attention analysis: explicit attention maps of trained models, amino-acid similarity from attention
(Vig et al. 2020) and from the embeddings (a control) against BLOSUM62, along training, figures, and the
helpers behind the notebooks."""

from .compute import AnalysisResult, analyze_attention
from .maps import identity_value_maps, model_input
from .over_training import agreement_over_training, write_agreement_over_training
from .report import headline, write_analysis
from .similarity import AttentionToAminoAcids, agreement, blosum62, embedding_similarity, similarity_matrix

__all__ = [
    "AnalysisResult",
    "AttentionToAminoAcids",
    "agreement",
    "agreement_over_training",
    "analyze_attention",
    "blosum62",
    "embedding_similarity",
    "headline",
    "identity_value_maps",
    "model_input",
    "similarity_matrix",
    "write_agreement_over_training",
    "write_analysis",
]
