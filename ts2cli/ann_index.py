"""The library's ANN index: an hnswlib index over the videos' global vectors, saved as ``ann.hnsw`` with a sidecar
``ann.json`` that tags it with the SQLite generation it holds.

The index is a cache of SQLite's ``features`` table (``ts2cli.store.Library`` decides when it is loaded, brought up
to date or rebuilt). Labels are video ids; vectors are unit length, so inner product is cosine similarity.
``ann.lock`` is held only while the two files are read or replaced, so that a reader never pairs an index file
with another save's sidecar.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from .durable import fsync_dir, fsync_file, write_text_atomically

ANN_FILE = "ann.hnsw"
ANN_META_FILE = "ann.json"
ANN_LOCK_FILE = "ann.lock"

# Vectors are unit length before they reach the index, so inner product *is* cosine similarity; 'ip'
# keeps the stored vectors bit-identical to SQLite's (hnswlib's 'cosine' would renormalise a copy).
ANN_SPACE = "ip"
ANN_M = 16
# Measured on 20k clustered 512-d vectors: 200 costs 1.7x the build time for <1% recall at ef=2k.
ANN_EF_CONSTRUCTION = 100
ANN_SEED = 100
_ANN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Generation:
    """A state of the library's vectors, as SQLite's meta table names it and the sidecar records it."""

    # The counter is for humans; the random id is what makes a tag unique even if a power cut rolls
    # SQLite back (synchronous=NORMAL) and the counter is later reached again with different content.
    number: int
    token: str


# ---------------------------------------------------------------------- the index in memory


def unit_query(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("query vector must be finite and non-zero")
    return (vector / norm).astype(np.float32)


def new_index(dim: int, capacity: int) -> hnswlib.Index:
    index = hnswlib.Index(space=ANN_SPACE, dim=dim)
    index.init_index(
        max_elements=max(capacity, 64),
        ef_construction=ANN_EF_CONSTRUCTION,
        M=ANN_M,
        random_seed=ANN_SEED,
        allow_replace_deleted=True,
    )
    return index


def apply_changes(
    index: hnswlib.Index | None, live: int, changes: dict[int, np.ndarray | None]
) -> tuple[hnswlib.Index | None, int]:
    """``index`` (``live`` vectors) with ``changes`` (label -> new unit vector, or None for "remove") applied in
    place, or a new index if there was none; and how many live vectors it holds now."""
    # Removals first, so that the additions can reuse the freed slots.
    for label in [label for label, vector in changes.items() if vector is None]:
        live -= _remove(index, label)
    additions = {label: vector for label, vector in changes.items() if vector is not None}
    if additions:
        if index is None:
            index = new_index(len(next(iter(additions.values()))), len(additions))
        live += _upsert(index, additions, live)
    return index, live


def is_live(index: hnswlib.Index, label: int) -> bool:
    try:
        index.get_items([label])  # raises for absent *and* for deleted labels
    except RuntimeError:
        return False
    return True


def _remove(index: hnswlib.Index | None, label: int) -> int:
    """Mark ``label`` deleted; returns how many live vectors went away (0 or 1)."""
    if index is None:
        return 0
    try:
        index.mark_deleted(label)
    except RuntimeError:  # absent or already deleted
        return 0
    return 1


def _upsert(index: hnswlib.Index, vectors: dict[int, np.ndarray], live: int) -> int:
    """Add or replace ``vectors`` (label -> unit vector); returns how many new live vectors there are.

    hnswlib has three cases. A live label is updated in place by add_items. A deleted label must be
    undeleted first (add_items refuses it when replacing deleted slots is enabled). Only a label the
    index has never seen may use replace_deleted=True, which recycles a deleted slot; using it for an
    existing label would leave that label in two slots.
    """
    updates: dict[int, np.ndarray] = {}
    fresh: dict[int, np.ndarray] = {}
    revived = 0
    for label, vector in vectors.items():
        if is_live(index, label):
            updates[label] = vector
        else:
            try:
                index.unmark_deleted(label)
            except RuntimeError:
                fresh[label] = vector
                continue
            revived += 1
            updates[label] = vector
    if updates:
        index.add_items(np.stack(list(updates.values())), np.fromiter(updates, dtype=np.int64))
    if fresh:
        vacant = index.get_current_count() - (live + revived)
        needed = index.get_current_count() + max(0, len(fresh) - vacant)
        if needed > index.get_max_elements():
            index.resize_index(max(needed, 2 * index.get_max_elements()))
        index.add_items(np.stack(list(fresh.values())), np.fromiter(fresh, dtype=np.int64), replace_deleted=True)
    return revived + len(fresh)


# ---------------------------------------------------------------------- the files


@contextlib.contextmanager
def files_lock(directory: Path, *, shared: bool) -> Iterator[None]:
    """Hold ``ann.lock`` while the two files are read (shared) or replaced (exclusive)."""
    path = directory / ANN_LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            # Read-only library without the lock file: nobody can be writing the ANN files anyway.
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_sidecar(directory: Path) -> dict[str, Any] | None:
    """The saved index's sidecar; None when it is missing, damaged or from another format."""
    try:
        meta = json.loads((directory / ANN_META_FILE).read_text(encoding="utf-8"))
        expected = {
            "format": int,
            "generation": int,
            "generation_id": str,
            "count": int,
            "index_bytes": int,
        }
        if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in expected.items()):
            return None
        if meta["format"] != _ANN_FORMAT or meta.get("space") != ANN_SPACE:
            return None
        if meta["count"] > 0 and not isinstance(meta.get("dim"), int):
            return None
        return meta
    except (OSError, ValueError):
        return None


