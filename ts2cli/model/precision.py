"""Choice of inference precision: fp16 autocast on CUDA; on CPU bf16 only where it is native and accurate."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_MIN_COSINE = 0.999


@cache
def cpu_has_native_bf16() -> bool:
    """bf16 matrix units (AVX512-BF16 or AMX); without them bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch.inference_mode()
def autocast_cosine(net: torch.nn.Module, pixels: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> float:
    """Lowest cosine, over frames, between per-frame features computed in fp32 and under ``dtype`` autocast."""
    reference, _ = net.encode_video(pixels, mask)
    with torch.autocast(pixels.device.type, dtype=dtype):
        reduced, _ = net.encode_video(pixels, mask)
    return F.cosine_similarity(reference.float(), reduced.float(), dim=-1).min().item()


def inference_dtype(
    net: torch.nn.Module, device: torch.device, pixels: torch.Tensor, mask: torch.Tensor
) -> torch.dtype | None:
    if device.type == "cuda":
        return torch.float16
    if cpu_has_native_bf16() and autocast_cosine(net, pixels, mask, torch.bfloat16) >= BF16_MIN_COSINE:
        return torch.bfloat16
    return None
