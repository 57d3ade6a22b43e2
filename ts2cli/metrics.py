"""Retrieval metrics for a similarity matrix (spec §11.3) and the "inverted softmax" re-scoring (spec §11.4).

Rows are queries and columns are candidates. A query's 0-based rank is the number of candidates that score
strictly higher than its correct one, so R@K = 100·mean(rank < K), MdR = median(rank) + 1 and
MnR = mean(rank) + 1.

Two ways of treating ties are offered:

* ``"strict"`` (the default): every query contributes exactly one rank, the number of strictly greater scores.
  The denominator is always the number of queries, and without ties the numbers equal the official ones. Ties
  resolve in the query's favour, so a model that gives every candidate the same score looks perfect; exact
  float ties are rare with real features, and the optimism is bounded by how many ties there are. It is the
  default because every query then weighs the same, which is what "recall over 1,000 queries" means.
* ``"official"``: replicates ``metrics.compute_metrics`` of CLIP4Clip/TS2-Net (spec §10.1 row 10). A correct
  score tied with k-1 others is appended k times, at ranks g, g+1, …, g+k-1 (g = strictly greater), so one
  query can weigh more than another and the denominator grows. Queries whose correct score is NaN or ±inf
  contribute nothing (the official code finds ties by ``sorted - correct == 0``, which is never true there).

NaN scores (for instance from a video that failed to decode, spec §10.1 row 6): a NaN elsewhere in a row is
never "greater", so it is ignored in both modes. A query whose own correct score is NaN is dropped by the
official mode, which would quietly shrink the test set; the strict mode counts it as a miss at every K and at
the worst possible rank (n_candidates - 1) for MdR and MnR, so a broken video costs what a failed retrieval
costs, also in a gallery of K videos or fewer (where the last rank is still "within K").
"""

from __future__ import annotations

from typing import Literal

import numpy as np

TieMode = Literal["strict", "official"]

RECALL_KS = (1, 5, 10, 50)

# Rows compared per block, so that large (e.g. 60k-caption) matrices need no full-size boolean temporary.
_BLOCK_ROWS = 1024


def retrieval_metrics(
    sim: np.ndarray, *, targets: np.ndarray | None = None, ties: TieMode = "strict"
) -> dict[str, float]:
    """R@1/5/10/50, MdR and MnR for ``sim`` (queries × candidates).

    ``targets[i]`` is the column of query i's correct candidate; it defaults to the diagonal, which requires a
    square matrix. Several queries may share a target (t2v with several captions per video).
    """
    sim = _as_2d(sim)
    n_queries, n_candidates = sim.shape
    if targets is None:
        if n_queries != n_candidates:
            raise ValueError(f"a {n_queries}x{n_candidates} matrix needs explicit targets")
        targets = np.arange(n_queries)
    targets = np.asarray(targets)
    if targets.shape != (n_queries,):
        raise ValueError(f"targets has shape {targets.shape}, expected ({n_queries},)")
    if n_queries and (targets.min() < 0 or targets.max() >= n_candidates):
        raise ValueError("targets must index columns of sim")
    correct = sim[np.arange(n_queries), targets]
    return _summarise(*_ranks(sim, correct, ties))


def video_to_text_metrics(
    sim_t2v: np.ndarray, caption_video: np.ndarray, *, ties: TieMode = "strict"
) -> dict[str, float]:
    """Video→text metrics from a captions × videos matrix in which a video may own several captions.

    ``caption_video[c]`` is the video (column) of caption c. A video query counts as found at the rank of its
    best caption among all captions; with one caption per video this equals ``retrieval_metrics(sim_t2v.T)``.
    """
    sim_t2v = _as_2d(sim_t2v)
    n_captions, n_videos = sim_t2v.shape
    caption_video = np.asarray(caption_video)
    if caption_video.shape != (n_captions,):
        raise ValueError(f"caption_video has shape {caption_video.shape}, expected ({n_captions},)")
    if n_captions and (caption_video.min() < 0 or caption_video.max() >= n_videos):
        raise ValueError("caption_video must index columns of sim_t2v")
    if np.bincount(caption_video, minlength=n_videos).min(initial=1) == 0:
        raise ValueError("every video needs at least one caption")
    own = sim_t2v[np.arange(n_captions), caption_video]
    # Best own caption per video; NaN only when all of a video's captions are NaN (a broken video).
    best = np.full(n_videos, -np.inf, dtype=sim_t2v.dtype)
    np.maximum.at(best, caption_video, np.where(np.isnan(own), -np.inf, own))
    all_nan = np.bincount(caption_video, weights=~np.isnan(own), minlength=n_videos) == 0
    best[all_nan] = np.nan
    return _summarise(*_ranks(sim_t2v.T, best, ties))


def inverted_softmax(sim: np.ndarray) -> np.ndarray:
    """``S ⊙ softmax(S, axis=0)``: each column (video) is normalised over all queries (spec §11.4, "DSL").

    Temperature 1 on purpose: ``S`` already includes the model's logit scale (≈100). This is transductive,
    since it uses the whole query set. A column containing NaN stays NaN.
    """
    sim = _as_2d(sim)
    sim = sim.astype(np.promote_types(sim.dtype, np.float32), copy=False)
    # Subtracting the column max keeps exp() from overflowing at logit-scale magnitudes (scores up to ~100).
    weights = np.exp(sim - sim.max(axis=0, keepdims=True))
    weights /= weights.sum(axis=0, keepdims=True)
    return sim * weights


def _as_2d(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"expected a 2-D similarity matrix, got shape {sim.shape}")
    # Integer scores would break the ±inf/NaN sentinels used below.
    return sim if np.issubdtype(sim.dtype, np.floating) else sim.astype(np.float64)


def _ranks(scores: np.ndarray, correct: np.ndarray, ties: TieMode) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of ``correct[i]`` within ``scores[i]`` (which contains it), one or more per row, and which of
    them are misses whatever their rank (a NaN correct score in strict mode)."""
    if ties not in ("strict", "official"):
        raise ValueError(f"ties must be 'strict' or 'official', not {ties!r}")
    greater = np.empty(len(correct), dtype=np.int64)
    equal = np.empty(len(correct), dtype=np.int64)
    for start in range(0, len(correct), _BLOCK_ROWS):
        rows = scores[start : start + _BLOCK_ROWS]
        target = correct[start : start + _BLOCK_ROWS, None]
        greater[start : start + len(rows)] = (rows > target).sum(axis=1)
        equal[start : start + len(rows)] = (rows == target).sum(axis=1)

    if ties == "strict":
        missed = np.isnan(correct)
        return np.where(missed, scores.shape[1] - 1, greater), missed

    equal[~np.isfinite(correct)] = 0
    # Each tied row contributes the run greater, greater+1, …, greater+equal-1.
    first = np.repeat(greater, equal)
    offset = np.arange(len(first)) - np.repeat(np.cumsum(equal) - equal, equal)
    return first + offset, np.zeros(len(first), dtype=bool)


def _summarise(ranks: np.ndarray, missed: np.ndarray) -> dict[str, float]:
    keys = [f"R@{k}" for k in RECALL_KS] + ["MdR", "MnR"]
    if len(ranks) == 0:
        return dict.fromkeys(keys, float("nan"))
    result = {f"R@{k}": float(100.0 * np.mean((ranks < k) & ~missed)) for k in RECALL_KS}
    result["MdR"] = float(np.median(ranks) + 1)
    result["MnR"] = float(np.mean(ranks) + 1)
    return result
