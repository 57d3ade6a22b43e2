"""CLIP ViT returning every projected token per frame, with token shift in the last blocks (spec §3)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import Ts2Error
from .token_shift import shift_index_sets, shifted_block_forward


def check_visual_tower(visual: nn.Module) -> None:
    """TS2-Net needs a plain CLIP ViT: class token, ``ln_post`` on all tokens, a projection matrix."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    missing = [name for name in needed if getattr(visual, name, None) is None]
    if missing or getattr(visual, "attn_pool", None) is not None:
        raise Ts2Error("TS2-Net needs a CLIP ViT backbone with a class token (e.g. ViT-B-32 or ViT-B-16).")
    if not getattr(visual.transformer, "batch_first", False):
        raise Ts2Error("This open_clip version runs ViT blocks sequence-first; ts2 needs open_clip >= 2.26.")


def encode_frame_tokens(
    visual: nn.Module, pixels: torch.Tensor, *, frames: int, shift_blocks: int, shift_div: int = 7
) -> torch.Tensor:
    """(B·T, 3, H, W) normalised pixels → (B·T, L, D) tokens after ``ln_post`` and ``proj``; CLS at index 0."""
    x = visual.conv1(pixels)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    first_shifted = len(blocks) - shift_blocks
    forward, backward = shift_index_sets(x.shape[1], shift_div)
    for index, block in enumerate(blocks):
        if index >= first_shifted:
            x = shifted_block_forward(block, x, frames, forward, backward)
        else:
            x = block(x)
    return visual.ln_post(x) @ visual.proj
