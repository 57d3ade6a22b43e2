"""CLIP's text tower on its own, for start-up speed.

A text query needs only this tower. Importing open_clip to build it costs more than a second (its package imports
torchvision and, through it, torch's compiler stack), which matters for a command that should answer at once. The
module and parameter names here equal open_clip's, so the same state dict keys load into either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .temporal import QuickGELU

# Text options this tower implements; configs that set any other differ from OpenAI CLIP and use open_clip.
SUPPORTED_DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4.0,
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "hf_model_name": None,
}


def supports(cfg: Mapping[str, Any]) -> bool:
    text = cfg.get("text_cfg", {})
    plain = all(text.get(key, default) == default for key, default in SUPPORTED_DEFAULTS.items())
    return plain and not cfg.get("init_logit_bias") and not cfg.get("custom_text")


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=activation(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(TextBlock(width, heads, activation) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class TextTower(nn.Module):
    """The attributes of an open_clip ``CLIP`` that text encoding uses; ``visual`` is absent (None)."""

    visual = None

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        text = cfg["text_cfg"]
        width, context = text.get("width", 512), text.get("context_length", 77)
        activation = QuickGELU if cfg.get("quick_gelu") else nn.GELU
        vocab = text.get("vocab_size", 49408)
        # An explicit weight skips the random init (normal_ on meta has the same import cost as triu below).
        self.token_embedding = nn.Embedding(vocab, width, _weight=torch.empty(vocab, width, device="meta"))
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = TextTransformer(width, text.get("layers", 12), text.get("heads", 8), activation)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, cfg["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.empty(()))
        # Built on the CPU even under a meta-device context: triu on meta goes through torch's Python
        # decompositions, whose first use imports the compiler stack (seconds).
        causal = torch.full((context, context), float("-inf"), device="cpu").triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)


def build_text_tower(cfg: Mapping[str, Any]) -> TextTower:
    with torch.device("meta"):
        return TextTower(cfg)
