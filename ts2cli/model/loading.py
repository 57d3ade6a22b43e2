"""From the CLI's model options to a ready model on a device: the one place weights are resolved and loaded."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from ..errors import CheckpointError, Ts2Error
from ..model_record import MODEL_SOURCE_KEY, WEIGHTS_DIGEST, implied_topk
from . import text_tower
from .backbone import (
    build_clip,
    load_state,
    looks_like_path,
    model_config,
    pretrained_quick_gelu,
    read_state_dict,
    resolve_pretrained,
)
from .checkpoint import read_checkpoint
from .config import Compat, TopK, TS2Config
from .precision import cast_copy, cpu_has_native_bf16, cpu_reduced_net
from .preprocess import PixelNorm, frames_to_tensor, pad_frames, tokenize
from .ts2net import TS2Net


@contextmanager
def out_of_memory_says(what: str, remedy: str) -> Iterator[None]:
    """Running out of memory in the block (``what`` ran: "embedding a batch of 32 videos on cuda") becomes a
    one-line error that says ``remedy`` ("run again with a smaller --batch-size") instead of a traceback."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:  # alias torch.OutOfMemoryError in torch >= 2.5
        raise Ts2Error(f"Out of memory {what}: {remedy}.") from error
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):  # torch's CPU allocator says so in a plain RuntimeError
            raise
        raise Ts2Error(f"Out of memory {what}: {remedy}.") from error


InferencePrecision = Literal["auto", "float32"]
INFERENCE_PRECISIONS: tuple[InferencePrecision, ...] = get_args(InferencePrecision)


@dataclass(frozen=True)
class ModelOptions:
    """What a user chooses on any command that loads a model."""

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    """open_clip tag or local weights file; None builds random weights (tests and benchmarks only)."""
    checkpoint: Path | None = None
    device: str = "auto"
    compat: Compat | None = None
    """None: a checkpoint's own (what it was trained with), else "fixed"."""
    frames: int | None = None
    """None: a checkpoint's own, else 12."""
    topk: TopK | None = None
    """Token selection at inference; None: a checkpoint's own, else "perturbed" (``TS2Config.inference_topk``)."""
    quick_gelu: bool | None = None
    """None: as the pretrained tag says; True for local files (TS2-Net is built on OpenAI CLIP)."""
    backbone_cfg: dict[str, Any] | None = None
    """An explicit open_clip config instead of ``model`` (tiny test models, custom ViTs)."""
    zero_shot_shift: bool = False
    weights_file: Path | None = None
    """The local file behind the ``pretrained`` tag, when known; spares a lookup in open_clip's registry."""
    precision: InferencePrecision = "auto"
    """"auto": fp16 autocast on CUDA, bf16 weights on CPUs where the first batch shows them accurate and faster;
    "float32": always fp32 (features that do not depend on a timing, for reproducible research runs)."""


def model_source(options: ModelOptions, config: TS2Config, weights_file: Path | None) -> dict[str, Any]:
    """How to load this model again without asking open_clip anything (what ``ts2 search`` does)."""
    checkpoint = str(Path(options.checkpoint).expanduser().resolve()) if options.checkpoint else None
    from_checkpoint = options.checkpoint is not None  # then the command line's model and CLIP weights played no part
    return {
        "model": config.backbone if from_checkpoint else options.model,
        "backbone_cfg": config.backbone_cfg,
        "quick_gelu": config.quick_gelu,
        "pretrained": None if from_checkpoint else options.pretrained,
        "weights_file": str(weights_file.resolve()) if weights_file else None,
        "checkpoint": checkpoint,
        "compat": config.compat,
        "frames": config.frames,
        "topk": config.inference_topk,
    }


