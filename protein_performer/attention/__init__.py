"""Attention library, independent of proteins: FAVOR+ (softmax, ReLU, trig kernels; bidirectional and causal in
O(L) memory; recurrent decoding), exact softmax attention, the explicit attention matrices, O(L^2) references."""

from .blocking import DEFAULT_CHUNK, Blocking
from .exact import softmax_attention
from .favor import DecodeState, attention_matrix, favor_attention
from .features import KERNELS, orthogonal_gaussian_matrix
from .module import ExactAttention, FavorAttention

__all__ = [
    "DEFAULT_CHUNK",
    "KERNELS",
    "Blocking",
    "DecodeState",
    "ExactAttention",
    "FavorAttention",
    "attention_matrix",
    "favor_attention",
    "orthogonal_gaussian_matrix",
    "softmax_attention",
]
