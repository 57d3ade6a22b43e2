"""Text-conditioned frame-weighted similarity (spec §6) and the symmetric InfoNCE loss (spec §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED_WEIGHT = -1e18


def _unit(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    if eps is None:
        return x / x.norm(dim=-1, keepdim=True)
    return F.normalize(x, dim=-1, eps=eps)


def frame_weighted_similarity(
    text: torch.Tensor,
    frames: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 4.0,
    eps: float | None = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every text against every video.

    ``text`` (Bt, D), ``frames`` (Bv, T, D), ``mask`` (Bv, T) → ``scores`` (Bt, Bv) in [-1, 1] and the frame
    weights (Bt, Bv, T) that produced them. A video's score is a softmax-weighted mean of its per-frame cosines,
    the weights being ``softmax(temperature · cos / ‖cos‖)`` over its valid frames. ``eps=None`` reproduces the
    reference exactly, including NaN for a video with no valid frame (spec §10.1, quirk 6).
    """
    cosines = torch.einsum("vfd,td->vft", _unit(frames, eps), _unit(text, eps))
    valid = mask.to(cosines.dtype).unsqueeze(-1)
    masked = cosines * valid
    norm = masked.norm(dim=1, keepdim=True)
    normalised = masked / (norm if eps is None else norm.clamp_min(eps))
    normalised = normalised.masked_fill(valid == 0, MASKED_WEIGHT)
    weights = torch.softmax(temperature * normalised, dim=1)
    scores = (weights * cosines).sum(dim=1)
    return scores.t(), weights.permute(2, 0, 1)


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """½ (cross-entropy over rows + over columns) with the diagonal as the positives (spec §7)."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
