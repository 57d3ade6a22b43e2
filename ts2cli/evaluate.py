"""``ts2 eval``: text↔video retrieval metrics of a model on MSR-VTT 1k-A or any caption list (spec §11).

The pipeline: sample each video's frames (the reference's 1-fps rule under ``--compat official``, ts2's uniform
sampler otherwise), encode them into per-frame features, encode the captions, score every caption against every
video with the model's similarity head, scaled by exp(logit_scale) as the reference does (the scale matters for
the inverted softmax), and summarise ranks as R@K, MdR and MnR.

Per-video features are cached on disk, keyed by the model, the sampling and the file (path, size, mtime), so a
second run with other metric settings (``--dsl``, ``--ties``) decodes nothing. Under ``--compat official`` the
token selection is stochastic (spec §10.1 quirk 5): its noise is seeded per fixed batch of videos, so features
depend on the seed and the batch size (both in the cache key), not on which videos an earlier run cached.

A video that cannot be decoded is not fatal: it is reported, and its column scores NaN, which the metrics count
as a miss for its captions (the reference would produce NaN through an all-zero mask, spec §10.1 quirk 6).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import (
    EVAL_BATCH_SIZE,
    MSRVTT_DATA_JSON,
    MSRVTT_TEST_CSV,
    MSRVTT_TRAIN_CSV,
    MSRVTT_VIDEO_DIRS,
    CaptionSet,
)
from .decode import decode_ahead, sample_frames
from .errors import Ts2Error, one_line
from .metrics import TieMode, inverted_softmax, retrieval_metrics, video_to_text_metrics
from .model import LoadedModel, TS2Net, out_of_memory_says
from .model.config import Compat
from .model_record import MODEL_SOURCE_KEY
from .official_sampling import sample_official

Head = Literal["ts2", "meanpool"]
HEADS: tuple[Head, ...] = ("ts2", "meanpool")
FrameSampler = Callable[[Path], np.ndarray]
"""A video file → (n, S, S, 3) uint8 frames; raises ``VideoDecodeError``."""

OFFICIAL_SAMPLING_VERSION, UNIFORM_SAMPLING_VERSION = 1, 2
"""Bumped whenever a sampler changes the frames it returns, so that old cached features are not reused (uniform v2:
open_clip's resize and crop geometry)."""
CAPTION_BATCH = 256
SCORE_BLOCK = 256
"""Captions scored per block: (block × videos × frames) floats stay small even for 1000 × 1000."""
CACHE_FORMAT = "ts2-eval-features/1"

T = TypeVar("T")


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = EVAL_BATCH_SIZE
    workers: int | None = None
    ties: TieMode = "strict"
    dsl: bool = False
    cache_dir: Path | None = None
    """Where per-video features are cached; None disables the cache."""


class EvalProgress:
    """What evaluation reports while it runs; the CLI draws it with rich, tests ignore it."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, count: int = 1) -> None: ...

    def failed(self, name: str, reason: str) -> None: ...


@dataclass
class VideoFeatures:
    frames: np.ndarray
    """(V, T, D) float32 per-frame features; zeros for failed videos."""
    mask: np.ndarray
    """(V, T) bool valid frames; all False for failed videos."""
    failed: dict[int, str] = field(default_factory=dict)
    """Video index → one-line reason it could not be decoded."""
    cached: int = 0
    decoded: int = 0


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    """``t2v`` and ``v2t``, plus ``t2v_dsl`` and ``v2t_dsl`` with the inverted softmax."""
    videos: int
    queries: int
    ties: TieMode
    sampling: str
    failed: list[tuple[str, str]]
    missing: list[str]
    truncated: int
    """Captions cut to the model's 32-token context."""
    cache: dict[str, int]
    model: dict[str, Any]
    seconds: float
    dtype: str | None = None
    """What the videos were embedded in ("float32", "bfloat16", "float16"), in this run or in the one that cached
    their features; None when no video was embedded. ``--precision auto`` on a CPU takes the cache's, else decides
    it on the first batch."""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "videos": self.videos,
            "queries": self.queries,
            "ties": self.ties,
            "transductive": [k for k in self.metrics if k.endswith("_dsl")],
            "sampling": self.sampling,
            "failed": [{"video": v, "reason": r} for v, r in self.failed],
            "missing": self.missing,
            "truncated_captions": self.truncated,
            "cache": self.cache,
            "model": {k: v for k, v in self.model.items() if k != MODEL_SOURCE_KEY},
            "dtype": self.dtype,
            "seconds": round(self.seconds, 3),
        }


