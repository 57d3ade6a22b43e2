"""``ts2 index``: scan folders, decode T frames per new or changed video, embed, and store them in the library.

Decoding runs in worker threads ahead of the model through a bounded queue (PyAV releases the GIL while it
decodes), batches span videos so the model stays busy, and the library commits every few videos so an
interrupted run loses at most one batch and resumes where it stopped.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import SampledVideo, sample_frames
from .errors import Ts2Error
from .model import LoadedModel
from .scan import check_roots, fingerprint, scan_videos
from .store import Library


@dataclass(frozen=True)
class IndexOptions:
    roots: list[Path]
    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    batch_size: int = 8
    workers: int | None = None
    """Decoding threads; None picks from the number of cores."""
    rebuild: bool = False
    retry_failed: bool = False
    commit_every: int = 16
    """Videos per SQLite commit: what a kill -9 can lose at most."""


@dataclass
class IndexSummary:
    indexed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "removed": self.removed,
            "failed": len(self.failed),
            "failures": [{"path": p, "reason": r} for p, r in self.failed],
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Work:
    path: Path
    size: int
    mtime: float
    fingerprint: str


class Progress:
    """What the indexer reports while it runs; the CLI draws it with rich, tests ignore it."""

    def planned(self, total: int) -> None: ...

    def done(self, path: Path, outcome: str) -> None: ...


ANN_SAVE_INTERVAL_S = 300.0


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def index_folders(
    library: Library, model: LoadedModel, options: IndexOptions, progress: Progress | None = None
) -> IndexSummary:
    """Bring the library up to date with the video files under ``options.roots``."""
    started = time.perf_counter()
    progress = progress or Progress()
    roots = check_roots(options.roots)
    library.check_model(model.identity, rebuild=options.rebuild)
    summary = IndexSummary()
    library.begin_scan(roots)
    todo = list(_plan(library, scan_videos(roots, options.exclude, options.include_hidden), options, summary))
    library.commit()
    progress.planned(len(todo))
    _embed_all(library, model, todo, options, summary, progress)
    summary.removed = len(library.sweep_unseen(roots))
    library.commit()
    library.save_ann()
    summary.seconds = time.perf_counter() - started
    return summary


def _plan(library: Library, files: Iterable[Path], options: IndexOptions, summary: IndexSummary) -> Iterator[_Work]:
    """Decide per file: unchanged (skip), moved or copied (reuse features), or to embed."""
    for path in files:
        try:
            stat = path.stat()
        except OSError as error:
            _record_failure(library, summary, path, 0, 0.0, None, f"cannot read file: {error.strerror}")
            continue
        row = library.get_by_path(str(path))
        unchanged = row is not None and row.size == stat.st_size and row.mtime == stat.st_mtime
        if unchanged and (row.status == "ok" or not options.retry_failed):
            library.mark_seen(row.id)
            if row.status == "ok":
                summary.unchanged += 1
            else:  # reported again, not decoded again
                summary.failed.append((row.path, row.error or "failed"))
            continue
        try:
            digest = fingerprint(path)
        except OSError as error:
            _record_failure(library, summary, path, stat.st_size, stat.st_mtime, None, _os_reason(error))
            continue
        if row is not None and row.status == "ok" and row.fingerprint == digest:
            library.move(row.id, str(path), stat.st_mtime)  # touched, same content: keep features
            summary.unchanged += 1
            continue
        if row is None and _reuse_same_content(library, path, stat, digest):
            summary.moved += 1
            continue
        yield _Work(path, stat.st_size, stat.st_mtime, digest)


def _reuse_same_content(library: Library, path: Path, stat: os.stat_result, digest: str) -> bool:
    """A renamed or moved file keeps its features (and its id); a copy gets a copy of them."""
    for twin in library.find_by_fingerprint(digest, stat.st_size):
        if twin.status != "ok":
            continue
        if not Path(twin.path).exists():
            library.move(twin.id, str(path), stat.st_mtime)
            return True
        frames = library.frame_features([twin.id]).get(twin.id)
        if frames is None:
            continue
        library.put_video(
            str(path),
            size=stat.st_size,
            mtime=stat.st_mtime,
            fingerprint=digest,
            duration=twin.duration or 0.0,
            width=twin.width or 0,
            height=twin.height or 0,
            frame_times=twin.frame_times,
            frames=frames,
            global_vector=global_vector(frames),
        )
        return True
    return False


def global_vector(frames: np.ndarray) -> np.ndarray:
    """One vector per video for the ANN candidate stage: the mean of its unit frame features, normalised."""
    unit = frames / np.maximum(np.linalg.norm(frames, axis=1, keepdims=True), 1e-12)
    mean = unit.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def _embed_all(
    library: Library,
    model: LoadedModel,
    todo: list[_Work],
    options: IndexOptions,
    summary: IndexSummary,
    progress: Progress,
) -> None:
    since_commit = 0
    last_save = time.monotonic()
    batch: list[tuple[_Work, SampledVideo]] = []
    try:
        for work, result in decode_ahead(todo, model, options.workers or default_workers(), options.batch_size):
            if isinstance(result, str):
                _record_failure(library, summary, work.path, work.size, work.mtime, work.fingerprint, result)
                progress.done(work.path, "failed")
                continue
            batch.append((work, result))
            if len(batch) >= options.batch_size:
                since_commit += _embed_batch(library, model, batch, summary, progress)
                batch = []
            if since_commit >= options.commit_every:
                library.commit()
                since_commit = 0
            if time.monotonic() - last_save > ANN_SAVE_INTERVAL_S:
                # searches during a long run would otherwise rebuild the ANN index from SQLite each time
                library.save_ann()
                last_save = time.monotonic()
        if batch:
            _embed_batch(library, model, batch, summary, progress)
    finally:
        library.commit()  # whatever finished is kept, also on Ctrl-C


def decode_ahead(
    todo: list[_Work], model: LoadedModel, workers: int, batch_size: int
) -> Iterator[tuple[_Work, SampledVideo | str]]:
    """Decoded videos in ``todo`` order, with up to ``2 × batch_size`` decodes running ahead; failures are
    returned as one-line reasons instead of raised."""
    frames, size = model.config.frames, model.image_size
    ahead = max(2 * batch_size, workers)
    queue: deque[tuple[_Work, Future[SampledVideo]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ts2-decode") as pool:
        pending = iter(todo)
        try:
            for work in pending:
                queue.append((work, pool.submit(sample_frames, work.path, frames, size)))
                if len(queue) >= ahead:
                    yield _result(*queue.popleft())
            while queue:
                yield _result(*queue.popleft())
        finally:
            for _, future in queue:
                future.cancel()


def _result(work: _Work, future: Future[SampledVideo]) -> tuple[_Work, SampledVideo | str]:
    try:
        return work, future.result()
    except Ts2Error as error:
        return work, str(error)
    except Exception as error:  # a broken file must never abort the run
        return work, f"could not decode: {type(error).__name__}: {error}".splitlines()[0]


def _embed_batch(
    library: Library,
    model: LoadedModel,
    batch: list[tuple[_Work, SampledVideo]],
    summary: IndexSummary,
    progress: Progress,
) -> int:
    pixels, mask = model.video_batch([video.frames for _, video in batch])
    features, valid = model.encode_pixels(pixels, mask)
    for (work, video), video_features, video_mask in zip(batch, features, valid, strict=True):
        frames = video_features[video_mask]
        library.put_video(
            str(work.path),
            size=work.size,
            mtime=work.mtime,
            fingerprint=work.fingerprint,
            duration=video.duration,
            width=video.width,
            height=video.height,
            frame_times=video.times[: len(frames)],
            frames=frames,
            global_vector=global_vector(frames),
        )
        summary.indexed += 1
        progress.done(work.path, "indexed")
    return len(batch)


def _record_failure(
    library: Library,
    summary: IndexSummary,
    path: Path,
    size: int,
    mtime: float,
    digest: str | None,
    reason: str,
) -> None:
    library.put_failure(str(path), size=size, mtime=mtime, fingerprint=digest, error=reason)
    summary.failed.append((str(path), reason))


def _os_reason(error: OSError) -> str:
    return "permission denied" if error.errno == errno.EACCES else f"cannot read file: {error.strerror}"
