"""The CPU bf16 inference copy's ViT and temporal transformer on prepacked oneDNN products compute what the unpacked
layers compute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_video, tiny_net
from torch import nn

from ts2cli.model import onednn
from ts2cli.model.precision import cast_copy

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN prepacked linear")


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # Both in bf16: they may round the bias addition differently, by an ulp of the output.
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", [None, nn.SiLU(), nn.GELU()])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (1, 48)])
def test_packed_linear_computes_the_linear_layer_and_its_activation(activation, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80).bfloat16()
    x = torch.randn(*shape).bfloat16()
    packed = onednn.PackedLinear(linear.weight, linear.bias, activation)
    with torch.inference_mode():
        expected = linear(x) if activation is None else activation(linear(x))
        got = packed(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    _close(got, expected)


def test_packed_linear_without_bias():
    linear = nn.Linear(32, 16, bias=False).bfloat16()
    x = torch.randn(4, 32).bfloat16()
    with torch.inference_mode():
        _close(onednn.PackedLinear(linear.weight, None)(x), linear(x))


def test_patch_embedding_equals_the_strided_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, kernel_size=8, stride=8, bias=False).bfloat16()
    pixels = torch.randn(5, 3, 36, 40).bfloat16()  # 36 rows: a remainder the convolution leaves out
    assert onednn.packs(conv) and not onednn.packs(nn.Conv2d(3, 64, kernel_size=8, stride=4))
    with torch.inference_mode():
        got, expected = onednn.PatchEmbedding(conv)(pixels), conv(pixels)
    assert got.shape == expected.shape == (5, 64, 4, 5)
    _close(got, expected)


def test_packed_attention_equals_multihead_attention():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(64, 4, batch_first=True).bfloat16().eval()
    x = torch.randn(6, 17, 64).bfloat16()
    packed = onednn.PackedSelfAttention(attention)
    with torch.inference_mode():
        expected, _ = attention(x, x, x, need_weights=False)
        got, _ = packed(x, x, x, need_weights=False)
    _close(got, expected)
    with pytest.raises(ValueError, match="self-attention only"):
        packed(x, x.clone(), x)


@pytest.mark.parametrize("per_head", [True, False])
def test_packed_attention_takes_the_temporal_mask_and_rounds_fp32_input(per_head):
    torch.manual_seed(0)
    batch, length, heads = 3, 10, 4
    attention = nn.MultiheadAttention(64, heads, batch_first=True).eval()  # fp32, as the temporal blocks'
    x = torch.randn(batch, length, 64)
    masked = torch.zeros(batch, length)
    masked[0, 6:] = masked[2, 1:] = -1e6  # padded frames' tokens, as TemporalTransformer masks them
    bias = masked[:, None, :].expand(batch, length, length).repeat_interleave(heads, dim=0)
    if not per_head:
        bias = torch.triu(torch.full((length, length), -1e6), 1)
    packed = onednn.PackedSelfAttention(attention, torch.bfloat16)
    with torch.inference_mode():
        expected, _ = attention(x, x, x, need_weights=False, attn_mask=bias)
        got, _ = packed(x, x, x, need_weights=False, attn_mask=bias)
    assert got.dtype == torch.bfloat16 and packed.qkv.dtype == torch.bfloat16
    _close(got, expected)
    with pytest.raises(ValueError, match="additive float mask"):
        packed(x, x, x, attn_mask=bias < 0)


def test_only_plain_batch_first_attention_is_packed():
    plain = nn.MultiheadAttention(64, 4, batch_first=True)
    assert onednn._plain_self_attention(plain)
    assert not onednn._plain_self_attention(nn.MultiheadAttention(64, 4))  # sequence-first
    assert not onednn._plain_self_attention(nn.MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True))
    assert not onednn._plain_self_attention(nn.MultiheadAttention(64, 4, batch_first=True, kdim=32, vdim=32))


@pytest.mark.parametrize("zero_shot", [True, False])
def test_cpu_bf16_copy_is_packed_and_keeps_the_features(zero_shot):
    net = tiny_net(zero_shot=zero_shot, frames=4)
    pixels, mask = random_video(2, frames=4), torch.ones(2, 4, dtype=torch.long)
    reduced = cast_copy(net, torch.bfloat16)
    visual = reduced.clip.visual
    assert isinstance(visual.conv1, onednn.PatchEmbedding)
    assert all(isinstance(block.attn, onednn.PackedSelfAttention) for block in visual.transformer.resblocks)
    assert all(isinstance(block.mlp.c_fc, onednn.PackedLinear) for block in visual.transformer.resblocks)
    if not zero_shot:  # the temporal products too; its layer norms stay fp32
        assert all(isinstance(block.attn, onednn.PackedSelfAttention) for block in reduced.temporal.blocks)
        assert all(block.mlp.c_proj.dtype == torch.bfloat16 for block in reduced.temporal.blocks)
        assert {p.dtype for p in reduced.temporal.blocks[0].ln_1.parameters()} == {torch.float32}
    assert isinstance(net.clip.visual.conv1, nn.Conv2d)  # the original is untouched
    unpacked = copy.deepcopy(net)
    unpacked.clip.to(torch.bfloat16)
    with torch.inference_mode():
        expected, _ = unpacked.encode_video(pixels.bfloat16(), mask)
        got, _ = reduced.encode_video(pixels.bfloat16(), mask)
    assert F.cosine_similarity(got.float(), expected.float(), dim=-1).min() > 0.999


def test_pack_vision_tower_counts_what_it_replaced():
    visual = copy.deepcopy(tiny_net(zero_shot=True).clip.visual).bfloat16()
    blocks = len(visual.transformer.resblocks)
    assert onednn.pack_vision_tower(visual) == 1 + 4 * blocks  # patch embedding; QKV, output, MLP up and down