# --- data -----------------------------------------------------------------------------------------------------


def check_msrvtt_dir(data_dir: Path, *, training: bool = False) -> None:
    """One message naming every missing piece of the CLIP4Clip MSR-VTT layout, and where it was looked for."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise Ts2Error(f"MSR-VTT data folder {data_dir} {what} (give the folder with --data).")
    needed = [MSRVTT_TRAIN_CSV, MSRVTT_DATA_JSON] if training else [MSRVTT_TEST_CSV]
    missing = [name for name in needed if not (data_dir / name).is_file()]
    folders = [data_dir / d for d in MSRVTT_VIDEO_DIRS]
    if not any(_has_msrvtt_video(folder) for folder in folders):
        missing.append("the videos (videoNNNN.mp4 or .webm in " + ", ".join(f"{f}/" for f in folders) + ")")
    if missing:
        raise Ts2Error(
            f"MSR-VTT data in {data_dir} is incomplete: missing {'; '.join(missing)}. The lists come from "
            "CLIP4Clip's msrvtt_data.zip, the videos from the MSR-VTT download."
        )


def _has_msrvtt_video(folder: Path) -> bool:
    try:
        return any(
            entry.name.startswith("video") and entry.name.endswith((".mp4", ".webm")) for entry in os.scandir(folder)
        )
    except OSError:
        return False


# --- frames and features --------------------------------------------------------------------------------------


def frame_sampler(compat: Compat, frames: int, size: int) -> tuple[str, FrameSampler]:
    """The sampler of a compat mode (spec §1) and a name for it that changes whenever its output would."""
    if compat == "official":

        def official(path: Path) -> np.ndarray:
            return sample_official(path, size=size, max_frames=frames).frames

        return f"official-1fps-pil/v{OFFICIAL_SAMPLING_VERSION}/{frames}x{size}", official

    def uniform(path: Path) -> np.ndarray:
        return sample_frames(path, num_frames=frames, size=size).frames

    return f"uniform-swscale/v{UNIFORM_SAMPLING_VERSION}/{frames}x{size}", uniform


def default_cache_dir() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("ts2") / "eval"


class FeatureCache:
    """Per-video per-frame features on disk, one ``.npz`` per (model, sampling, file version)."""

    def __init__(self, directory: Path, loaded: LoadedModel, sampling: str, batch_size: int) -> None:
        source = loaded.identity.get(MODEL_SOURCE_KEY, {})
        # Paths in the source move; the weights' fingerprints and the backbone config say what the model is.
        model = {k: v for k, v in loaded.identity.items() if k != MODEL_SOURCE_KEY}
        key = {"model": model, "backbone_cfg": source.get("backbone_cfg"), "sampling": sampling}
        if loaded.draws_noise:  # its features depend on the noise of their batch (see encode_videos)
            key["noise"] = {"seed": loaded.config.seed, "batch_size": batch_size}
        # Features from a GPU (fp16) and a CPU (fp32 or bf16) differ slightly, and so do runs pinned to float32
        # and "auto" ones: keep them apart.
        key["device"] = loaded.device.type
        key["precision"] = loaded.precision
        self.key = _digest(key)
        self.directory = Path(directory) / self.key[:16]
        try:  # before any work: a cache folder that cannot be made is the user's to fix
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            reason = one_line(error)
            raise Ts2Error(f"Cannot use {directory} as the feature cache: {reason} (see --cache-dir).") from None
        self.writable = True

    def _file(self, video: Path) -> Path | None:
        try:
            stat = video.stat()
        except OSError:
            return None
        version = {"path": os.path.abspath(video), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return self.directory / f"{_digest({'model': self.key, **version})}.npz"

    def load(self, video: Path) -> CachedFeatures | None:
        file = self._file(video)
        if file is None or not file.is_file():
            return None
        try:
            with np.load(file) as data:
                dtype = str(data["dtype"]) if "dtype" in data.files else None
                return CachedFeatures(data["frames"], data["mask"], dtype)
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is recomputed and overwritten

    def save(self, video: Path, frames: np.ndarray, mask: np.ndarray, dtype: str) -> None:
        file = self._file(video)
        if file is None or not self.writable:
            return
        # Temp file + rename: a run killed mid-write never leaves a truncated entry behind.
        try:
            handle, partial = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        except OSError:
            self.writable = False  # a folder gone read-only (or full) costs the cache, not the evaluation
            return
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, frames=frames, mask=mask, dtype=np.array(dtype))
            os.replace(partial, file)
        except OSError:
            self.writable = False
            Path(partial).unlink(missing_ok=True)


@dataclass(frozen=True)
class CachedFeatures:
    frames: np.ndarray
    mask: np.ndarray
    dtype: str | None
    """What the model computed them in (``LoadedModel.dtype_name``); None in entries written before it was kept."""


def _digest(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def encode_videos(
    loaded: LoadedModel,
    videos: Sequence[Path],
    sampler: FrameSampler,
    *,
    cache: FeatureCache | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    workers: int | None = None,
    progress: EvalProgress | None = None,
) -> VideoFeatures:
    """Per-frame features of every video, from the cache where possible, else decoded and encoded in batches.

    A model that draws top-k noise (official mode) runs fixed batches, videos ``k·batch_size`` onwards, each
    with noise seeded by its number, and one video of a batch missing from the cache recomputes the whole batch:
    a video's features then depend only on the data, the seed and the batch size, not on what an interrupted
    run left in the cache.
    """
    progress = progress or EvalProgress()
    count, frames = len(videos), loaded.config.frames
    result = VideoFeatures(
        frames=np.zeros((count, frames, loaded.embed_dim), dtype=np.float32),
        mask=np.zeros((count, frames), dtype=bool),
    )
    progress.start("encoding videos", count)
    hits: dict[int, CachedFeatures] = {}
    for index, video in enumerate(videos):
        hit = cache.load(video) if cache is not None else None
        if hit is not None and hit.frames.shape == result.frames.shape[1:]:
            hits[index] = hit
    hits = _in_one_precision(loaded, hits)
    noisy = loaded.draws_noise
    if noisy:
        missed = {index // batch_size for index in range(count) if index not in hits}
        hits = {index: hit for index, hit in hits.items() if index // batch_size not in missed}
    for index, hit in hits.items():
        result.frames[index], result.mask[index] = hit.frames, hit.mask
    result.cached = len(hits)
    progress.advance(len(hits))
    todo = [index for index in range(count) if index not in hits]

    def decode(index: int) -> np.ndarray:
        return sampler(videos[index])

    def encode(batch: list[tuple[int, np.ndarray]]) -> None:
        if noisy:
            loaded.net.selector.reseed(batch_seed(loaded.config.seed, batch[0][0] // batch_size))
        _encode_batch(loaded, batch, videos, result, cache, progress)

    batch: list[tuple[int, np.ndarray]] = []
    for index, outcome in decode_ahead(todo, decode, workers or default_workers(), 2 * batch_size):
        if noisy and batch and index // batch_size != batch[0][0] // batch_size:
            encode(batch)  # a fixed batch short of the videos that failed to decode
            batch = []
        if isinstance(outcome, str):
            result.failed[index] = outcome
            progress.failed(str(videos[index]), outcome)
            progress.advance()
            continue
        batch.append((index, outcome))
        if len(batch) == batch_size:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    return result


def _in_one_precision(loaded: LoadedModel, hits: dict[int, CachedFeatures]) -> dict[int, CachedFeatures]:
    """The cached features computed in the precision this run computes in, which a run that has not settled it yet
    (``--precision auto`` on a CPU) takes from the cache: bf16 and fp32 features differ a little, and the check that
    picks bf16 depends on a timing, so a resumed run could otherwise mix the two."""
    implied = loaded.dtype_name if loaded.precision_known else None  # the cache key fixes it: older entries too
    if not loaded.precision_known:
        counts = Counter(hit.dtype for hit in hits.values() if hit.dtype is not None)
        if counts:
            loaded.settle_precision(counts.most_common(1)[0][0])
    run = loaded.dtype_name if loaded.precision_known else None
    return {index: hit for index, hit in hits.items() if run is not None and (hit.dtype or implied) == run}


def batch_seed(seed: int, batch: int) -> int:
    """The top-k noise seed of fixed batch number ``batch`` of an evaluation run with ``seed``."""
    return (seed << 32) + batch


def _encode_batch(
    loaded: LoadedModel,
    batch: list[tuple[int, np.ndarray]],
    videos: Sequence[Path],
    result: VideoFeatures,
    cache: FeatureCache | None,
    progress: EvalProgress,
) -> None:
    with out_of_memory_says(
        f"encoding a batch of {len(batch)} videos on {loaded.device.type}",
        "run again with a smaller batch (ts2 eval: --batch-size; ts2 train: --micro-batch)",
    ):
        features, mask = loaded.encode_pixels(*loaded.video_batch([frames for _, frames in batch]))
    for (index, _), video_features, video_mask in zip(batch, features, mask, strict=True):
        result.frames[index], result.mask[index] = video_features, video_mask
        if cache is not None:
            cache.save(videos[index], video_features, video_mask, loaded.dtype_name)
    result.decoded += len(batch)
    progress.advance(len(batch))


def encode_captions(loaded: LoadedModel, captions: Sequence[str]) -> tuple[np.ndarray, int]:
    """(C, D) caption features and how many captions were cut to the context length."""
    parts, truncated = [], 0
    for start in range(0, len(captions), CAPTION_BATCH):
        features, cut = loaded.encode_texts(list(captions[start : start + CAPTION_BATCH]))
        parts.append(features)
        truncated += sum(cut)
    return np.concatenate(parts) if parts else np.zeros((0, loaded.embed_dim), np.float32), truncated


# --- scores and metrics ---------------------------------------------------------------------------------------


def head_of(loaded: LoadedModel) -> Head:
    """The similarity head a model was trained with: TS2-Net's, or the mean-pooling baseline of ``ts2 train``."""
    head = loaded.config.provenance.get("head", "ts2")
    return head if head in HEADS else "ts2"


