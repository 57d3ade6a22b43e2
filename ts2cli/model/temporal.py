"""Temporal transformer over the selected tokens of all frames, then one token per frame (spec §5)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .config import TEMPORAL_POSITIONS, Compat

MASKED = -1e6
"""Additive attention bias on padded keys, as in the reference."""


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TemporalBlock(nn.Module):
    """Pre-LN residual block; parameter names match CLIP's text blocks so they can be copied from them (spec §9)."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(dim, 4 * dim), gelu=QuickGELU(), c_proj=nn.Linear(4 * dim, dim))
        )

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_bias)[0]
        return x + self.mlp(self.ln_2(x))


def expand_frame_mask(mask: torch.Tensor, tokens_per_frame: int, compat: Compat) -> torch.Tensor:
    """(B, T) frame mask → (B, T·M) token mask.

    Tokens are frame-major (token j belongs to frame j // M). "fixed" expands accordingly; "official" tiles the
    mask (token j gets frame j mod T), which is the reference's bug 1 (spec §10.1), kept to reproduce it.
    """
    if compat == "official":
        return mask.repeat(1, tokens_per_frame)
    return mask.repeat_interleave(tokens_per_frame, dim=1)


class TemporalTransformer(nn.Module):
    """Per-token positions, 4 bidirectional blocks over all frames' tokens, residual, then each frame's CLS slot."""

    def __init__(self, dim: int, layers: int = 4, eps: float = 1e-12, positions: int = TEMPORAL_POSITIONS) -> None:
        super().__init__()
        self.heads = max(1, dim // 64)
        self.position = nn.Embedding(positions, dim)
        self.blocks = nn.ModuleList(TemporalBlock(dim, self.heads, eps) for _ in range(layers))

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, *, tokens_per_frame: int, compat: Compat
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T·M, D) tokens and (B, T) mask → (B, T, D) frame features and their (B, T) mask."""
        batch, length, _ = tokens.shape
        if length > self.position.num_embeddings:
            raise ValueError(f"{length} tokens exceed the {self.position.num_embeddings} temporal positions")
        token_mask = expand_frame_mask(mask, tokens_per_frame, compat).to(tokens.dtype)
        bias = ((1.0 - token_mask) * MASKED)[:, None, :].expand(batch, length, length)
        bias = bias.repeat_interleave(self.heads, dim=0)
        x = tokens + self.position.weight[:length].to(tokens.dtype)
        for block in self.blocks:
            x = block(x, bias)
        x = x + tokens
        return x[:, ::tokens_per_frame], token_mask[:, ::tokens_per_frame].to(mask.dtype)
