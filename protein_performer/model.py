"""The protein language model: a pre-LayerNorm Transformer whose attention is exact or FAVOR+.

Architecture of the paper's protein models (docs/paper_notes.md section 2): learned position embeddings
initialised sinusoidal, pre-LN blocks, GELU MLP, no bias on the q/k/v/output projections, a final
LayerNorm and an untied output layer. Knows nothing of Lightning: plain nn.Modules, readable top to bottom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import vocab
from .attention import DEFAULT_CHUNK, ExactAttention, FavorAttention, attention_matrix
from .attention.features import no_autocast
from .layers import Dropout, FeedForward, SplitHeads, autocast_dtype

AttentionKind = Literal["exact", "favor-softmax", "favor-relu"]
ATTENTION_KINDS: tuple[str, ...] = ("exact", "favor-softmax", "favor-relu")
# Config fields no run sets: a label, and what the vocabulary and the training objective decide.
DERIVED_FIELDS = ("name", "vocab_size", "causal")
PresetName = Literal["paper-36l", "paper-concat-6l", "paper-concat-transformer", "small", "tiny"]


@dataclass(frozen=True)
class Config:
    """Model hyper-parameters. Build one from a preset: Config.from_name("paper-36l", attention="exact")."""

    name: str = "custom"
    vocab_size: int = vocab.VOCAB_SIZE
    d_model: int = 512
    """Width of the residual stream."""
    n_heads: int = 8
    """Attention heads per layer (d_model / n_heads per head)."""
    n_layers: int = 6
    """Transformer blocks."""
    d_ff: int = 1024
    """Hidden width of each block's MLP."""
    dropout: float = 0.1
    """Dropout on embeddings, attention output and MLP output."""
    max_len: int = 1024
    """Longest input in tokens (the learned position table ends there)."""
    attention: AttentionKind = "favor-relu"
    """exact (softmax, SDPA), favor-softmax (positive random features) or favor-relu."""
    causal: bool = False
    """Causal (next-token) attention; set from the training objective."""
    nb_features: int = 256
    """Random features m (favor-softmax; favor-relu with relu_random_features)."""
    relu_random_features: bool = False
    """favor-relu with m random ReLU features; False: the authors' deterministic relu(x) + 1e-3 map."""
    orthogonal_features: bool = True
    """Orthogonal random features (False: IID Gaussian rows, the paper's ablation)."""
    feature_scaling: Literal["chi", "sqrt_d"] = "chi"
    """Row norms of the random projection: chi-distributed, or all sqrt(d)."""
    chunk_size: int = DEFAULT_CHUNK
    """Causal FAVOR chunk length."""
    feature_seed: int = 0
    """Seed of the projections drawn at construction (one per layer)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward: memory ~ L x d_model per layer, for the longest lengths."""

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose one of {ATTENTION_KINDS}")
        for size in ("d_model", "n_heads", "n_layers", "d_ff", "max_len", "nb_features", "chunk_size"):
            if getattr(self, size) < 1:
                raise ValueError(f"{size} = {getattr(self, size)}: model sizes must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout = {self.dropout}: must lie in [0, 1)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Config fields {sorted(unknown)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A Config from to_dict() output (checkpoints.upgrade_checkpoint brings earlier releases' to this form)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Config fields {sorted(unknown)}")
        return cls(**values)


PRESETS: dict[str, Config] = {
    c.name: c
    for c in [
        # the paper's single-sequence models (L = 1024): about 76 M parameters
        Config(name="paper-36l", d_model=512, n_heads=8, n_layers=36, d_ff=1024, max_len=1024),
        # the concatenated task (L = 8192): the 6-layer Performer ...
        Config(name="paper-concat-6l", d_model=512, n_heads=8, n_layers=6, d_ff=2048, max_len=8192),
        # ... and the largest exact Transformer that fit (paper: 8 heads, 1-3 layers, d 256, d_ff 256)
        Config(name="paper-concat-transformer", attention="exact", d_model=256, n_heads=8, n_layers=3,
               d_ff=256, max_len=8192),
        # CPU sizes: the quality benchmark and the demo, and the unit tests
        Config(name="small", d_model=256, n_heads=8, n_layers=4, d_ff=1024, max_len=1024, nb_features=128),
        Config(name="tiny", d_model=64, n_heads=4, n_layers=2, d_ff=128, max_len=512, nb_features=32),
    ]
}


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if cfg.attention == "exact":
            self.core = ExactAttention(causal=cfg.causal)
        else:
            kernel = "softmax" if cfg.attention == "favor-softmax" else "relu"
            self.core = FavorAttention(
                cfg.d_head, cfg.nb_features, kernel=kernel, causal=cfg.causal,
                random_features=kernel == "softmax" or cfg.relu_random_features,
                orthogonal=cfg.orthogonal_features, scaling=cfg.feature_scaling, chunk_size=cfg.chunk_size,
                seed=derive_seed(cfg.feature_seed, layer),
            )

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v, each (B, H, L, d_head)."""
        return SplitHeads.apply(self.qkv(x), self.n_heads)

    def forward(self, x, padding_mask=None):
        q, k, v = self.project(x)
        y = self.core(q, k, v, key_padding_mask=padding_mask)  # (B, H, L, d_head)
        y = y.transpose(1, 2).flatten(2)  # (B, L, D)
        return self.out(y), (q, k)

    def decode(self, x, state):
        q, k, v = self.project(x)
        y, state = self.core.decode(q, k, v, state)
        return self.out(y.transpose(1, 2).flatten(2)), state


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, storing one (B, L, d_ff) activation for backward instead of two."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):  # (B, L, D), one Function in the dtype autocast would give its products
        dtype = autocast_dtype(x)
        params = (p.to(dtype) for p in (self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias))
        with no_autocast(x.device):
            y = FeedForward.apply(x.to(dtype).flatten(0, -2), *params)  # (B L, D)
        return self.drop(y.view(x.shape))


class Block(nn.Module):
    """Pre-LN block. The residual stream stays in x's dtype (float32 under autocast); each branch's bf16 output is
    converted before its add, which on the CPU is about 3x faster than one add over mixed dtypes."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None):
        a, qk = self.attn(self.ln1(x), padding_mask)
        x = x + self.drop(a).to(x.dtype)
        x = x + self.mlp(self.ln2(x)).to(x.dtype)
        return x, qk

    def decode(self, x, state):
        a, state = self.attn.decode(self.ln1(x), state)
        x = x + self.drop(a).to(x.dtype)
        return x + self.mlp(self.ln2(x)).to(x.dtype), state


