"""Per-layer, per-head attention matrices of one protein, by two routes that must agree.

`ProteinLM.attention_maps` forms each layer's row-normalised matrix directly (softmax
weights for exact attention, D^-1 phi(Q) phi(K)^T for FAVOR, causally masked for causal models).
`identity_value_maps` is the paper's trick (App. C.4): run each layer's own attention op, linear-time
FAVOR included, with the values replaced by the identity, so that its output is the attention matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import model_tokens
from ..model import ProteinLM


def model_input(tokens: np.ndarray, max_len: int) -> torch.Tensor:
    """(1, L) model input: [BOS] + residues, cropped to L <= max_len tokens (the training format)."""
    return torch.from_numpy(model_tokens(tokens, max_len))[None]


@torch.no_grad()
def identity_value_maps(model: ProteinLM, tokens: torch.Tensor,
                        padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n_layers, B, H, L, L) attention obtained by feeding V = identity through each layer's attention op."""
    tokens = tokens.to(model.head.weight.device)
    qks = model(tokens, padding_mask, return_qk=True)["qk"]
    maps = []
    for block, (q, k) in zip(model.blocks, qks):
        eye = torch.eye(q.shape[-2], dtype=q.dtype, device=q.device).expand(*q.shape[:2], -1, -1)
        maps.append(block.attn.core(q, k, eye, key_padding_mask=padding_mask).float())
    return torch.stack(maps)
