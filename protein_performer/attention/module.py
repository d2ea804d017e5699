"""nn.Module wrappers: the attention op with its state (the projection matrix) and nothing else."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocking import DEFAULT_CHUNK
from .exact import softmax_attention
from .favor import DecodeState, favor_attention
from .features import Kernel, causal_mask, orthogonal_gaussian_matrix


class FavorAttention(nn.Module):
    """FAVOR+ attention over (B, H, L, d_head) q/k/v holding its projection as a buffer.

    The projection is saved in checkpoints and changes only through `redraw(seed)`, a pure function of
    the seed: data-parallel ranks that redraw with the same seed hold the same matrix without talking to
    each other, and forward() has no counter, no randomness and no device sync (torch.compile-friendly).
    """

    def __init__(
        self,
        d_head: int,
        nb_features: int = 256,
        *,
        kernel: Kernel = "softmax",
        causal: bool = False,
        random_features: bool = True,
        orthogonal: bool = True,
        scaling: Literal["chi", "sqrt_d"] = "chi",
        chunk_size: int = DEFAULT_CHUNK,
        seed: int = 0,
    ):
        super().__init__()
        if kernel != "relu" and not random_features:
            raise ValueError(f"kernel {kernel!r} needs random features")
        self.d_head, self.nb_features, self.kernel, self.causal = d_head, nb_features, kernel, causal
        self.orthogonal, self.scaling, self.chunk_size = orthogonal, scaling, chunk_size
        projection = self._draw(seed) if random_features else torch.empty(0)
        self.register_buffer("projection", projection, persistent=True)

    def _draw(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return orthogonal_gaussian_matrix(
            self.nb_features, self.d_head, orthogonal=self.orthogonal, scaling=self.scaling, generator=generator
        )

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Replace the projection by the matrix drawn from `seed` (in place: device and dtype are kept)."""
        if self.projection.numel():
            self.projection.copy_(self._draw(seed))

    @property
    def random_projection(self) -> torch.Tensor | None:
        """The projection, or None for the deterministic relu map (the buffer is then empty)."""
        return self.projection if self.projection.numel() else None

    def forward(self, q, k, v, key_padding_mask=None):
        return favor_attention(
            q, k, v, self.random_projection, kernel=self.kernel, causal=self.causal,
            key_padding_mask=key_padding_mask, chunk_size=self.chunk_size,
        )

    def decode(self, q, k, v, state: DecodeState | None):
        """Causal decoding: outputs of the next positions and the constant-size state after them."""
        return favor_attention(q, k, v, self.random_projection, kernel=self.kernel, causal=True,
                               chunk_size=self.chunk_size, initial_state=state, output_final_state=True)

    def extra_repr(self) -> str:
        features = self.nb_features if self.projection.numel() else 0
        return f"kernel={self.kernel}, causal={self.causal}, nb_features={features}"


class ExactAttention(nn.Module):
    """Exact softmax attention (SDPA) with the same call signature as FavorAttention."""

    def __init__(self, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.causal, self.dropout = causal, dropout

    def forward(self, q, k, v, key_padding_mask=None):
        p = self.dropout if self.training else 0.0
        return softmax_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, dropout_p=p)

    def decode(self, q, k, v, state: tuple[torch.Tensor, torch.Tensor] | None):
        """Causal decoding with a key/value cache: outputs of the next T positions and the grown cache."""
        if state is not None:
            k, v = torch.cat([state[0], k], 2), torch.cat([state[1], v], 2)
        new, total = q.shape[2], k.shape[2]
        # new position i (absolute total - new + i) sees every cached key and the new keys up to itself
        allowed = causal_mask(new, total, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), (k, v)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"