def sidecar_generation(meta: dict[str, Any] | None) -> Generation | None:
    return None if meta is None else Generation(meta["generation"], meta["generation_id"])


def load_index_file(directory: Path, meta: dict[str, Any]) -> hnswlib.Index | None:
    """The saved index that ``meta`` (its sidecar, read under the same lock) describes; None if the file is
    missing, cut short or damaged. Call with ``meta["count"] > 0``."""
    path = directory / ANN_FILE
    try:
        if path.stat().st_size != meta["index_bytes"]:
            return None
        # Always a fresh Index object: reloading into a used one crashes hnswlib on bad files.
        index = hnswlib.Index(space=ANN_SPACE, dim=int(meta["dim"]))
        index.load_index(str(path), allow_replace_deleted=True)
    except (OSError, RuntimeError, ValueError, MemoryError):
        return None
    return index if index.get_current_count() >= meta["count"] else None


def write_files(directory: Path, index: hnswlib.Index | None, gen: Generation, count: int) -> None:
    """Save ``index`` (``count`` live vectors, at ``gen``) and its sidecar, sidecar last. Hold the exclusive
    ``files_lock``. Raises OSError (ENOSPC for a file that came out incomplete) and leaves no sidecar then."""
    _remove_stale_temp_files(directory)
    # The old sidecar goes first: should SQLite lose its last commit to a power cut after the new index file
    # replaced the old one, the old sidecar would match the database again and vouch for the wrong file.
    (directory / ANN_META_FILE).unlink(missing_ok=True)
    fsync_dir(directory)
    target = directory / ANN_FILE
    if index is None:
        target.unlink(missing_ok=True)
        index_bytes = 0
    else:
        tmp = directory / f".{ANN_FILE}.{os.getpid()}.tmp"
        index.save_index(str(tmp))
        fsync_file(tmp)
        if not _reads_back(tmp, index):
            tmp.unlink(missing_ok=True)
            raise OSError(errno.ENOSPC, "the search index file came out incomplete (is the disk full?)")
        os.replace(tmp, target)
        index_bytes = target.stat().st_size
    sidecar = {
        "format": _ANN_FORMAT,
        "generation": gen.number,
        "generation_id": gen.token,
        "count": count,
        "dim": None if index is None else index.dim,
        "space": ANN_SPACE,
        "M": ANN_M if index is None else index.M,
        "ef_construction": ANN_EF_CONSTRUCTION if index is None else index.ef_construction,
        "index_bytes": index_bytes,
    }
    write_text_atomically(directory / ANN_META_FILE, json.dumps(sidecar, indent=1) + "\n")
    fsync_dir(directory)


def _reads_back(path: Path, index: hnswlib.Index) -> bool:
    """Whether a saved index file loads whole. hnswlib's save does not report write errors: on a full disk it
    leaves a cut-off file and returns, and replacing the good file with it would break every later load."""
    check = hnswlib.Index(space=ANN_SPACE, dim=index.dim)
    try:
        check.load_index(str(path))
    except RuntimeError:
        return False
    return check.get_current_count() == index.get_current_count()


def _remove_stale_temp_files(directory: Path) -> None:
    # Left by a process killed mid-save; safe to remove because we hold the ANN files lock exclusively.
    for name in (ANN_FILE, ANN_META_FILE):
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
