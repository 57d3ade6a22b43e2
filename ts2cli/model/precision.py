"""Choice of inference precision: fp16 autocast on CUDA; on CPU bf16 only where it is native, accurate and faster."""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_MIN_COSINE = 0.999
BF16_MAX_TIME_RATIO = 0.9


@cache
def cpu_has_native_bf16() -> bool:
    """bf16 matrix units (AVX512-BF16 or AMX); without them bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch.inference_mode()
def compare_autocast(
    net: torch.nn.Module, pixels: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> tuple[float, float]:
    """Lowest cosine, over frames, between per-frame features in fp32 and under ``dtype`` autocast, and the time
    under ``dtype`` as a fraction of the fp32 time (one forward each, on the same batch)."""
    start = time.perf_counter()
    reference, _ = net.encode_video(pixels, mask)
    full = time.perf_counter() - start
    start = time.perf_counter()
    with torch.autocast(pixels.device.type, dtype=dtype):
        reduced, _ = net.encode_video(pixels, mask)
    low = time.perf_counter() - start
    cosine = F.cosine_similarity(reference.float(), reduced.float(), dim=-1).min().item()
    return cosine, low / max(full, 1e-9)


def inference_dtype(
    net: torch.nn.Module, device: torch.device, pixels: torch.Tensor, mask: torch.Tensor
) -> torch.dtype | None:
    if device.type == "cuda":
        return torch.float16
    if not cpu_has_native_bf16():
        return None
    # Accurate is not enough: on the AMX test machine bf16 autocast ran ViT-B-32 at 4.6 frames/s against 6.4 in
    # fp32 (benchmarks/index_bench.py), so bf16 must also prove faster on the real batch.
    cosine, time_ratio = compare_autocast(net, pixels, mask, torch.bfloat16)
    return torch.bfloat16 if cosine >= BF16_MIN_COSINE and time_ratio < BF16_MAX_TIME_RATIO else None
