"""Token shift inside the last ViT blocks (spec §3.1).

Within a shifted block the attention input (after ``ln_1``) of frame t borrows a fixed set of patch tokens from
frame t-1 (set F) and another set from frame t+1 (set G). The residual path and the MLP see unshifted tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import PackedSelfAttention

BACKWARD_OFFSET = 4
"""G starts at token 1 + 3 in the reference code, whatever the fold."""


def shift_index_sets(num_tokens: int, div: int = 7) -> tuple[list[int], list[int]]:
    """Token indices taken from the previous frame (F) and from the next frame (G) for L = ``num_tokens``."""
    fold = max(1, num_tokens // div)
    forward = list(range(1, num_tokens, fold))
    backward = list(range(BACKWARD_OFFSET, num_tokens, fold))
    return forward, backward


def shift_tokens(tokens: torch.Tensor, frames: int, forward: list[int], backward: list[int]) -> torch.Tensor:
    """Shift tokens across frames. ``tokens`` is (B·T, L, W), frames contiguous per video.

    End frames keep their own tokens (copy, not zero-fill); CLS (index 0) never moves. Both sets read from the
    unshifted input. Where the sets overlap (only for tiny grids), G is written last and wins.
    """
    total, length, width = tokens.shape
    if total % frames:
        raise ValueError(f"{total} frame tokens cannot be grouped into videos of {frames} frames")
    video = tokens.view(total // frames, frames, length, width)
    shifted = video.clone()
    shifted[:, 1:, forward] = video[:, :-1, forward]
    shifted[:, :-1, backward] = video[:, 1:, backward]
    return shifted.view(total, length, width)


def self_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention from the projection weights alone.

    Written out rather than calling ``attn`` because open_clip's attention module changed signature across
    versions; the parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) did not.
    """
    if isinstance(attn, PackedSelfAttention):  # the CPU inference copy's
        return attn.attend(x)
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.view(batch, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(batch, length, width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def shifted_block_forward(
    block: nn.Module, x: torch.Tensor, frames: int, forward: list[int], backward: list[int]
) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` with token shift on the attention input (q = k = v = shifted)."""
    shifted = shift_tokens(block.ln_1(x), frames, forward, backward)
    x = x + block.ls_1(self_attention(block.attn, shifted))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
