"""``ts2 search``: candidates from the ANN index, then exact TS2 re-ranking over stored per-frame features.

Stage one asks hnswlib for ``candidates`` videos whose global vector (mean of unit frame features) is closest to
the query. Stage two scores those candidates exactly with the model's frame-weighted similarity; its frame
weights locate the moment that matched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Ts2Error
from .store import Library, VideoRow


@dataclass(frozen=True)
class SearchOptions:
    limit: int = 10
    candidates: int = 300
    within: Path | None = None
    """Only videos under this folder (scored exactly, whatever their number)."""
    min_score: float | None = None


@dataclass(frozen=True)
class Moment:
    start: float
    end: float
    time: float
    """Time of the frame with the highest weight."""


@dataclass(frozen=True)
class Hit:
    video_id: int
    path: str
    score: float
    duration: float | None
    moment: Moment
    frames: list[tuple[float, float]]
    """(time, weight) per stored frame."""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "score": round(self.score, 6),
            "duration": self.duration,
            "moment": {"start": round(self.moment.start, 3), "end": round(self.moment.end, 3)},
            "frames": [{"time": round(t, 3), "weight": round(w, 6)} for t, w in self.frames],
        }


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)


def rank(
    library: Library,
    query: np.ndarray,
    options: SearchOptions,
    *,
    eps: float | None = 1e-12,
    exclude: int | None = None,
) -> list[Hit]:
    """The best videos for one query vector (D,), best first."""
    ids = _candidate_ids(library, query, options, exclude)
    if not ids:
        return []
    ids, scores, weights = score_candidates(library, query, ids, eps=eps)
    order = np.argsort(-scores, kind="stable")
    if options.min_score is not None:
        order = order[scores[order] >= options.min_score]
    hits: list[Hit] = []
    # Rows are read a limit's worth at a time: a video a concurrent index removes after it was scored is skipped,
    # and the next best one takes its place.
    taken = 0
    while len(hits) < options.limit and taken < len(order):
        positions = order[taken : taken + options.limit - len(hits)]
        taken += len(positions)
        rows = library.videos([ids[i] for i in positions])
        hits.extend(_hit(rows[ids[i]], float(scores[i]), weights[i]) for i in positions if ids[i] in rows)
    return hits


def score_candidates(
    library: Library, query: np.ndarray, ids: list[int], *, eps: float | None = 1e-12
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Exact TS2 scores (n,) and frame weights (n, T) of the stored videos among ``ids``, with their ids in the
    order scored (ids a concurrent index removed are left out).

    Candidates are scored a batch at a time as SQLite returns them.
    """
    batches = library.stream_frame_features(ids, WIDEN_CHUNK)
    found, products = _frame_products(_unit(np.asarray(query, dtype=np.float32), eps), batches)
    return found, *_weigh(*products, eps=eps)


def global_vector(frames: np.ndarray) -> np.ndarray:
    """One vector per video for the ANN candidate stage: the mean of its unit frame features, normalised."""
    unit = frames / np.maximum(np.linalg.norm(frames, axis=1, keepdims=True), 1e-12)
    mean = unit.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


EXACT_SUBSET_LIMIT = 5000
"""A ``--in`` folder with at most this many videos is scored exactly; a larger one filters ANN candidates."""
SUBSET_OVERFETCH = 10


def _candidate_ids(library: Library, query: np.ndarray, options: SearchOptions, exclude: int | None) -> list[int]:
    wanted = max(options.candidates, options.limit) + (exclude is not None)  # room for dropping the query video
    subset = library.ids_under(options.within) if options.within is not None else None
    if subset is not None and len(subset) <= EXACT_SUBSET_LIMIT:
        ids = subset
    else:
        found, _ = library.knn(query, wanted if subset is None else wanted * SUBSET_OVERFETCH)
        ids = found.tolist()
        if subset is not None:
            members = set(subset)
            ids = [i for i in ids if i in members][:wanted]
    return [i for i in ids if i != exclude]


# The values of model/similarity.py (spec §6), repeated so that this module does not import torch.
MASKED_WEIGHT = -1e18
WEIGHT_TEMPERATURE = 4.0


