"""Inference precision: bf16 weights on the CPU only where bf16 is native, keeps features within cosine 0.999, and is
faster; the text tower runs only up to the last EOT token."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import TINY_CLIP, random_video, tiny_net

from ts2cli.model import ModelOptions, load_model
from ts2cli.model.precision import (
    BF16_MIN_COSINE,
    cast_copy,
    compare_reduced,
    cpu_has_native_bf16,
    cpu_reduced_net,
    fold_quick_gelu,
)
from ts2cli.model.preprocess import tokenize


def test_bf16_check_measures_feature_agreement_and_time():
    net = tiny_net(frames=4)
    pixels, mask = random_video(2, frames=4), torch.ones(2, 4, dtype=torch.long)
    reduced = cast_copy(net, torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.float32}  # the original is untouched
    assert {p.dtype for p in reduced.clip.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reduced.selector.parameters()} == {torch.float32}  # selection stays fp32
    comparison = compare_reduced(net, reduced, pixels, mask)
    assert 0.9 < comparison.cosine <= 1.0 + 1e-6
    assert comparison.time_ratio > 0


def test_the_bf16_check_leaves_the_selection_noise_of_its_batch_alone():
    """Official mode draws selection noise from a running generator: the check's two forward passes must not use
    up the noise of the batch it runs on (each network sees that noise), or a run's features would depend on
    whether the check ran."""
    net = tiny_net(compat="official")
    pixels, mask = random_video(2), torch.ones(2, 12, dtype=torch.long)
    with torch.inference_mode():
        expected, _ = net.encode_video(pixels, mask)
    net.selector.reseed()
    reduced = cast_copy(net, torch.bfloat16)
    compare_reduced(net, reduced, pixels, mask)
    with torch.inference_mode():
        after_check, _ = net.encode_video(pixels, mask)
    assert torch.equal(after_check, expected)
    fp32_copy = cast_copy(net, torch.float32)
    net.selector.reseed()
    compare_reduced(net, fp32_copy, pixels, mask)
    with torch.inference_mode():
        from_the_copy, _ = fp32_copy.encode_video(pixels, mask)
    torch.testing.assert_close(from_the_copy, expected, rtol=1e-4, atol=1e-5)  # the copy goes on from there too


def test_folding_quick_gelu_into_silu_keeps_the_features():
    net = tiny_net(frames=4)
    pixels, mask = random_video(2, frames=4), torch.ones(2, 4, dtype=torch.long)
    folded = copy.deepcopy(net)
    clip = net.clip
    layers = len(clip.visual.transformer.resblocks) + len(clip.transformer.resblocks) + len(net.temporal.blocks)
    assert fold_quick_gelu(folded) == layers
    assert not any(type(m).__name__ == "QuickGELU" for m in folded.modules())
    with torch.inference_mode():
        expected, _ = net.encode_video(pixels, mask)
        got, _ = folded.encode_video(pixels, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # fp32 rounding of the scaled weights
    assert any(type(m).__name__ == "QuickGELU" for m in net.clip.modules())  # the original is untouched
    reduced = cast_copy(net, torch.bfloat16)
    for mlp in (m for m in reduced.modules() if hasattr(m, "gelu")):  # temporal too
        # SiLU, or fused into the packed product before it (the CPU copy's ViT)
        assert isinstance(mlp.gelu, torch.nn.SiLU) or getattr(mlp.c_fc, "post_op", None) == "swish"


def test_cpu_precision_follows_the_check():
    net = tiny_net(zero_shot=True)
    pixels, mask = random_video(1, frames=4), torch.ones(1, 4, dtype=torch.long)
    reduced = cpu_reduced_net(net, pixels, mask)
    if not cpu_has_native_bf16():
        assert reduced is None
    elif reduced is not None:
        assert next(reduced.clip.parameters()).dtype == torch.bfloat16
        assert compare_reduced(net, reduced, pixels, mask).cosine >= BF16_MIN_COSINE


def test_loaded_model_runs_videos_in_the_chosen_precision():
    loaded = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, frames=4, device="cpu"))
    fp32 = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, frames=4, device="cpu"))
    fp32.precision_known = True
    videos = [np.random.default_rng(i).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for i in range(2)]
    features, mask = loaded.encode_videos(videos)
    reference, _ = fp32.encode_videos(videos)
    assert loaded.precision_known and features.dtype == np.float32 and mask.all()
    weights = next(loaded.net.clip.parameters()).dtype
    assert weights == (loaded.dtype or torch.float32)
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    unit_ref = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    assert (unit * unit_ref).sum(-1).min() >= (BF16_MIN_COSINE if loaded.dtype else 1 - 1e-6)


@pytest.mark.parametrize("texts", [["a dog"], ["a dog", "a much longer description of a dog catching a frisbee"]])
def test_text_runs_only_up_to_the_last_eot_with_the_same_result(texts):
    net = tiny_net(zero_shot=True).eval()
    ids = tokenize(texts, 32).ids
    with torch.inference_mode():
        short = net.encode_text(ids)
        clip = net.clip  # the full 32 positions, as before truncation
        x = clip.token_embedding(ids) + clip.positional_embedding[:32]
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:32, :32]))
        full = x[torch.arange(len(texts)), ids.argmax(-1)] @ clip.text_projection
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_text_only_model_is_bf16_on_a_native_bf16_cpu_and_agrees_with_fp32():
    options = ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, frames=4, device="cpu")
    text = load_model(options, text_only=True)
    text.reduce_text_precision()
    full = load_model(options)
    assert text.dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    queries = ["a dog catches a frisbee", "two people dance in a kitchen"]
    low, _ = text.encode_texts(queries)
    reference, _ = full.encode_texts(queries)
    cosine = (low * reference).sum(-1) / np.linalg.norm(low, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert low.dtype == np.float32 and cosine.min() >= BF16_MIN_COSINE


def test_float32_precision_is_kept_whatever_the_cpu():
    options = ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, frames=4, device="cpu", precision="float32")
    loaded = load_model(options)
    net = loaded.net
    videos = [np.random.default_rng(i).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for i in range(2)]
    loaded.encode_videos(videos)
    assert loaded.dtype is None and loaded.net is net
    assert {p.dtype for p in net.parameters()} == {torch.float32}


def test_cli_rejects_an_unknown_precision():
    from typer.testing import CliRunner

    from ts2cli.cli import app

    result = CliRunner().invoke(app, ["model", "--precision", "half", "--pretrained", "none"])
    assert result.exit_code == 2 and "'half' is not one of 'auto', 'float32'" in result.output
