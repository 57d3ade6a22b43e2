"""Inference precision: bf16 on the CPU only where it is native and keeps features within cosine 0.999."""

from __future__ import annotations

import torch
from tiny_models import random_video, tiny_net

from ts2cli.model.precision import BF16_MIN_COSINE, autocast_cosine, cpu_has_native_bf16, inference_dtype


def test_bf16_check_measures_feature_agreement():
    net = tiny_net(zero_shot=True)
    pixels, mask = random_video(2, frames=4), torch.ones(2, 4, dtype=torch.long)
    cosine = autocast_cosine(net, pixels, mask, torch.bfloat16)
    assert 0.9 < cosine <= 1.0 + 1e-6


def test_cpu_precision_follows_the_check():
    net = tiny_net(zero_shot=True)
    pixels, mask = random_video(1, frames=4), torch.ones(1, 4, dtype=torch.long)
    chosen = inference_dtype(net, torch.device("cpu"), pixels, mask)
    if not cpu_has_native_bf16():
        assert chosen is None
    else:
        passes = autocast_cosine(net, pixels, mask, torch.bfloat16) >= BF16_MIN_COSINE
        assert chosen == (torch.bfloat16 if passes else None)
