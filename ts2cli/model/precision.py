"""Choice of inference precision: fp16 autocast on CUDA; on the CPU, bf16 weights where bf16 is native, accurate
and faster.

On the CPU the network's weights are cast to bf16 once, rather than run under bf16 autocast: autocast casts
every weight again at each forward and keeps several ops in fp32, and on the AMX test machine it ran ViT-B-32
slower than fp32 (12.7 vs 13.8 frames/s, 48-frame batch, 2 threads), while bf16 weights ran it at 40.5 frames/s
with features at cosine 0.99994 to fp32 (benchmarks/index_bench.py measures both).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .temporal import QuickGELU
from .ts2net import TS2Net

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


def cast_copy(net: TS2Net, dtype: torch.dtype) -> TS2Net:
    """A copy of ``net`` for inference whose CLIP backbone is ``dtype``, with QuickGELU folded into SiLU (the
    original is left as it is). Token selection and the similarity stay in fp32: they are cheap, and the top-k
    choice should not hinge on bf16 rounding; so does the temporal transformer, except that a bf16 copy on the
    CPU runs its products, like its ViT, on prepacked bf16 oneDNN products (its residual stream and layer norms
    stay fp32)."""
    reduced = copy.deepcopy(net)
    fold_quick_gelu(reduced)  # before the cast, so that the folded weights are rounded once
    reduced.clip.to(dtype)
    visual = getattr(reduced.clip, "visual", None)
    on_cpu = all(p.device.type == "cpu" for p in reduced.parameters())
    if visual is not None and dtype == torch.bfloat16 and on_cpu and onednn.available():
        onednn.pack_vision_tower(visual)
        if reduced.temporal is not None:
            onednn.pack_blocks(reduced.temporal.blocks, dtype)
    return reduced


QUICK_GELU_SCALE = 1.702


def fold_quick_gelu(module: nn.Module) -> int:
    """Rewrite each ``c_fc → QuickGELU → c_proj`` MLP inside ``module`` as ``1.702·c_fc → SiLU → c_proj/1.702``
    and return how many were rewritten.

    The same function, since y·σ(1.702y) = SiLU(1.702y) / 1.702, but one fused kernel instead of three passes
    over the MLP's widest activations, which took 19% of a profiled bf16 ViT-B-32 forward on the CPU
    (docs/benchmarks.md, Indexing). Only for inference copies: the weights no longer match a checkpoint's.
    """
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU  # the video towers' (imported by then)

    folded = 0
    for mlp in module.modules():
        if not isinstance(getattr(mlp, "gelu", None), QuickGELU | OpenClipQuickGELU):
            continue
        fc, proj = mlp.get_submodule("c_fc"), mlp.get_submodule("c_proj")
        assert isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear), "not an open_clip MLP"
        with torch.no_grad():
            fc.weight.mul_(QUICK_GELU_SCALE)
            if fc.bias is not None:
                fc.bias.mul_(QUICK_GELU_SCALE)
            proj.weight.div_(QUICK_GELU_SCALE)
        mlp.gelu = nn.SiLU()
        folded += 1
    return folded


@dataclass(frozen=True)
class Comparison:
    cosine: float
    """Lowest cosine, over frames, between the per-frame features of the two networks."""
    time_ratio: float
    """Forward time of the reduced network as a fraction of the fp32 one's."""

    @property
    def acceptable(self) -> bool:
        return self.cosine >= BF16_MIN_COSINE and self.time_ratio < BF16_MAX_TIME_RATIO


@torch.inference_mode()
def compare_reduced(net: TS2Net, reduced: TS2Net, pixels: torch.Tensor, mask: torch.Tensor) -> Comparison:
    """One forward of each network on the same batch; ``reduced`` gets the pixels in its own dtype.

    Both select tokens with the same noise, and leave the running noise where it was: the check must not change the
    features of the batch it runs on, nor those of the batches after it."""
    dtype = next(reduced.clip.parameters()).dtype
    noise = net.selector.noise_state() if net.selector is not None else None
    start = time.perf_counter()
    reference, _ = net.encode_video(pixels, mask)
    full = time.perf_counter() - start
    for copy_ in (net, reduced):
        if noise is not None and copy_.selector is not None:
            copy_.selector.restore_noise(noise)
    start = time.perf_counter()
    low, _ = reduced.encode_video(pixels.to(dtype), mask)
    taken = time.perf_counter() - start
    if noise is not None and reduced.selector is not None:
        reduced.selector.restore_noise(noise)
    cosine = F.cosine_similarity(reference.float(), low.float(), dim=-1).min().item()
    return Comparison(cosine, taken / max(full, 1e-9))


def cpu_reduced_net(net: TS2Net, pixels: torch.Tensor, mask: torch.Tensor) -> TS2Net | None:
    """A bf16 copy of ``net`` if it passes the check on this real batch, else None (stay in fp32)."""
    if not cpu_has_native_bf16():
        return None
    reduced = cast_copy(net, torch.bfloat16)
    return reduced if compare_reduced(net, reduced, pixels, mask).acceptable else None
