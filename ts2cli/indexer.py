"""``ts2 index``: scan folders, decode T frames per new or changed video, embed, and store them in the library.

Decoding runs in worker threads ahead of the model through a bounded window (PyAV and torch release the GIL,
so decoders and model workers run in parallel), batches span videos so the model stays busy, and the library
commits every few videos so an interrupted run loses at most one batch and resumes where it stopped.

Memory does not grow with the library: frames arrive already resized to the model's input (swscale, in
``sample_frames``: 12 × 224² × 3 bytes = 1.8 MB a video), at most ``(model_workers + 1) × batch_size`` videos
are decoded ahead, and at most ``model_workers`` batches are in the model (on the CPU by default: 24 videos,
~45 MB of frames, plus two batches of activations). ``PipelineStats`` records where the time went;
``benchmarks/index_bench.py`` measures the pipeline against a plain loop and the model against the hardware.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import text_encoder
from .cores import available_cores
from .decode import SampledVideo, decode_ahead, sample_frames
from .errors import LibraryError, Ts2Error
from .model_record import MODEL_SOURCE_KEY, same_model
from .scan import ScanRules, check_roots, file_digest, fingerprint_and_stat, scan_videos
from .search import global_vector
from .store import REBUILD_DIR, Library, VideoRow, printable_path, storable_path

if TYPE_CHECKING:  # torch and the model are imported only when a video is to be embedded (``ModelOnDemand``)
    import torch

    from .model import LoadedModel


@dataclass(frozen=True)
class IndexOptions:
    roots: list[Path]
    """Folders (or files) to index; none: every folder the library covers, each with its recorded rules
    (``Library.folder_rules``)."""
    exclude: tuple[str, ...] | None = None
    """Globs of files and folders to skip in ``roots``; None: each root's recorded ones (none for a new root)."""
    include_hidden: bool | None = None
    """Whether to count hidden files and folders in ``roots``; None: as recorded for each root (no for a new one)."""
    batch_size: int | None = None
    """Videos per model batch; None picks for the device (``default_batch_size``)."""
    workers: int | None = None
    """Decoding threads; None picks from the number of cores (``thread_plan``)."""
    model_workers: int | None = None
    """Threads running model batches side by side; None picks for the device (``thread_plan``)."""
    torch_threads: int | None = None
    """torch threads per model worker; None picks from the number of cores (``thread_plan``)."""
    rebuild: bool = False
    retry_failed: bool = False
    commit_every: int = 16
    """Videos per SQLite commit: what a kill -9 can lose at most."""
    commit_seconds: float = 30.0
    """The longest time stored videos wait for a commit: long videos take that long to decode, and a kill -9 (an
    out-of-memory kill, say) must not cost 16 of them."""


@dataclass
class IndexSummary:
    indexed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    failed_unchanged: int = 0
    """Of ``failed``, the files that failed before and have not changed since (not tried again)."""
    seconds: float = 0.0
    pipeline: PipelineStats = field(default_factory=lambda: PipelineStats())
    folders: list[str] = field(default_factory=list)
    """The roots scanned."""
    skipped_folders: list[tuple[str, str]] = field(default_factory=list)
    """(root, why) for the library's folders that a run naming no folder could not scan; their videos are kept."""
    vacated_folders: list[str] = field(default_factory=list)
    """The library's folders that are not there now and whose videos all moved away in this run (a renamed folder
    indexed under its new name): taken off the library's folders."""
    cut_short: list[tuple[str, str]] = field(default_factory=list)
    """(path, what) for videos indexed from the frames that decoded, which ran out well before the duration their
    container states (a truncated download, a damaged tail); counted in ``indexed`` too."""

    def to_json(self) -> dict[str, object]:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "removed": self.removed,
            "failed": len(self.failed),
            "failures": [{"path": p, "reason": r} for p, r in self.failed],
            "failed_unchanged": self.failed_unchanged,
            "folders": self.folders,
            "skipped_folders": [{"path": p, "reason": r} for p, r in self.skipped_folders],
            "vacated_folders": self.vacated_folders,
            "cut_short": [{"path": p, "reason": r} for p, r in self.cut_short],
            "seconds": round(self.seconds, 3),
            "pipeline": self.pipeline.to_json(),
        }