def score_videos(
    query: np.ndarray, videos: list[np.ndarray], *, eps: float | None = 1e-12
) -> tuple[np.ndarray, np.ndarray]:
    """Exact TS2 scores (n,) and frame weights (n, T) of one query against videos of up to T frames each
    (float16 or float32 arrays; scored in float32).

    The model's ``frame_weighted_similarity`` for one text, in numpy so that a search needs no torch (tests
    compare the two): per-frame cosines, weights ``softmax(4 · cos / ‖cos‖)`` over the video's frames, score
    = weighted mean of the cosines.
    """
    batches = (
        [(i, v) for i, v in enumerate(videos[s : s + WIDEN_CHUNK], s)] for s in range(0, len(videos), WIDEN_CHUNK)
    )
    _, products = _frame_products(_unit(np.asarray(query, dtype=np.float32), eps), batches)
    return _weigh(*products, eps=eps)


FrameProducts = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Per frame (n, T), zero for padding: inner products with the unit query and squared norms; and lengths (n,)."""

WIDEN_CHUNK = 32
"""Videos widened to float32 at a time: 0.8 MB at 12 frames of 512, read twice more while in the core's cache."""


def _frame_products(
    query: np.ndarray, batches: Iterable[list[tuple[int, np.ndarray]]]
) -> tuple[list[int], FrameProducts]:
    """The ids of the (id, frames) ``batches`` in the order scored, and their frames' products with ``query``.

    Each batch is widened to float32 and both products are taken while it is in the core's cache, as SQLite
    returns it. (Widening and scoring on worker threads while SQLite read on was no faster once the widening
    took a quarter of numpy's time: the reads are most of a re-rank now.)
    """
    ids: list[int] = []
    parts = []
    for batch in batches:
        ids.extend(video_id for video_id, _ in batch)
        parts.append(_batch_products(query, [frames for _, frames in batch]))
    if not parts:
        empty = np.zeros((0, 0), dtype=np.float32)
        return ids, (empty, empty, np.zeros(0, dtype=np.int64))
    lengths = np.concatenate([part[2] for part in parts])
    dots = np.zeros((len(lengths), lengths.max()), dtype=np.float32)
    squared_norms = np.zeros_like(dots)
    row = 0
    for part_dots, part_squares, _ in parts:
        rows, frames = part_dots.shape
        dots[row : row + rows, :frames] = part_dots
        squared_norms[row : row + rows, :frames] = part_squares
        row += rows
    return ids, (dots, squared_norms, lengths)


def _batch_products(query: np.ndarray, videos: list[np.ndarray]) -> FrameProducts:
    lengths = np.array([len(v) for v in videos])
    frames = np.concatenate(videos)
    frames = widen_float16(frames) if frames.dtype == np.float16 else frames.astype(np.float32, copy=False)
    valid = np.arange(lengths.max()) < lengths[:, None]  # row-major True cells: the concatenated frames, in order
    dots = np.zeros(valid.shape, dtype=np.float32)
    dots[valid] = frames @ query
    squared_norms = np.zeros_like(dots)
    squared_norms[valid] = np.einsum("fd,fd->f", frames, frames)  # 5× faster than np.linalg.norm here
    return dots, squared_norms, lengths


_FLOAT16_TO_32_SCALE = np.float32(2.0**112)  # 2^(127 - 15): the two formats' exponent biases
_KEEP_SIGN_AND_LOW_BITS = np.int32(-0x70000000 - 1)  # 0x8FFFFFFF


def widen_float16(values: np.ndarray) -> np.ndarray:
    """``values.astype(np.float32)`` for finite float16 values (all the library stores), 4× faster.

    numpy converts float16 one value at a time (~3 ns each here, most of a re-rank); this takes four vectorised
    passes instead. A float16's sign, exponent and mantissa bits, moved up by 13 places into a float32, make a
    float32 2^112 times smaller (its exponent bias is 127 against 15), subnormals included; so: sign-extend to
    int32, shift, clear the three sign-extension bits that landed in the exponent, scale by 2^112. Infinities
    and NaNs would come out as large finite numbers; the store refuses them.
    """
    out = np.empty(values.shape, dtype=np.float32)
    bits = out.view(np.int32)
    np.copyto(bits, values.view(np.int16), casting="unsafe")
    bits <<= 13
    bits &= _KEEP_SIGN_AND_LOW_BITS
    out *= _FLOAT16_TO_32_SCALE
    return out


