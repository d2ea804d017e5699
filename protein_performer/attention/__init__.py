"""Attention library, independent of proteins: FAVOR+ (softmax, ReLU, trig kernels; bidirectional and
chunked causal), exact softmax attention, the explicit attention matrices, and O(L^2) references."""

from .exact import softmax_attention
from .favor import attention_matrix, favor_attention
from .features import KERNELS, feature_map, orthogonal_gaussian_matrix
from .module import ExactAttention, FavorAttention

__all__ = [
    "KERNELS",
    "ExactAttention",
    "FavorAttention",
    "attention_matrix",
    "favor_attention",
    "feature_map",
    "orthogonal_gaussian_matrix",
    "softmax_attention",
]
