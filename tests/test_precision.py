"""Inference precision: bf16 on the CPU only where it is native, keeps features within cosine 0.999, and is faster."""

from __future__ import annotations

import torch
from tiny_models import random_video, tiny_net

from ts2cli.model.precision import BF16_MIN_COSINE, compare_autocast, cpu_has_native_bf16, inference_dtype


def test_bf16_check_measures_feature_agreement_and_time():
    net = tiny_net(zero_shot=True)
    pixels, mask = random_video(2, frames=4), torch.ones(2, 4, dtype=torch.long)
    cosine, time_ratio = compare_autocast(net, pixels, mask, torch.bfloat16)
    assert 0.9 < cosine <= 1.0 + 1e-6
    assert time_ratio > 0


def test_cpu_precision_follows_the_check():
    net = tiny_net(zero_shot=True)
    pixels, mask = random_video(1, frames=4), torch.ones(1, 4, dtype=torch.long)
    chosen = inference_dtype(net, torch.device("cpu"), pixels, mask)
    if not cpu_has_native_bf16():
        assert chosen is None
    else:
        assert chosen in (None, torch.bfloat16)
        if chosen == torch.bfloat16:
            assert compare_autocast(net, pixels, mask, torch.bfloat16)[0] >= BF16_MIN_COSINE
