"""Tiny, randomly initialised open_clip configs built in the tests: nothing is downloaded."""

from __future__ import annotations

import dataclasses

import torch

from ts2cli.model import TS2Config, TS2Net
from ts2cli.model.backbone import build_clip

# 32×32 images in 8×8 patches: L = 17 tokens per frame. Text keeps the real vocabulary (the BPE tokenizer's).
TINY_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def tiny_config(**changes) -> TS2Config:
    base = TS2Config(backbone="tiny", backbone_cfg=TINY_CLIP, zero_shot=False, topk_samples=50)
    return dataclasses.replace(base, **changes)


def tiny_net(seed: int = 0, spread_scores: bool = True, **changes) -> TS2Net:
    torch.manual_seed(seed)
    config = tiny_config(**changes)
    net = TS2Net(build_clip(TINY_CLIP, initialise=True), config)
    if not config.zero_shot:
        net.init_from_clip()
    if not config.zero_shot and spread_scores:
        # Spread the predictor's scores so that top-k choices are not decided by float noise.
        for param in net.selector.parameters():
            param.data.mul_(20.0)
    return net.eval()


def random_video(batch: int, frames: int = 12, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, size, size, generator=generator)
