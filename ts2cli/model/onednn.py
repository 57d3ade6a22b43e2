"""The ViT and the temporal transformer of the CPU's bf16 inference copy on prepacked oneDNN matrix products.

``F.linear`` in bf16 on the CPU reorders its weight into oneDNN's blocked layout at every call and adds the bias
in a pass of its own; the MLP's activation is a third pass over its widest tensor. Here each weight is reordered
once, when the inference copy is made, and bias and activation are fused into the product
(``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` emits for frozen CPU models, without its minute of
compilation). The patch embedding, a convolution whose stride equals its kernel, becomes one such product over the
cut-out patches. On the test machine a bf16 ViT-B-32 forward on one thread (as each of the indexer's model
workers runs it) took 10-13 % less time, in paired runs of 48-frame batches (docs/benchmarks.md, Indexing).
Attention stays on ``F.scaled_dot_product_attention``: at 50 tokens its fused CPU kernel beat the unfused
products and softmax, in bf16 and in fp32.

The temporal transformer's products get the same treatment, their inputs rounded to bf16 on the way in, while its
residual stream and layer norms (eps 1e-12) stay fp32: in fp32 they took 63-69 ms of a 48-frame ViT-B-32 TS2-Net
forward on one thread, 15-22 ms packed.

These are private torch operators: ``available`` checks they exist and agree with ``F.linear`` before anything
is rewritten, and the precision check (``compare_reduced``) then judges the whole copy against fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

_FUSED_ACTIVATIONS = {nn.SiLU: ("swish", ""), nn.GELU: ("gelu", "none")}
"""Module → (oneDNN post-op, its algorithm). Exact GELU only: the tanh approximation has another algorithm name."""


@cache
def available() -> bool:
    """Whether this torch has oneDNN's prepacked linear operators and they compute ``F.linear`` in bf16."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator).bfloat16() for shape in ((5, 32), (16, 32), (16,)))
    try:
        with torch.inference_mode():
            got = ops._linear_pointwise(x, ops._reorder_linear_weight(weight), bias, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    expected = F.linear(x.float(), weight.float(), bias.float())
    return got.shape == expected.shape and torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2)


class PackedLinear(nn.Module):
    """``activation(linear(x))`` with the weight in oneDNN's layout, computed in ``dtype`` (default: the weight's;
    an input in another dtype is rounded to it, and the output stays in it); inference only (no gradients)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: nn.Module | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype or weight.dtype
        # A plain attribute, not a buffer: an opaque oneDNN tensor has no place in a state dict.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.dtype), requires_grad=False)
        self.post_op, self.algorithm = _FUSED_ACTIVATIONS[type(activation)] if activation else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, self.post_op, [], self.algorithm)
        return y.view(*x.shape[:-1], self.out_features)


class PackedSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` for self-attention (a ViT's, or the temporal transformer's with its additive mask),
    on packed projections."""

    def __init__(self, attention: nn.MultiheadAttention, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.heads = attention.num_heads
        self.qkv = PackedLinear(attention.in_proj_weight, attention.in_proj_bias, dtype=dtype)
        self.out = PackedLinear(attention.out_proj.weight, attention.out_proj.bias, dtype=dtype)

    def attend(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, W) → (B, L, W); ``bias``: an additive float mask, (L, L) or (B·heads, L, L) as
        ``nn.MultiheadAttention`` takes it."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = (bias if bias.dim() == 2 else bias.reshape(batch, self.heads, length, length)).to(qkv.dtype)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """The call open_clip's ``ResidualAttentionBlock`` and the temporal blocks make."""
        if key is not query or value is not query or need_weights:
            raise ValueError("PackedSelfAttention does self-attention only")
        if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.dim() not in (2, 3)):
            raise ValueError("PackedSelfAttention takes an additive float mask only")
        return self.attend(query, attn_mask), None


class PatchEmbedding(nn.Module):
    """The ViT's ``conv1`` (kernel = stride = patch size, no padding) as a packed product over cut-out patches."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.linear = PackedLinear(conv.weight.flatten(1), conv.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, width, H/patch, W/patch), as the convolution returns it."""
        count, channels, height, width = pixels.shape
        rows, columns, patch = height // self.patch, width // self.patch, self.patch
        pixels = pixels[:, :, : rows * patch, : columns * patch]  # the convolution leaves a remainder out too
        patches = pixels.reshape(count, channels, rows, patch, columns, patch).permute(0, 2, 4, 1, 3, 5)
        tokens = self.linear(patches.reshape(count, rows, columns, channels * patch * patch))
        return tokens.permute(0, 3, 1, 2)


def packs(conv: nn.Module) -> bool:
    """Whether ``conv`` is a patch embedding ``PatchEmbedding`` reproduces."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == conv.stride
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _plain_self_attention(attention: nn.Module) -> bool:
    """Whether ``attention`` is what ``PackedSelfAttention`` reproduces: batch-first, one packed QKV projection,
    no extra key/value biases or zero attention."""
    return (
        isinstance(attention, nn.MultiheadAttention)
        and attention.batch_first
        and attention.in_proj_weight is not None
        and attention.bias_k is None
        and not attention.add_zero_attn
    )


def pack_vision_tower(visual: nn.Module) -> int:
    """Replace the patch embedding, attention and MLP layers of an open_clip ViT by packed ones, in place (for an
    inference copy on the CPU); returns how many layers were replaced."""
    replaced = 0
    if packs(visual.conv1):
        visual.conv1 = PatchEmbedding(visual.conv1)
        replaced += 1
    return replaced + pack_blocks(visual.transformer.resblocks)


def pack_blocks(blocks: Iterable[nn.Module], dtype: torch.dtype | None = None) -> int:
    """Replace the attention and MLP layers of residual attention blocks (open_clip's, or the temporal
    transformer's: the same layer names) by packed ones in ``dtype`` (default: the weights' own), in place;
    returns how many layers were replaced."""
    replaced = 0
    for block in blocks:
        if _plain_self_attention(block.attn):
            block.attn = PackedSelfAttention(block.attn, dtype)
            replaced += 2
        mlp = block.mlp
        fc, activation, proj = (getattr(mlp, name, None) for name in ("c_fc", "gelu", "c_proj"))
        if not (isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)):
            continue
        if type(activation) in _FUSED_ACTIVATIONS and getattr(activation, "approximate", "none") == "none":
            mlp.c_fc, mlp.gelu = PackedLinear(fc.weight, fc.bias, activation, dtype), nn.Identity()
        else:
            mlp.c_fc = PackedLinear(fc.weight, fc.bias, dtype=dtype)
        mlp.c_proj = PackedLinear(proj.weight, proj.bias, dtype=dtype)
        replaced += 2
    return replaced