@dataclass
class PipelineStats:
    """Where the decode → embed phase spent its time. A few clock reads per video and per batch: always on.

    Two pools work side by side: ``workers`` decode threads and ``model_workers`` model threads, each either
    busy or idle. A decoder idles when the window of decoded videos is full (the model is behind) or the work
    has run out; a model thread idles when no decoded batch is ready (decoding is behind), at the start of the
    run, and while the calling thread stores results.
    """

    workers: int = 0
    model_workers: int = 0
    torch_threads: int = 0
    """torch threads per model worker."""
    batch_size: int = 0
    dtype: str | None = None
    """The precision the model ran in (see ``LoadedModel.dtype``), known after the first batch; None if no video
    reached the model."""
    videos: int = 0
    """Videos decoded (successfully or not)."""
    batches: int = 0
    frames: int = 0
    """Frames run through the model."""
    wall_seconds: float = 0.0
    """The decode → embed phase, first decode submitted to last video stored."""
    cpu_seconds: float = 0.0
    """CPU time of the whole process during the phase, all threads: a cost that does not depend on how much of
    the machine other programs take."""
    decode_seconds: float = 0.0
    """Sum over decode workers of the time spent inside ``sample_frames``."""
    infer_seconds: float = 0.0
    """Sum over model workers of the time spent building batches and running the model."""
    wait_decode_seconds: float = 0.0
    """Calling thread blocked on a decode result."""
    store_seconds: float = 0.0
    """Calling thread writing features to the library (SQLite, commits)."""

    def shares(self) -> dict[str, float]:
        """Average fraction of each pool that sat idle over the phase, waiting on the other (or on nothing)."""
        wall = max(self.wall_seconds, 1e-9)
        return {
            "model_idle": max(0.0, 1.0 - self.infer_seconds / (max(self.model_workers, 1) * wall)),
            "decode_idle": max(0.0, 1.0 - self.decode_seconds / (max(self.workers, 1) * wall)),
        }

    def bottleneck(self) -> str:
        """The busier side: 'decode' when the model threads idled more than the decoders, else 'model'."""
        shares = self.shares()
        return "decode" if shares["model_idle"] > shares["decode_idle"] else "model"

    def to_json(self) -> dict[str, object]:
        seconds = {
            "wall": self.wall_seconds,
            "cpu": self.cpu_seconds,
            "decode": self.decode_seconds,
            "infer": self.infer_seconds,
            "wait_decode": self.wait_decode_seconds,
            "store": self.store_seconds,
        }
        return {
            "workers": self.workers,
            "model_workers": self.model_workers,
            "torch_threads": self.torch_threads,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "videos": self.videos,
            "batches": self.batches,
            "frames": self.frames,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "shares": {k: round(v, 3) for k, v in self.shares().items()},
            "bottleneck": self.bottleneck() if self.videos else None,
        }


@dataclass(frozen=True)
class _Work:
    path: Path
    size: int
    mtime: float
    fingerprint: str


class Progress:
    """What the indexer reports while it runs; the CLI draws it with rich, tests ignore it."""

    def stage(self, description: str) -> None:
        """A step of unknown length has begun."""

    def scanned(self, files: int) -> None:
        """``files`` video files found so far (before ``planned``)."""

    def planned(self, total: int) -> None: ...

    def done(self, path: Path, outcome: str, reason: str = "") -> None:
        """One video is through: ``outcome`` "indexed" (``reason``, if any, what was wrong with it), "failed"
        (``reason`` says why) or "gone"."""

    def skipped(self, path: str, reason: str) -> None:
        """A file found that fails before it is planned (unreadable, a name the library cannot hold)."""


ANN_SAVE_INTERVAL_S = 300.0
KEYFRAME_SNAP = 0.25
"""Let each sampling target move by up to a quarter of its segment to just past a keyframe. Exact targets cost
decoding from a keyframe up to each target: a 10-minute H.264 file (keyframe every 10 s) took 9× as long as a
10-second one, 0.93× with snapping (benchmarks/decode_bench.py). Search needs frames spread over the video, not
frames at exact instants; ``ts2 eval`` keeps exact targets."""


@dataclass(frozen=True)
class ThreadPlan:
    workers: int
    """Decode threads."""
    model_workers: int
    """Threads each running a model batch."""
    torch_threads: int
    """torch intra-op threads per model worker."""


# Decoding 12 frames costs a fifth to a third of what the model costs per video on the CPU (640x360 H.264,
# ViT-B/32 bf16, benchmarks/index_bench.py): a quarter of the cores decode, and never fewer than two decoders,
# so that the first batches fill quickly and one slow file does not starve the model.
DECODE_SHARE = 0.25
MIN_DECODERS = 2


