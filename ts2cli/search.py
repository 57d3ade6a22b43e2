"""``ts2 search``: candidates from the ANN index, then exact TS2 re-ranking over stored per-frame features.

Stage one asks hnswlib for ``candidates`` videos whose global vector (mean of unit frame features) is closest to
the query. Stage two scores those candidates exactly with the model's frame-weighted similarity; its frame
weights locate the moment that matched.
"""

from __future__ import annotations

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
    # The stored float16 values, cast once into the scoring batch (a cast per array took 2-3× longer).
    features = library.frame_features(ids, dtype=np.float16)
    ids = [i for i in ids if i in features]  # a concurrent index may have removed some
    scores, weights = score_videos(query, [features[i] for i in ids], eps=eps)
    order = np.argsort(-scores, kind="stable")
    rows = library.videos([ids[i] for i in order[: options.limit]])
    hits = []
    for position in order[: options.limit]:
        score = float(scores[position])
        if options.min_score is not None and score < options.min_score:
            break
        row = rows.get(ids[position])
        if row is not None:
            hits.append(_hit(row, score, weights[position]))
    return hits


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
    frames = max(v.shape[0] for v in videos)
    padded = np.zeros((len(videos), frames, videos[0].shape[1]), dtype=np.float32)
    valid = np.zeros((len(videos), frames), dtype=bool)
    for i, video in enumerate(videos):
        padded[i, : len(video)] = video
        valid[i, : len(video)] = True
    query = np.asarray(query, dtype=np.float32)
    norms = np.sqrt(np.einsum("vfd,vfd->vf", padded, padded))  # 5× faster than np.linalg.norm here
    cosines = (padded @ _unit(query, eps)) / _norm_floor(norms, eps)
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


def require_searchable(library: Library) -> None:
    if library.count_ok() == 0:
        raise Ts2Error(f"The library at {library.directory} has no indexed videos yet; run `ts2 index FOLDER` first.")