def head_scores(net: TS2Net, head: Head, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(Bt, Bv) scores in [-1, 1] for (Bt, D) texts and (Bv, T, D) frames with their (Bv, T) mask."""
    if head == "ts2":
        return net.similarity(text, frames, mask)[0]
    return mean_pooled_similarity(text, frames, mask)


def mean_pooled_similarity(
    text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """The baseline head (CLIP4Clip's "meanP" without its extras): a video is the normalised mean of its unit
    frame features, scored by cosine. It sees a video as an unordered bag of frames."""
    valid = mask.to(frames.dtype).unsqueeze(-1)
    pooled = (F.normalize(frames.float(), dim=-1, eps=eps) * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)
    return F.normalize(text.float(), dim=-1, eps=eps) @ F.normalize(pooled, dim=-1, eps=eps).t()


def logit_scale(loaded: LoadedModel) -> float:
    """exp(logit_scale), the factor of the reference's test matrix."""
    return float(loaded.net.clip.logit_scale.detach().float().exp())


@torch.inference_mode()
def similarity_matrix(
    loaded: LoadedModel,
    text: np.ndarray,
    videos: VideoFeatures,
    head: Head | None = None,
    *,
    scale: float | None = None,
) -> np.ndarray:
    """(captions × videos) scores times exp(logit_scale) (``scale``, else the model's now), as the reference's test
    matrix; NaN for failed videos."""
    net, head = loaded.net, head or head_of(loaded)
    frames, mask = torch.from_numpy(videos.frames), torch.from_numpy(videos.mask)
    scale = logit_scale(loaded) if scale is None else scale
    sim = np.empty((len(text), len(frames)), dtype=np.float32)
    for start in range(0, len(text), SCORE_BLOCK):
        block = torch.from_numpy(text[start : start + SCORE_BLOCK])
        sim[start : start + len(block)] = scale * head_scores(net, head, block, frames, mask).float().numpy()
    sim[:, list(videos.failed)] = np.nan
    return sim


def retrieval_report(
    sim: np.ndarray, caption_video: np.ndarray, *, ties: TieMode = "strict", dsl: bool = False
) -> dict[str, dict[str, float]]:
    """t2v and v2t metrics of a (captions × videos) matrix; with ``dsl`` also after the inverted softmax."""
    report = {
        "t2v": retrieval_metrics(sim, targets=caption_video, ties=ties),
        "v2t": video_to_text_metrics(sim, caption_video, ties=ties),
    }
    if dsl:
        rescored = inverted_softmax(sim)
        report["t2v_dsl"] = retrieval_metrics(rescored, targets=caption_video, ties=ties)
        report["v2t_dsl"] = video_to_text_metrics(rescored, caption_video, ties=ties)
    return report


# --- the whole evaluation -------------------------------------------------------------------------------------


def evaluate(
    loaded: LoadedModel,
    data: CaptionSet,
    options: EvalOptions = EvalOptions(),
    *,
    progress: EvalProgress | None = None,
    sampler: FrameSampler | None = None,
    head: Head | None = None,
) -> EvalResult:
    """Metrics of ``loaded`` on ``data``. ``sampler`` replaces the compat mode's sampler (training passes one
    that keeps decoded frames in memory); the feature cache is only used with the default sampler."""
    started = time.perf_counter()
    config = loaded.config
    sampling, default_sampler = frame_sampler(config.compat, config.frames, loaded.image_size)
    cache = None
    if options.cache_dir is not None and sampler is None:
        cache = FeatureCache(options.cache_dir, loaded, sampling, options.batch_size)
    # The captions and the logit scale before any video: on a CPU, --precision auto settles on bf16 or fp32 with the
    # first video batch, and a run whose videos all come from the cache has none, so text encoded afterwards would
    # depend on the cache (a second run would not give the first one's numbers).
    text, truncated = encode_captions(loaded, data.captions)
    scale = logit_scale(loaded)
    videos = encode_videos(
        loaded,
        data.videos,
        sampler or default_sampler,
        cache=cache,
        batch_size=options.batch_size,
        workers=options.workers,
        progress=progress,
    )
    sim = similarity_matrix(loaded, text, videos, head, scale=scale)
    return EvalResult(
        metrics=retrieval_report(sim, data.caption_video, ties=options.ties, dsl=options.dsl),
        videos=len(data.videos),
        queries=len(data.captions),
        ties=options.ties,
        sampling=sampling,
        failed=[(data.video_ids[i], reason) for i, reason in sorted(videos.failed.items())],
        missing=list(data.missing),
        truncated=truncated,
        cache={"hits": videos.cached, "decoded": videos.decoded, "failed": len(videos.failed)},
        model=loaded.identity,
        seconds=time.perf_counter() - started,
        dtype=loaded.dtype_name if loaded.precision_known else None,
    )
