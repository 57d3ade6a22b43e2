"""TS2-Net: CLIP text tower, token-shifted ViT, token selection, temporal transformer, frame-weighted similarity."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TS2Config
from .selection import TokenSelector, init_linear_weights
from .similarity import frame_weighted_similarity
from .temporal import TemporalTransformer
from .visual import check_visual_tower, encode_frame_tokens

MAX_LOGIT_SCALE = math.log(100.0)


class TS2Net(nn.Module):
    """The whole model. In zero-shot mode (no trained TS2-Net weights) the selector and the temporal transformer
    do not exist and a video's per-frame features are CLIP's frame embeddings. A ``text_only`` model holds just
    what encodes queries (``clip`` may then be a bare text tower)."""

    def __init__(self, clip: nn.Module, config: TS2Config, *, text_only: bool = False) -> None:
        super().__init__()
        if not text_only:
            check_visual_tower(clip.visual)
        self.config = config
        self.clip = clip
        dim = self.embed_dim
        self.selector: TokenSelector | None = None
        self.temporal: TemporalTransformer | None = None
        if not config.zero_shot and not text_only:
            self.selector = TokenSelector(dim, config.top_k, config.topk_samples, config.topk_sigma, config.seed)
            self.temporal = TemporalTransformer(dim, config.temporal_layers, config.temporal_eps)

    @property
    def embed_dim(self) -> int:
        projection = self.clip.text_projection
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, tuple) else size

    @property
    def eps(self) -> float | None:
        return None if self.config.compat == "official" else 1e-12

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, words) token ids → (B, D) features at the EOT token (spec §2).

        Under the causal mask a position sees only those before it, so the padding after the last EOT changes
        nothing: only the positions up to it are run (the result equals padding to 77, at a fraction of the cost
        for a short query).
        """
        clip = self.clip
        eot = ids.argmax(dim=-1)
        causal = clip.attn_mask
        length = int(eot.max()) + 1 if causal is not None else ids.shape[1]
        ids = ids[:, :length]
        x = clip.token_embedding(ids) + clip.positional_embedding[:length].to(clip.token_embedding.weight.dtype)
        mask = causal[:length, :length].to(x.dtype) if causal is not None else None
        x = clip.transformer(x, attn_mask=mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = clip.text_projection
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def encode_video(self, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, H, W) frames and (B, T) mask → (B, T, D) per-frame features (fp32) and their (B, T) mask."""
        batch, frames = pixels.shape[:2]
        config = self.config
        if config.compat == "official" and frames != config.frames:
            raise ValueError(f"official mode needs exactly {config.frames} frames per video, got {frames}")
        # Official mode groups tokens by the constructor's T, as the reference does (spec §10.1, quirk 3).
        shift_frames = config.frames if config.compat == "official" else frames
        tokens = encode_frame_tokens(
            self.clip.visual,
            pixels.flatten(0, 1),
            frames=shift_frames,
            shift_blocks=config.shift_blocks if config.uses_token_shift else 0,
            shift_div=config.shift_div,
        )
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            tokens = tokens.float()
            if self.selector is None or self.temporal is None:
                return tokens[:, 0].reshape(batch, frames, -1), mask
            hard = config.inference_topk == "hard" and not self.training
            # Corrected inference draws the same noise for every video; the reference's goes on drawing.
            per_video = frames if config.compat == "fixed" and not self.training else None
            selected = self.selector(tokens, hard=hard, frames_per_video=per_video)
            selected = selected.reshape(batch, frames * config.tokens_per_frame, -1)
            return self.temporal(selected, mask, tokens_per_frame=config.tokens_per_frame, compat=config.compat)

    def similarity(
        self, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (Bt, Bv) in [-1, 1] and frame weights (Bt, Bv, T); see ``frame_weighted_similarity``."""
        return frame_weighted_similarity(
            text.float(), frames.float(), mask, temperature=self.config.weight_temperature, eps=self.eps
        )

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training logits (texts × videos), scaled by CLIP's learned temperature."""
        text = self.encode_text(ids)
        frames, frame_mask = self.encode_video(pixels, mask)
        scores, _ = self.similarity(text, frames, frame_mask)
        return self.clip.logit_scale.exp() * scores

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.clip.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def init_from_clip(self) -> None:
        """Initialise the new parts as the reference does before training (spec §9): selector Linear weights
        ~ N(0, 0.02²); frame positions and temporal blocks copied from CLIP's text positions and first text blocks
        (only possible when the text width equals the joint embedding width, as in ViT-B)."""
        if self.selector is None or self.temporal is None:
            raise ValueError("a zero-shot model has no TS2-Net parts to initialise")
        self.selector.apply(init_linear_weights)
        text_positions = self.clip.positional_embedding
        if text_positions.shape[1] != self.embed_dim:
            return
        rows = min(text_positions.shape[0], self.temporal.position.num_embeddings)
        self.temporal.position.weight[:rows] = text_positions[:rows]
        text_blocks = self.clip.transformer.resblocks
        for index, block in enumerate(self.temporal.blocks):
            if index < len(text_blocks) and block.attn.num_heads == text_blocks[index].attn.num_heads:
                block.load_state_dict(text_blocks[index].state_dict())

    def drop_video_parts(self) -> None:
        """Free the visual tower and TS2 parts when only text queries are needed (fast search start-up)."""
        if getattr(self.clip, "visual", None) is not None:
            self.clip.visual = None
        self.selector = None
        self.temporal = None
