"""TS2-Net hyper-parameters (spec §1–§6) and the two behaviours of spec §10.1 ("official" and "fixed")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

Compat = Literal["official", "fixed"]
COMPAT_MODES: tuple[Compat, ...] = get_args(Compat)
TopK = Literal["perturbed", "hard"]
TOPK_RULES: tuple[TopK, ...] = get_args(TopK)
TEMPORAL_POSITIONS = 77
"""Position embeddings of the temporal transformer (CLIP's context length in the reference): frames × tokens per
frame must fit."""


@dataclass(frozen=True)
class TS2Config:
    """Everything that shapes a TS2-Net forward pass, apart from the CLIP backbone's own weights.

    ``compat`` picks between reproducing the reference implementation ("official") and the corrected behaviour
    ("fixed"); see docs/model.md for the exact list of differences.
    """

    backbone: str = "ViT-B-32"
    """open_clip model name; ``-quickgelu`` variants are what OpenAI weights need."""
    backbone_cfg: dict[str, Any] | None = None
    """An explicit open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) instead of a built-in name."""
    quick_gelu: bool = True
    frames: int = 12
    """T, the number of frames sampled per video (``max_frames``)."""
    words: int = 32
    """Text context length (``max_words``): SOT + at most 30 tokens + EOT."""
    top_k: int = 3
    """Patches kept per frame besides CLS (the paper's K = 4 counts CLS)."""
    shift_blocks: int = 2
    """Token shift is applied to the last ``shift_blocks`` ViT blocks."""
    shift_div: int = 7
    temporal_layers: int = 4
    temporal_eps: float = 1e-12
    topk_samples: int = 500
    topk_sigma: float = 0.05
    weight_temperature: float = 4.0
    """Frame weights are ``softmax(weight_temperature * normalised cosines)`` (spec §6)."""
    compat: Compat = "fixed"
    zero_shot: bool = True
    """No trained TS2-Net parts: selector and temporal transformer are bypassed (CLIP frame features only)."""
    zero_shot_shift: bool = False
    """Apply token shift in zero-shot mode too (off by default: CLIP was never trained with it)."""
    inference_topk: TopK = "perturbed"
    """How tokens are selected at inference (spec §10.1, quirk 5): the perturbed top-k the model is trained with, or
    the plain ("hard") top-k of the scores. Training always uses the perturbed one."""
    seed: int = 0
    """Seed of the noise of the perturbed top-k."""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """Where the weights came from (training data, epochs, source file); informational only."""

    def __post_init__(self) -> None:
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, not {self.compat!r}")
        if self.inference_topk not in TOPK_RULES:
            raise ValueError(f"inference_topk must be one of {TOPK_RULES}, not {self.inference_topk!r}")

    @property
    def tokens_per_frame(self) -> int:
        """M = CLS + K selected patches."""
        return 1 + self.top_k

    @property
    def max_frames(self) -> int:
        """The most frames the temporal transformer takes: 19 with K = 4 tokens per frame."""
        return TEMPORAL_POSITIONS // self.tokens_per_frame

    @property
    def uses_token_shift(self) -> bool:
        return self.shift_blocks > 0 and (not self.zero_shot or self.zero_shot_shift)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TS2Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TS2 config keys: {', '.join(unknown)}")
        return cls(**data)