def _weigh(
    dots: np.ndarray, squared_norms: np.ndarray, lengths: np.ndarray, *, eps: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n,) and frame weights (n, T) from the frame products (the similarity's softmax pooling)."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    valid = np.arange(dots.shape[1]) < lengths[:, None]
    cosines = dots / _norm_floor(np.sqrt(squared_norms), eps)
    cosines[~valid] = 0.0  # padding: no frame there
    spread = _norm_floor(np.linalg.norm(cosines, axis=1, keepdims=True), eps)
    logits = np.where(valid, WEIGHT_TEMPERATURE * cosines / spread, MASKED_WEIGHT)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return (weights * cosines).sum(axis=1), weights


def _unit(vector: np.ndarray, eps: float | None) -> np.ndarray:
    return vector / _norm_floor(np.linalg.norm(vector), eps)


def _norm_floor(norm: np.ndarray, eps: float | None) -> np.ndarray:
    """F.normalize's ``max(‖x‖, eps)``; without eps (official mode) only padding's zero norm is kept off zero."""
    return np.maximum(norm, eps) if eps is not None else np.where(norm > 0, norm, 1.0)


def _hit(row: VideoRow, score: float, weights: np.ndarray) -> Hit:
    times = row.frame_times
    weights = weights[: len(times)]
    return Hit(
        video_id=row.id,
        path=row.path,
        score=score,
        duration=row.duration,
        moment=matching_moment(times, weights, row.duration),
        frames=[(float(t), float(w)) for t, w in zip(times, weights, strict=True)],
    )


def matching_moment(times: list[float], weights: np.ndarray, duration: float | None) -> Moment:
    """The run of neighbouring frames around the heaviest one that carry well above-average weight.

    Each frame stands for the stretch of video halfway to its neighbours, so the span starts halfway to the frame
    before the run and ends halfway to the frame after it (or at the video's ends).
    """
    if not times:
        return Moment(0.0, duration or 0.0, 0.0)
    best = int(np.argmax(weights))
    keep = max(float(weights[best]) * 0.5, 1.0 / len(weights))
    first = last = best
    while first > 0 and weights[first - 1] >= keep:
        first -= 1
    while last < len(times) - 1 and weights[last + 1] >= keep:
        last += 1
    start = 0.0 if first == 0 else (times[first - 1] + times[first]) / 2
    end_of_video = duration if duration is not None else times[-1]
    end = end_of_video if last == len(times) - 1 else (times[last] + times[last + 1]) / 2
    return Moment(start=start, end=max(end, times[last]), time=float(times[best]))


def library_eps(library: Library) -> float | None:
    model = library.model_config() or {}
    return None if model.get("compat") == "official" else 1e-12


def why_nothing_matched(library: Library, options: SearchOptions) -> str | None:
    """The filter that left a search with no results, in words, or None when it is none of them."""
    if options.within is not None and not library.ids_under(options.within):
        return f"No indexed videos under {options.within}."
    if options.min_score is not None:
        return f"No video scored {options.min_score:g} or more."
    return None


def gone_note(hits: list[Hit]) -> str | None:
    """A note when results are no longer where they were indexed (the library learns only at the next index)."""
    gone = [hit.path for hit in hits if not Path(hit.path).exists()]
    if not gone:
        return None
    which = f"{gone[0]} is" if len(gone) == 1 else f"{len(gone)} of these videos are"
    return (
        f"{which} no longer there (moved or deleted); run `ts2 index` on the folder to update the library "
        "(`ts2 forget FOLDER` if the folder itself is gone)."
    )


def require_searchable(library: Library) -> None:
    if library.count_ok() == 0:
        if library.writer_running():  # a first run
            raise Ts2Error(
                f"The library at {library.directory} has no indexed videos yet: a ts2 index is running on it; "
                "search again once it has indexed some."
            )
        raise Ts2Error(f"The library at {library.directory} has no indexed videos yet; run `ts2 index FOLDER` first.")