def options_from_source(source: dict[str, Any], device: str) -> ModelOptions:
    checkpoint, weights_file = source.get("checkpoint"), source.get("weights_file")
    return ModelOptions(
        model=source["model"],
        backbone_cfg=source.get("backbone_cfg"),
        quick_gelu=source.get("quick_gelu"),
        pretrained=source.get("pretrained"),
        weights_file=Path(weights_file) if weights_file else None,
        checkpoint=Path(checkpoint) if checkpoint else None,
        compat=source.get("compat", "fixed"),
        frames=source.get("frames", 12),
        topk=source.get("topk") or implied_topk(source.get("compat", "fixed")),  # type: ignore[arg-type]
        device=device,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Ts2Error("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto.")
    if name != "cpu" and not name.startswith("cuda"):
        raise Ts2Error(f"Unknown --device '{name}'; use auto, cpu or cuda.")
    return torch.device(name)


@dataclass
class LoadedModel:
    net: TS2Net
    config: TS2Config
    device: torch.device
    identity: dict[str, Any]
    """What the library records to refuse mixing embeddings of different models."""
    norm: PixelNorm = field(default_factory=PixelNorm)
    dtype: torch.dtype | None = None
    """Reduced precision in use, None for fp32: fp16 autocast on CUDA; on the CPU, bf16 weights (``net.clip`` is
    cast) where bf16 is native and proved accurate and faster (see ``precision``)."""
    precision_known: bool = False
    """False until the first video batch has settled ``dtype`` (see ``choose_precision``)."""
    precision: InferencePrecision = "auto"
    """What was asked for (``ModelOptions.precision``); ``dtype`` is what it came to."""

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def words(self) -> int:
        """Token positions a text is cut or padded to."""
        return self.config.words

    @property
    def draws_noise(self) -> bool:
        """Official-mode TS2-Net selects tokens with seeded noise at inference (spec §10.1, quirk 5): a video's
        features then depend on the noise drawn before it, so batches must run in a fixed order."""
        config = self.config
        return not config.zero_shot and config.compat == "official" and config.inference_topk == "perturbed"

    @property
    def dtype_name(self) -> str:
        """What the model computes in, as the ``--json`` documents say it: float32, bfloat16 or float16."""
        return str(self.dtype or torch.float32).removeprefix("torch.")

    def _autocast(self) -> torch.autocast:
        enabled = self.dtype is not None and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=enabled)

    @property
    def _input_dtype(self) -> torch.dtype:
        """Pixels go in as the weights' dtype on the CPU; autocast casts them on CUDA."""
        return self.dtype if self.dtype is not None and self.device.type == "cpu" else torch.float32

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """(B, D) float32 text features and, per text, whether it was cut to the context length."""
        tokens = tokenize(texts, self.config.words)
        with self._autocast():
            features = self.net.encode_text(tokens.ids.to(self.device))
        return features.float().cpu().numpy(), tokens.truncated

    def reduce_text_precision(self) -> None:
        """Cast a text-only model to bf16 on a CPU with native bf16 (CUDA already runs fp16 autocast).

        A query is one short sequence, so its time goes into reading the weights (151 MB in fp32 for ViT-B-32),
        which bf16 halves: 34 vs 76 ms a query on one thread here, with query vectors at cosine 0.99998 to fp32
        (benchmarks/search_bench.py measures both). Videos are not run by such a model, so no batch check.
        """
        if self.device.type == "cpu" and self.dtype is None and cpu_has_native_bf16():
            assert self.net.clip.visual is None, "video models settle their precision on a real batch"
            self.net.clip.to(torch.bfloat16)
            self.dtype = torch.bfloat16
        self.precision_known = True

    def video_batch(self, videos: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frame stacks (n_i, S, S, 3) → padded (B, T, 3, S, S) pixels and (B, T) mask, on the CPU."""
        padded = [pad_frames(frames_to_tensor(v, self.norm), self.config.frames, self.config.compat) for v in videos]
        # For a GPU the batch is stacked straight into page-locked memory, so that encode_pixels' non-blocking
        # copy is a real asynchronous DMA (from pageable memory CUDA stages it through a pinned buffer first).
        pin = self.device.type == "cuda"
        pixels = torch.empty((len(padded), *padded[0][0].shape), pin_memory=pin)
        mask = torch.empty((len(padded), *padded[0][1].shape), dtype=padded[0][1].dtype, pin_memory=pin)
        torch.stack([p for p, _ in padded], out=pixels)
        torch.stack([m for _, m in padded], out=mask)
        return pixels, mask

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, T, D) float32 per-frame features and (B, T) bool mask for a padded batch."""
        if not self.precision_known:
            self.choose_precision(pixels, mask)
        non_blocking = self.device.type == "cuda"
        pixels = pixels.to(self.device, dtype=self._input_dtype, non_blocking=non_blocking)
        mask = mask.to(self.device, non_blocking=non_blocking)
        with self._autocast():
            frames, frame_mask = self.net.encode_video(pixels, mask)
        return frames.float().cpu().numpy(), frame_mask.bool().cpu().numpy()

    def encode_videos(self, videos: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_pixels(*self.video_batch(videos))

    def encode_frames(self, videos: list[np.ndarray]) -> list[np.ndarray]:
        """Per video, (n, D) float32 features of its n real frames in time order: what a library stores, a row
        for each sampled frame and its time.

        Not the model's own mask: in official mode that is the tiled one (spec §10.1, quirk 1), which for a video
        of fewer than T frames counts padding slots and drops real frames; ``ts2 eval`` keeps it to reproduce the
        reference's scores, a library keeps what each real frame shows."""
        pixels, mask = self.video_batch(videos)
        features, _ = self.encode_pixels(pixels, mask)
        return [video[real] for video, real in zip(features, mask.bool().numpy(), strict=True)]

    def settle_precision(self, dtype_name: str) -> None:
        """Run in ``dtype_name`` ("bfloat16" or "float32") without the check, as a run whose features this one goes on
        with did (``--precision auto`` on a CPU); anything else, or bf16 where it is not native, leaves it open."""
        if self.device.type != "cpu" or self.dtype is not None or self.precision_known:
            return
        if dtype_name == "bfloat16" and cpu_has_native_bf16():
            self.net, self.dtype = cast_copy(self.net, torch.bfloat16), torch.bfloat16
        elif dtype_name != "float32":
            return
        self.precision_known = True

    def choose_precision(self, pixels: torch.Tensor, mask: torch.Tensor) -> None:
        """Settle the precision on a real batch: on the CPU, bf16 weights if they pass ``cpu_reduced_net``'s check
        (CUDA's fp16 is set at load)."""
        if self.device.type == "cpu" and self.dtype is None:
            reduced = cpu_reduced_net(self.net, pixels, mask)
            if reduced is not None:
                self.net, self.dtype = reduced, torch.bfloat16
        self.precision_known = True


def load_model(options: ModelOptions, *, text_only: bool = False, trainable: bool = False) -> LoadedModel:
    """Build TS2-Net for ``options``: from a TS2-Net checkpoint when given, else zero-shot from CLIP weights.

    ``text_only`` reads and keeps only the text tower, which is all a text query needs. ``trainable`` (without
    a checkpoint) builds the full TS2-Net from CLIP weights, new parts initialised as spec §9 says, for training.
    """
    device = resolve_device(options.device)
    if options.checkpoint is not None:
        config, state = read_checkpoint(options.checkpoint, text_only=text_only)
        # What it was trained with, unless the user asks otherwise (e.g. to study the other compat mode).
        config = dataclasses.replace(
            config,
            compat=options.compat or config.compat,
            frames=options.frames or config.frames,
            inference_topk=options.topk or config.inference_topk,
        )
        _check_frames(config)
        net = _assemble(config, state, source=str(options.checkpoint), text_only=text_only)
        weights, weights_file = {"checkpoint": _file_id(options.checkpoint)}, None
    else:
        config, net, weights, weights_file = _from_clip(options, text_only=text_only, trainable=trainable)
    net.eval().to(device)
    cuda = device.type == "cuda"
    identity = {**_identity(config, net), **weights, MODEL_SOURCE_KEY: model_source(options, config, weights_file)}
    full = options.precision == "float32"
    dtype = torch.float16 if cuda and not full else None
    known = cuda or full
    return LoadedModel(
        net=net,
        config=config,
        device=device,
        identity=identity,
        dtype=dtype,
        precision_known=known,
        precision=options.precision,
    )


def _check_frames(config: TS2Config) -> None:
    """Before any work: a frame count the temporal transformer cannot take is the user's to change."""
    if not config.zero_shot and config.frames > config.max_frames:
        raise Ts2Error(
            f"--frames {config.frames} is more than TS2-Net takes: its temporal transformer has positions for "
            f"{config.max_frames} frames of {config.tokens_per_frame} tokens; use --frames {config.max_frames} or less."
        )


def _from_clip(
    options: ModelOptions, *, text_only: bool, trainable: bool
) -> tuple[TS2Config, TS2Net, dict[str, Any], Path | None]:
    pretrained = options.pretrained
    quick_gelu = options.quick_gelu
    if quick_gelu is None:
        is_tag = pretrained is not None and not looks_like_path(pretrained) and not Path(pretrained).is_file()
        quick_gelu = (pretrained_quick_gelu(options.model, pretrained) if is_tag else None) is not False
    cfg = model_config(options.model, options.backbone_cfg, quick_gelu)
    config = TS2Config(
        backbone=options.model,
        backbone_cfg=cfg,
        quick_gelu=cfg["quick_gelu"],
        frames=options.frames or TS2Config.frames,
        compat=options.compat or TS2Config.compat,
        inference_topk=options.topk or TS2Config.inference_topk,
        zero_shot=not trainable,
        zero_shot_shift=options.zero_shot_shift,
    )
    _check_frames(config)
    path = None
    if pretrained is None:
        torch.manual_seed(0)
        net = TS2Net(build_clip(cfg, initialise=True), config)
        weights_id = "random"
    else:
        known = options.weights_file
        path = known if known is not None and known.is_file() else resolve_pretrained(options.model, pretrained)
        weights_id = pretrained if not Path(pretrained).expanduser().is_file() else _file_id(path)
        keep = (lambda k: not k.startswith("visual.")) if text_only else None
        state = read_state_dict(path, keep)
        if any(key.startswith("clip.") for key in state):  # CLIP inside TS2-Net: ts2's checkpoints, the reference's
            raise CheckpointError(f"{path} is a TS2-Net checkpoint, not CLIP weights: pass it with --checkpoint.")
        if trainable:
            net = TS2Net(build_clip(cfg, initialise=True), config)
            load_state(net.clip, state, source=str(path))
        else:
            net = _assemble(config, {f"clip.{k}": v for k, v in state.items()}, source=str(path), text_only=text_only)
    if trainable:
        net.init_from_clip()
    if text_only:
        net.drop_video_parts()
    return config, net, {"clip_weights": weights_id}, path


def _assemble(config: TS2Config, state: dict[str, torch.Tensor], *, source: str, text_only: bool) -> TS2Net:
    cfg = config.backbone_cfg or {}
    if text_only and text_tower.supports(cfg):
        net = TS2Net(text_tower.build_text_tower(cfg), config, text_only=True)
    else:
        net = TS2Net(build_clip(cfg, initialise=False), config)
    if text_only:
        net.drop_video_parts()
    load_state(net, state, source=source)
    return net


def _file_id(path: Path) -> str:
    """``NAME#sha256:DIGEST``: the file's name for people, the digest of its whole content to compare models by
    (a moved or renamed weights file is the same model; a fine-tuned copy of the same size is not)."""
    from ..scan import file_digest

    return f"{Path(path).name}#{WEIGHTS_DIGEST}{file_digest(path)[:16]}"


def _identity(config: TS2Config, net: TS2Net) -> dict[str, Any]:
    identity = {
        "backbone": config.backbone,
        "mode": "zero-shot" if config.zero_shot else "ts2net",
        "compat": config.compat,
        "frames": config.frames,
        "top_k": None if config.zero_shot else config.top_k,
        "token_shift": config.uses_token_shift,
        "embed_dim": net.embed_dim,
        "quick_gelu": config.quick_gelu,
    }
    if not config.zero_shot:  # a zero-shot model selects no tokens
        identity["topk"] = config.inference_topk
    return identity
