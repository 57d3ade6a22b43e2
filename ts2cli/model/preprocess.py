"""Model inputs: caption tokens (spec §2) and normalised, padded frame tensors (spec §1.2–§1.3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tokenizer import encode
from .config import Compat

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Tokens:
    ids: torch.Tensor
    """(B, words) token ids: SOT, content, EOT, zero padding."""
    truncated: list[bool]
    """Whether each text lost content tokens to the context length."""


def tokenize(texts: list[str], words: int = 32) -> Tokens:
    """The OpenAI CLIP BPE at ``words`` tokens; longer texts keep their first ``words - 2`` content tokens."""
    encoded = encode(texts, words)
    return Tokens(ids=torch.from_numpy(encoded.ids), truncated=encoded.truncated)


@dataclass(frozen=True)
class PixelNorm:
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


def frames_to_tensor(frames: np.ndarray, norm: PixelNorm = PixelNorm()) -> torch.Tensor:
    """(n, H, W, 3) uint8 RGB frames, already resized and cropped → (n, 3, H, W) float32 normalised."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


def pad_frames(pixels: torch.Tensor, frames: int, compat: Compat) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (n, 3, H, W) to (T, 3, H, W) and return it with its (T,) mask of real frames.

    "official" pads with zeros in normalised space (a mean-colour image), as the reference does; "fixed" repeats
    the last real frame so token shift never pulls tokens from a blank frame into a real one (spec §10.1, quirk 2).
    Videos with more than T frames are cut to T (the sampler never returns more).
    """
    count = min(pixels.shape[0], frames)
    if count == 0:
        raise ValueError("a video needs at least one frame")
    mask = torch.zeros(frames, dtype=torch.long)
    mask[:count] = 1
    if count == frames:
        return pixels[:frames], mask
    if compat == "official":
        filler = pixels.new_zeros((frames - count, *pixels.shape[1:]))
    else:
        filler = pixels[count - 1 : count].expand(frames - count, *pixels.shape[1:])
    return torch.cat([pixels[:count], filler]), mask