class ProteinLM(nn.Module):
    """Bidirectional (masked) or causal protein language model over the 29-token vocabulary."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: residual branches scaled by depth
            for p in (block.attn.out.weight, block.mlp.proj.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        with torch.no_grad():
            self.pos_emb.weight.copy_(sinusoidal_positions(cfg.max_len, cfg.d_model))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        repr_layers: tuple[int, ...] = (),
        return_qk: bool = False,
    ) -> dict:
        """tokens (B, L) int64 ids; padding_mask (B, L) bool, True = real token (None: no padding).

        Returns {"logits": (B, L, V)}, plus "representations" {layer: (B, L, D)} for the layers asked
        (0 = embeddings, n_layers = after the final LayerNorm) and "qk" [(q, k) per layer, each
        (B, H, L, d_head)] when return_qk, from which attention maps are built (see attention_maps).
        """
        b, length = tokens.shape
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds the model's max_len {self.cfg.max_len}")
        x = self.drop(self.tok_emb(tokens) + self.pos_emb.weight[:length])  # (B, L, D)
        reps, qks = {}, []
        if 0 in repr_layers:
            reps[0] = x
        for i, block in enumerate(self.blocks, start=1):
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, qk = checkpoint(block, x, padding_mask, use_reentrant=False)
            else:
                x, qk = block(x, padding_mask)
            if return_qk:
                qks.append(qk)
            if i in repr_layers and i != self.cfg.n_layers:
                reps[i] = x
        x = self.ln_f(x)
        if self.cfg.n_layers in repr_layers:
            reps[self.cfg.n_layers] = x
        out = {"logits": self.head(x)}
        if repr_layers:
            out["representations"] = reps
        if return_qk:
            out["qk"] = qks
        return out

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: DecodeCache | None = None) -> tuple[torch.Tensor, DecodeCache]:
        """Causal models: logits (B, T, V) of the next T tokens given the cache of everything before them.

        FAVOR layers carry a constant-size state (the prefix sums [S, z] and their running maximum), so each new
        token costs the same whatever the prefix length; exact layers carry a key/value cache. The logits equal those of
        a full forward pass over prefix + tokens. Pass the whole prompt once, then one token at a time.
        """
        if not self.cfg.causal:
            raise ValueError("decode() needs a causal model; this one is bidirectional (masked LM)")
        cache = cache or DecodeCache([None] * self.cfg.n_layers, 0)
        start, length = cache.length, tokens.shape[1]
        if start + length > self.cfg.max_len:
            raise ValueError(f"position {start + length - 1} is beyond the model's max_len {self.cfg.max_len}")
        x = self.tok_emb(tokens) + self.pos_emb.weight[start : start + length]
        states = []
        for block, state in zip(self.blocks, cache.states):
            x, state = block.decode(x, state)
            states.append(state)
        return self.head(self.ln_f(x)), DecodeCache(states, start + length)

    @torch.no_grad()
    def attention_maps(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Row-normalised attention of every layer and head: (n_layers, B, H, L, L), float32.

        Exact models give their softmax weights; FAVOR models the matrix D^-1 phi(Q) phi(K)^T that their
        linear-time computation applies implicitly (causally masked for causal models).
        """
        qks = self(tokens, padding_mask, return_qk=True)["qk"]
        maps = []
        for block, (q, k) in zip(self.blocks, qks):
            core = block.attn.core
            if isinstance(core, FavorAttention):
                a = attention_matrix(q, k, core.random_projection, kernel=core.kernel, causal=core.causal,
                                     key_padding_mask=padding_mask)
            else:
                a = attention_matrix(q, k, kernel="exact", causal=core.causal, key_padding_mask=padding_mask)
            maps.append(a.float())
        return torch.stack(maps)

    @torch.no_grad()
    def redraw_features(self, seed: int) -> None:
        """Draw new random features in every FAVOR layer from (seed, layer): identical on every rank."""
        for i, block in enumerate(self.blocks):
            if isinstance(block.attn.core, FavorAttention):
                block.attn.core.redraw(derive_seed(seed, i))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class DecodeCache:
    """Per-layer decoding state (FAVOR: DecodeState; exact: (keys, values)) and the number of tokens seen."""

    states: list
    length: int


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence hashing: nearby inputs give unrelated seeds); the
    one seed mixer of the project (features per layer, redraws per step, dropout per step and rank)."""
    return int(np.random.SeedSequence([abs(int(v)) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The Transformer's sinusoidal position table (length, dim), the initial value of pos_emb."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()