def thread_plan(
    device: torch.device,
    workers: int | None = None,
    torch_threads: int | None = None,
    model_workers: int | None = None,
) -> ThreadPlan:
    """How to split the cores between decoding and the model; explicit choices win.

    On the CPU two batches run side by side, each on half of the remaining cores, rather than one batch on
    all of them: torch's OpenMP threads meet at a barrier after every operation, so when one is preempted (by
    a decoder, or by any other program) the others wait, while independent single-threaded workers just share
    the cores. Measured on 2 cores shared with other programs (docs/benchmarks.md, "Indexing"): one torch
    thread ran a forward 1.3-2× faster than two under load; in the indexer, 2 decoders + 2 model workers × 1
    thread was the fastest choice or within the noise of it both with and without load. On CUDA the GPU
    waits on decoding, so every core decodes.
    """
    cores = available_cores()
    if device.type == "cuda":
        return ThreadPlan(workers or max(1, min(cores, 16)), model_workers or 1, torch_threads or 1)
    decoders = workers or max(MIN_DECODERS, round(cores * DECODE_SHARE))
    runners = model_workers or (2 if cores > 1 else 1)
    return ThreadPlan(decoders, runners, torch_threads or max(1, (cores - decoders) // runners))


def default_batch_size(device: torch.device) -> int:
    """Videos per forward. On the CPU 4 videos are 4 × 12 × 50 = 2400 tokens, already enough for efficient
    matrix products, and small batches let both model workers start early: with 8, a 14-video run became one
    batch per worker and the second waited for all 14 decodes (model idle 23%). A GPU wants big batches."""
    return 32 if device.type == "cuda" else 4


class ModelOnDemand:
    """A model loaded the first time it is needed, from ``request`` (``model_request``, None if unknown).

    When the library's model record was last loaded from the same request (``Library.loaded_from``), the record
    stands for the model's identity, and a run with nothing to embed never loads it: re-indexing unchanged
    folders then skips importing torch and open_clip, most of its time (6.3 of 8.5 s here).
    """

    def __init__(self, load: Callable[[], LoadedModel], request: dict[str, Any] | None = None) -> None:
        self._load, self.request = load, request
        self._model: LoadedModel | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> LoadedModel:
        if self._model is None:
            self._model = self._load()
        return self._model

    def recorded_in(self, library: Library) -> bool:
        """Whether ``library``'s model record stands for this model without loading it. The files it was loaded
        from must be there too: a tag's download deleted from open_clip's cache is fetched again before the
        progress bar starts, not inside it."""
        if self.request is None or library.loaded_from() != self.request:
            return False
        source = (library.model_config() or {}).get(MODEL_SOURCE_KEY) or {}
        return all(Path(source[key]).is_file() for key in ("weights_file", "checkpoint") if source.get(key))


def model_request(
    model: str, pretrained: str | None, checkpoint: Path | None, compat: str | None, topk: str | None = None
) -> dict[str, Any]:
    """The model options of a command line in a form that two runs can compare: local files by resolved path and
    content digest (a checkpoint retrained in place is another request), tags such as ``openai`` as given."""

    def local(name: str | Path | None) -> dict[str, str] | None:
        if not name or not Path(name).expanduser().is_file():
            return None
        return {"path": str(stored_form(name)), "sha256": file_digest(name)}

    return {
        "model": local(model) if model.endswith(".json") else model,
        "pretrained": local(pretrained) or pretrained,
        "checkpoint": local(checkpoint) or (str(checkpoint) if checkpoint else None),
        "compat": compat,
        # only when named: a request recorded before the option existed then still matches one that names none
        **({"topk": topk} if topk else {}),
    }


def library_model(library: Library, device: str = "auto", precision: str = "auto") -> ModelOnDemand | None:
    """The library's own model, loaded on demand: what ``ts2 index`` runs when no model option is named (as ``ts2
    search`` does). Its request is the one the library's record was last loaded from, else its recorded source.
    None for a library that records no model."""
    source = (library.model_config() or {}).get(MODEL_SOURCE_KEY)
    if not source:
        return None

    def load() -> LoadedModel:
        from .query import load_library_model

        return load_library_model(library, None, device=device, text_only=False, precision=precision)

    return ModelOnDemand(load, library.loaded_from() or {"library_model": source})


def index_folders(
    library: Library, model: LoadedModel | ModelOnDemand, options: IndexOptions, progress: Progress | None = None
) -> IndexSummary:
    """Bring the library up to date with the video files under ``options.roots`` (``options.rebuild``: build it
    anew from them, see ``_rebuild``)."""
    started = time.perf_counter()
    progress = progress or Progress()
    source = model if isinstance(model, ModelOnDemand) else ModelOnDemand(lambda: model)
    if options.rebuild:
        return _rebuild(library, source, options, progress)
    summary = IndexSummary()
    rules = _folders_to_scan(library, options, summary)
    roots = list(rules)
    if not source.recorded_in(library):
        _adopt_model(library, source, progress)
    aliases = _aliases(library, roots)
    absent = _absent_folders_with_videos(library, [*roots, *aliases])
    # Paths are stored resolved: videos reached through symlinks lie outside the roots, and are swept with them.
    linked_before, others = library.linked_areas([*roots, *aliases])
    library.begin_scan([*roots, *aliases, *linked_before])
    progress.scanned(0)
    linked: dict[Path, dict[Path, Path]] = {}
    found = scan_videos(roots, linked=linked, rules=rules)
    copies: list[_Work] = []
    todo = _plan(library, _counted(found, progress), options, summary, copies, progress)
    library.remember_links(linked, keep_old=True)  # an interrupted run must not forget what it has to sweep
    library.remember_rules(rules)
    library.commit()
    if todo and not source.loaded:
        progress.stage("loading the model")
        _adopt_model(library, source, progress)
    progress.planned(len(todo))
    if todo:
        _embed_all(library, source.get(), todo, options, summary, progress)
    if orphans := _take_from_originals(library, copies, summary, progress):
        _embed_all(library, source.get(), orphans, options, summary, progress)
    # A file still there under another root of the library (a hidden or excluded folder indexed by name inside
    # these roots, or a folder around them) is that root's to keep or drop: only a scan of that root removes it.
    library.keep_present(others)
    removed = library.sweep_unseen([*roots, *aliases]) + library.sweep_unseen(linked_before, spare=others)
    summary.removed = len(removed)
    library.remember_links(linked)
    vacated = [root for root, also in absent.items() if not library.count_under(root, also=also)]
    summary.vacated_folders = [str(root) for root in vacated]
    library.forget_roots([*aliases, *vacated])
    library.commit()
    library.save_ann()
    summary.seconds = time.perf_counter() - started
    return summary


def _absent_folders_with_videos(library: Library, scanned: list[Path]) -> dict[Path, list[str]]:
    """The library's folders, other than ``scanned``, that are not there now but hold videos, with the places
    their links led to: one whose videos all move away in this run was renamed, not unplugged."""
    links = library.linked_places()
    absent = {root: links.get(str(root), []) for root in library.folder_rules() if root not in scanned}
    return {root: also for root, also in absent.items() if not root.exists() and library.count_under(root, also=also)}


def _folders_to_scan(library: Library, options: IndexOptions, summary: IndexSummary) -> dict[Path, ScanRules]:
    """The roots to scan, each with its rules: the named ones with the run's, else the library's own folders with
    those they were last scanned with. A folder of the library that is not there now (an unplugged drive) or whose
    rules were never recorded is left alone, its videos kept, and listed in ``summary.skipped_folders``."""
    if options.roots:
        recorded = library.folder_rules()
        rules = {root: _rules_for(recorded.get(root), options) for root in check_roots(options.roots)}
    else:
        recorded = require_folders(library)
        usable = {root: rule for root, rule in recorded.items() if rule is not None and root.exists()}
        # A folder that is a symlink now (moved to a bigger disk, a link left in its place) is scanned where it
        # leads, as naming it would; the rules recorded for that place itself come last and win.
        rules = {stored_form(root): usable[root] for root in sorted(usable, key=lambda root: root == stored_form(root))}
        unusable = {root: _why_skipped(root) for root in recorded if root not in usable}
        summary.skipped_folders = [(str(root), why) for root, (_, why) in unusable.items()]
        skipped = ", ".join(f"{root} ({briefly})" for root, (briefly, _) in unusable.items())
        if options.rebuild and skipped:  # a rebuild forgets every video, theirs too: the user must choose
            raise Ts2Error(
                f"--rebuild would forget the videos of {skipped}; "
                "name the folders to rebuild, or `ts2 forget` the ones you no longer want first."
            )
        if not rules:
            raise Ts2Error(f"None of the library's folders can be updated: {skipped}.")
    summary.folders = [str(root) for root in rules]
    return rules


def _rules_for(recorded: ScanRules | None, options: IndexOptions) -> ScanRules:
    """A named root's rules: what the options name, and for what they leave out what the root was last indexed
    with (``ts2 index ~/Videos`` again keeps its --exclude globs)."""
    recorded = recorded or ScanRules()
    return ScanRules(
        recorded.exclude if options.exclude is None else tuple(options.exclude),
        recorded.include_hidden if options.include_hidden is None else options.include_hidden,
    )


def _aliases(library: Library, roots: list[Path]) -> list[Path]:
    """The library's folders that are not among ``roots`` but lead to one of them now (a folder moved elsewhere,
    a symlink left in its place): their videos are swept with that root's, and the folder leaves the list."""
    return [root for root in library.folder_rules() if root not in roots and stored_form(root) in roots]


def _why_skipped(root: Path) -> tuple[str, str]:
    """Why a folder of the library is not scanned: in a few words, and in full with what to do about it."""
    if not root.exists():
        return "not there now", f"not there now; its videos are kept (`ts2 forget {root}` removes them)"
    briefly = "indexed by an older ts2"
    return briefly, f"{briefly}, which did not record its --exclude and --hidden; index it once by name"


def require_folders(library: Library) -> dict[Path, ScanRules | None]:
    """The library's folders and their rules (``Library.folder_rules``); Ts2Error if it covers none."""
    recorded = library.folder_rules()
    if not recorded:
        raise Ts2Error("The library covers no folder yet: name one to index, e.g. ts2 index ~/Videos.")
    return recorded


def forget(library: Library, places: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Remove the videos (and failed files) at or under ``places`` from the library, whether or not they still
    exist (a deleted folder cannot be indexed again to sweep it); the files are not touched. Returns the paths
    removed, sorted."""
    where = [stored_form(place) for place in places]
    # The library's folders at or under them leave its list, with what their symlinks led to, but for what the
    # library's other folders cover.
    roots = [root for root in library.folder_rules() if any(root.is_relative_to(place) for place in where)]
    linked, others = library.linked_areas(roots)
    library.begin_scan([*where, *linked])  # every row under them unseen, then swept
    removed = sorted(library.sweep_unseen(where) + library.sweep_unseen(linked, spare=others))
    library.forget_roots(roots)
    library.commit()
    library.save_ann()
    return removed


def stored_form(place: str | os.PathLike[str]) -> Path:
    """A path as the library stores it (absolute, symlinks resolved), also for a path that is gone."""
    return Path(place).expanduser().resolve()


def _rebuild(library: Library, source: ModelOnDemand, options: IndexOptions, progress: Progress) -> IndexSummary:
    """``--rebuild``: index the folders into a new library inside this one (``REBUILD_DIR``), then let it take this
    one's place in one transaction. Until then the library stays as it was, searchable, also if the run stops; run
    again with the same model, the rebuild goes on where it stopped. Other folders' videos are forgotten: they
    were embedded by the old model."""
    started = time.perf_counter()
    rules = _folders_to_scan(library, options, IndexSummary())  # refuses to forget the videos of absent folders
    held_before = library.paths()
    staged_dir = library.directory / REBUILD_DIR
    with _staged_library(staged_dir) as staged:
        identity = source.get().identity
        if (stored := staged.model_config()) is not None and not same_model(stored, identity):
            staged.clear(identity)  # stopped with another model: start again
        # A stopped rebuild of other folders: what it did there is not asked for now.
        if others := [root for root in staged.folder_rules() if root not in rules]:
            forget(staged, others)
        # Each folder with the rules it is to be indexed with: those the command names, else the library's own.
        staged.remember_links({root: {} for root in rules}, keep_old=True)
        staged.remember_rules(rules)
        staged.commit()
        summary = index_folders(staged, source, replace(options, rebuild=False), progress)
    library.take_over(staged_dir)
    with contextlib.suppress(OSError):  # written for the same model: no need to export it again
        os.replace(staged_dir / text_encoder.FILE_NAME, text_encoder.path_for(library))
    _adopt_model(library, source, progress)
    library.save_ann()
    shutil.rmtree(staged_dir, ignore_errors=True)
    summary.removed = len(held_before - library.paths())
    summary.seconds = time.perf_counter() - started
    return summary


def _staged_library(directory: Path) -> Library:
    """The library a rebuild builds; one that cannot be read (damaged by a crash, written by a newer ts2) is only
    an unfinished rebuild, thrown away and begun again."""
    try:
        return Library.open(directory, write=True, create=True)
    except LibraryError:
        shutil.rmtree(directory, ignore_errors=True)
        return Library.open(directory, write=True, create=True)


def _adopt_model(library: Library, source: ModelOnDemand, progress: Progress) -> None:
    """Load the model, check it against the library's record (a new library adopts it), write its text encoder
    copy, and remember what it was loaded from."""
    model = source.get()
    library.check_model(model.identity)
    if text_encoder.writable(model) and not text_encoder.is_current(library):
        progress.stage("writing the text encoder for ts2 search")
        text_encoder.save_text_encoder(library, model)  # what lets `ts2 search` answer without torch
    if source.request is not None:
        library.remember_loaded_from(source.request)


def _counted(files: Iterable[Path], progress: Progress) -> Iterator[Path]:
    for count, path in enumerate(files, start=1):
        progress.scanned(count)
        yield path


def _plan(
    library: Library,
    files: Iterable[Path],
    options: IndexOptions,
    summary: IndexSummary,
    copies: list[_Work],
    progress: Progress,
) -> list[_Work]:
    """The files to embed. Decides per file, and records in the library and ``summary`` as it goes: unchanged
    (marked seen), moved or copied (features reused), unreadable (a failure), or to embed. A file with the same
    content as one already planned goes to ``copies``: it takes that one's features once they exist."""
    todo: list[_Work] = []
    planned: set[tuple[str, int]] = set()
    for path in files:
        if not storable_path(path):  # reported, not recorded: the library cannot hold its name
            unnamed = (printable_path(path), "the file name is not valid UTF-8 (rename it to index it)")
            summary.failed.append(unnamed)
            progress.skipped(*unnamed)
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # deleted since the scan found it: unseen, so its row (if any) is swept
        except OSError as error:
            _record_skip(library, summary, progress, path, 0, 0.0, None, f"cannot read file: {error.strerror}")
            continue
        row = library.get_by_path(str(path))
        unchanged = row is not None and row.size == stat.st_size and row.mtime == stat.st_mtime
        if unchanged and (row.status == "ok" or not options.retry_failed):
            library.mark_seen(row.id)
            if row.status == "ok":
                summary.unchanged += 1
            else:  # reported again, not decoded again
                summary.failed.append((row.path, row.error or "failed"))
                summary.failed_unchanged += 1
            continue
        try:
            digest, stat = fingerprint_and_stat(path)
        except FileNotFoundError:
            continue
        except OSError as error:
            _record_skip(library, summary, progress, path, stat.st_size, stat.st_mtime, None, _os_reason(error))
            continue
        if row is not None and row.status == "ok" and row.fingerprint == digest:
            library.move(row.id, str(path), stat.st_mtime)  # touched, same content: keep features
            summary.unchanged += 1
            continue
        work = _Work(path, stat.st_size, stat.st_mtime, digest)
        if row is None and _reuse_same_content(library, work, library.find_by_fingerprint(digest, stat.st_size)):
            summary.moved += 1
        elif (digest, stat.st_size) in planned:
            copies.append(work)
        else:
            planned.add((digest, stat.st_size))
            todo.append(work)
    return todo


def _take_from_originals(
    library: Library, copies: list[_Work], summary: IndexSummary, progress: Progress
) -> list[_Work]:
    """Give each copy of a file embedded in this run that file's features, or its failure (the same bytes fail
    the same way); returns the copies whose original left neither (it vanished mid-run), to be embedded."""
    orphans = []
    for work in copies:
        twins = library.find_by_fingerprint(work.fingerprint, work.size)
        if _reuse_same_content(library, work, twins):
            summary.moved += 1
        elif reason := next((twin.error for twin in twins if twin.error), None):
            _record_skip(library, summary, progress, work.path, work.size, work.mtime, work.fingerprint, reason)
        else:
            orphans.append(work)
    return orphans


def _reuse_same_content(library: Library, work: _Work, twins: list[VideoRow]) -> bool:
    """A renamed or moved file keeps its features (and its id); a copy gets a copy of them. ``twins``: the
    library's rows with the file's fingerprint and size."""
    twins = [twin for twin in twins if twin.status == "ok"]
    for twin in twins:
        # gone, or now a way to this very file (a folder on its path became a symlink): moved, not copied. Looked
        # for first: of two identical files in a renamed folder, the second is the other one moved, not a copy of
        # the first in its new place.
        if not Path(twin.path).exists() or stored_form(twin.path) == work.path:
            library.move(twin.id, str(work.path), work.mtime)
            return True
    for twin in twins:
        frames = library.frame_features([twin.id]).get(twin.id)
        if frames is None:
            continue
        library.put_video(
            str(work.path),
            size=work.size,
            mtime=work.mtime,
            fingerprint=work.fingerprint,
            duration=twin.duration or 0.0,
            width=twin.width or 0,
            height=twin.height or 0,
            frame_times=twin.frame_times,
            frames=frames,
            global_vector=global_vector(frames),
        )
        return True
    return False


def _embed_all(
    library: Library,
    model: LoadedModel,
    todo: list[_Work],
    options: IndexOptions,
    summary: IndexSummary,
    progress: Progress,
) -> None:
    plan = thread_plan(model.device, options.workers, options.torch_threads, options.model_workers)
    if model.draws_noise:  # one batch at a time, in order, for reproducible features
        plan = replace(plan, model_workers=1)
    batch_size = options.batch_size or default_batch_size(model.device)
    stats = summary.pipeline
    stats.workers, stats.model_workers, stats.torch_threads = plan.workers, plan.model_workers, plan.torch_threads
    stats.batch_size = batch_size
    window = (plan.model_workers + 1) * batch_size  # the batches in the model, and the next one
    commits = _Commits(library, stats, options.commit_every, options.commit_seconds)
    last_save = time.monotonic()
    batch: list[tuple[_Work, SampledVideo]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with _torch_threads(plan.torch_threads), _ModelRunner(model, plan.model_workers, stats) as runner:
            for work, result in sample_ahead(todo, model, plan.workers, window, stats):
                if isinstance(result, str) and not work.path.exists():
                    progress.done(work.path, "gone")  # since the scan (deleted, its folder renamed): swept as such
                elif isinstance(result, str):
                    _record_failure(library, summary, work.path, work.size, work.mtime, work.fingerprint, result)
                    progress.done(work.path, "failed", result)
                    commits.add(1)  # a kill must not cost decoding a whole folder of broken files again
                else:
                    batch.append((work, result))
                if len(batch) >= batch_size:
                    runner.submit(batch)
                    batch = []
                for done in runner.finished():
                    commits.add(_store_batch(library, done, summary, progress, model.device))
                commits.add(0)  # the time may be up with nothing new stored
                if time.monotonic() - last_save > ANN_SAVE_INTERVAL_S:
                    # bounds the change log that searches during a long run apply to the saved ANN index
                    library.save_ann()
                    last_save = time.monotonic()
            if batch:
                runner.submit(batch)
            for done in runner.finished(wait_all=True):
                commits.add(_store_batch(library, done, summary, progress, model.device))
    finally:
        _timed_commit(library, stats)  # whatever was stored is kept, also on Ctrl-C
        stats.dtype = model.dtype_name if model.precision_known else None
        stats.wall_seconds += time.perf_counter() - started  # a second call (copies whose original vanished) adds
        stats.cpu_seconds += time.process_time() - cpu_started


@dataclass(frozen=True)
class _Embedded:
    frames: list[np.ndarray]
    """Per video, (n, D) float32 features of its n real frames (``LoadedModel.encode_frames``)."""
    seconds: float


@dataclass(frozen=True)
class _Running:
    batch: list[tuple[_Work, SampledVideo]]
    future: Future[_Embedded]


class _ModelRunner:
    """Runs batches on ``workers`` threads (torch releases the GIL, so they compute in parallel) and hands
    them back in submission order; the caller stores them, since the SQLite connection lives in its thread."""

    def __init__(self, model: LoadedModel, workers: int, stats: PipelineStats) -> None:
        self.model, self.workers, self.stats = model, workers, stats
        self.running: deque[_Running] = deque()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ts2-model")

    def __enter__(self) -> _ModelRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # On an error or Ctrl-C the batches not yet started are dropped; those running finish first.
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, batch: list[tuple[_Work, SampledVideo]]) -> None:
        model, videos = self.model, [video.frames for _, video in batch]
        if not model.precision_known:
            # Settled once, on the first batch, before several workers could race to do it.
            began = time.perf_counter()
            with _out_of_memory_says(model.device, len(batch)):
                model.choose_precision(*model.video_batch(videos))
            self.stats.infer_seconds += time.perf_counter() - began
        self.running.append(_Running(batch, self.pool.submit(_infer, model, videos)))
        self.stats.batches += 1

    def finished(self, *, wait_all: bool = False) -> Iterator[_Running]:
        """Batches done, oldest first. Waits for the oldest while every worker is busy (the decoders keep
        filling their window meanwhile), or for all of them with ``wait_all``."""
        while self.running and (wait_all or len(self.running) >= self.workers or self.running[0].future.done()):
            yield self.running.popleft()


def _infer(model: LoadedModel, videos: list[np.ndarray]) -> _Embedded:
    """Runs in a model worker."""
    began = time.perf_counter()
    frames = model.encode_frames(videos)
    return _Embedded(frames, time.perf_counter() - began)


def _store_batch(
    library: Library, done: _Running, summary: IndexSummary, progress: Progress, device: torch.device
) -> int:
    """Write a finished batch's features; a model error propagates from here and stops the run."""
    stats = summary.pipeline
    with _out_of_memory_says(device, len(done.batch)):
        embedded = done.future.result()
    began = time.perf_counter()
    stats.infer_seconds += embedded.seconds
    stats.frames += sum(len(frames) for frames in embedded.frames)
    for (work, video), frames in zip(done.batch, embedded.frames, strict=True):
        if not np.isfinite(frames).all():
            raise Ts2Error(
                f"The model's features for {work.path} are not finite numbers: its weights look damaged (a training "
                "run that diverged?). The videos indexed before are kept."
            )
        library.put_video(
            str(work.path),
            size=work.size,
            mtime=work.mtime,
            fingerprint=work.fingerprint,
            duration=video.playable_seconds,
            width=video.width,
            height=video.height,
            frame_times=video.times[: len(frames)],
            frames=frames,
            global_vector=global_vector(frames),
        )
        summary.indexed += 1
        cut_short = _cut_short_note(video)
        if cut_short:
            summary.cut_short.append((printable_path(work.path), cut_short))
        progress.done(work.path, "indexed", cut_short)
    stats.store_seconds += time.perf_counter() - began
    return len(done.batch)


def _cut_short_note(video: SampledVideo) -> str:
    if not video.cut_short:
        return ""
    return (
        f"its frames end at {video.times[-1]:.1f} s of the {video.duration:.1f} s its file states (truncated or "
        "damaged?); indexed from what decodes"
    )


def _out_of_memory_says(device: torch.device, videos: int) -> contextlib.AbstractContextManager[None]:
    from .model import out_of_memory_says

    return out_of_memory_says(
        f"embedding a batch of {videos} video{'s' if videos != 1 else ''} on {device.type}",
        "run again with a smaller --batch-size (the videos indexed so far are kept)",
    )


@dataclass
class _Commits:
    """Commits the stored videos every ``every`` of them or ``seconds`` after the last commit, whichever comes
    first: what a kill -9 can cost."""

    library: Library
    stats: PipelineStats
    every: int
    seconds: float
    uncommitted: int = 0
    last: float = field(default_factory=time.monotonic)

    def add(self, stored: int) -> None:
        self.uncommitted += stored
        overdue = self.uncommitted and time.monotonic() - self.last >= self.seconds
        if self.uncommitted >= self.every or overdue:
            _timed_commit(self.library, self.stats)
            self.uncommitted, self.last = 0, time.monotonic()


def _timed_commit(library: Library, stats: PipelineStats) -> None:
    started = time.perf_counter()
    library.commit()
    stats.store_seconds += time.perf_counter() - started


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count for the duration of the run, restored afterwards (it is process-wide)."""
    import torch

    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@dataclass(frozen=True)
class _Timed:
    video: SampledVideo
    seconds: float


def sample_ahead(
    todo: list[_Work], model: LoadedModel, workers: int, window: int, stats: PipelineStats | None = None
) -> Iterator[tuple[_Work, SampledVideo | str]]:
    """Decoded videos in ``todo`` order, with up to ``window`` decodes submitted ahead of the consumer;
    failures come as one-line reasons instead of exceptions (``decode.decode_ahead``), with time counted.

    The window bounds memory (each decoded video holds T frames at the model's input size) and is what lets
    the decoders run ahead while the model works on a batch: two batches' worth keeps the next batch ready.
    """
    stats = stats if stats is not None else PipelineStats()
    sample = partial(_timed_sample, frames=model.config.frames, size=model.image_size)
    with contextlib.closing(decode_ahead(todo, sample, workers, window)) as decoded:
        while True:
            began = time.perf_counter()
            outcome = next(decoded, None)
            stats.wait_decode_seconds += time.perf_counter() - began
            if outcome is None:
                return
            work, result = outcome
            stats.videos += 1
            if isinstance(result, str):  # a failure: reported and skipped
                yield work, result
            else:
                stats.decode_seconds += result.seconds
                yield work, result.video


def _timed_sample(work: _Work, *, frames: int, size: int) -> _Timed:
    """Runs in a decode worker."""
    started = time.perf_counter()
    video = sample_frames(work.path, frames, size, keyframe_snap=KEYFRAME_SNAP)
    return _Timed(video, time.perf_counter() - started)


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


def _record_skip(
    library: Library,
    summary: IndexSummary,
    progress: Progress,
    path: Path,
    size: int,
    mtime: float,
    digest: str | None,
    reason: str,
) -> None:
    """``_record_failure`` for a file that fails before it is planned, told as it is found."""
    _record_failure(library, summary, path, size, mtime, digest, reason)
    progress.skipped(str(path), reason)


def _os_reason(error: OSError) -> str:
    return "permission denied" if error.errno == errno.EACCES else f"cannot read file: {error.strerror}"
