"""Measure what a search pays for an ANN index that is older than the library: brought up to date from the change
log against rebuilt from the features table.

Run ``python benchmarks/ann_catch_up_bench.py`` from the repository root (``--videos 20000`` for a quick run).

This is the case of every search while ``ts2 index`` adds videos to a big library (the indexer saves the index
every 5 minutes) and of the first search after an index run was killed. The clustered synthetic library of
``benchmarks/search_bench.py`` is reused from ``--workdir`` (written first if missing: about 2 minutes at 100k
videos), copied to a scratch folder, and its index saved. Then, for each count in ``--changes``, a child process
writes that many changes since the save (new videos and re-indexed ones whose vector changed, committed 16 at a
time as the indexer does) and exits without saving the index, as a killed ``ts2 index`` would. Fresh readers then
time their first ``Library.ann()``, as a ``ts2 search`` process does: loading the saved index and applying the
logged changes, against ``_rebuild_ann`` (the rebuild alone, without the save a searching reader adds to it).
Both indexes are checked against each other and against exact search (recall@10 of 50 queries).
Prints a markdown table; medians of ``--runs`` fresh readers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `ts2 search` runs numpy

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_bench import DataParams, ensure_library, global_vector, query_vectors, synthetic_identity, video_chunks

from ts2cli.ann_index import is_live
from ts2cli.store import Library

COMMIT_EVERY = 16  # as ts2 index
REPLACED_SHARE = 0.25  # of the changes, videos already in the library whose vector changed (re-indexed)


def log(message: str) -> None:
    print(f"[ann_catch_up_bench] {message}", file=sys.stderr, flush=True)


def write_changes(directory: Path, count: int, seed: int, params: DataParams) -> None:
    """Child process: ``count`` changes, committed as the indexer does, then exit without saving (a kill)."""
    rng = np.random.default_rng([seed, 7])
    chunk = next(video_chunks(params))  # realistic frames, reused with fresh noise
    library = Library.open(directory, write=True)
    existing = library.count_ok()
    replaced = int(count * REPLACED_SHARE)
    for i in range(count):
        frames = chunk[rng.integers(len(chunk))] + rng.standard_normal(chunk.shape[1:], dtype=np.float32) * 0.05
        frames /= np.linalg.norm(frames, axis=1, keepdims=True)
        if i < replaced:
            n = int(rng.integers(existing))
            path = f"/bench/clustered/{n // 1000:03d}/video{n:06d}.mp4"  # as search_bench names them
        else:
            path = f"/bench/new/{seed}/video{i:06d}.mp4"
        library.put_video(
            path, size=1, mtime=1.0, fingerprint=f"new{seed}-{i}", duration=12.0, width=640, height=360,
            frame_times=[t + 0.5 for t in range(len(frames))], frames=frames, global_vector=global_vector(frames),
        )  # fmt: skip
        if (i + 1) % COMMIT_EVERY == 0:
            library.commit()
    library.commit()
    os._exit(0)  # no close(): the index files stay as they were saved


def timed_first_ann(directory: Path) -> tuple[float, str | None]:
    with Library.open(directory) as library:
        began = time.perf_counter()
        library.ann()
        return time.perf_counter() - began, library.last_ann_load


def timed_rebuild(directory: Path) -> float:
    with Library.open(directory) as library:
        began = time.perf_counter()
        library._rebuild_ann()
        return time.perf_counter() - began


def recall_at_10(directory: Path, queries: np.ndarray, rebuilt: bool) -> tuple[float, set[int]]:
    with Library.open(directory) as library:
        if rebuilt:
            index, _, _ = library._rebuild_ann()
        else:
            index = library.ann()
        assert index is not None
        labels = {label for label in index.get_ids_list() if is_live(index, label)}
        ids, vectors = library.global_vectors()
        hits = 0
        for query in queries:
            exact = set(ids[np.argsort(-(vectors @ query))[:10]].tolist())
            index.set_ef(64)
            found, _ = index.knn_query(query, k=10)
            hits += len(exact & set(found[0].tolist()))
        return hits / (10 * len(queries)), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--changes", type=lambda s: [int(x) for x in s.split(",")], default=[300, 3000])
    parser.add_argument("--runs", type=int, default=5, help="fresh readers timed per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ts2cli-search-bench")
    parser.add_argument("--write-changes", nargs=2, metavar=("DIR", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = DataParams("clustered", args.videos, 512, 12, 300, 0.8, 0.5, args.seed)
    if args.write_changes:
        write_changes(Path(args.write_changes[0]), int(args.write_changes[1]), args.seed, params)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    source = ensure_library(args.workdir, params, synthetic_identity(params.dim))
    scratch = args.workdir / "catch-up-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch)
    with Library.open(scratch, write=True) as library:
        library.save_ann()
    loads = [timed_first_ann(scratch) for _ in range(args.runs + 1)][1:]  # the first warms the page cache
    assert {source for _, source in loads} == {"disk"}, loads
    queries = query_vectors(params, 50, 1.0)
    rows = [f"| saved index, up to date | {statistics.median(t for t, _ in loads):.3f} | | |"]
    written = 0
    for total in args.changes:
        step = total - written
        log(f"writing {step} changes ({total} since the save)")
        command = [sys.executable, __file__, "--videos", str(args.videos), "--seed", str(args.seed + total)]
        subprocess.run([*command, "--write-changes", str(scratch), str(step)], check=True)
        written = total
        caught = [timed_first_ann(scratch) for _ in range(args.runs + 1)][1:]
        assert {source for _, source in caught} == {"caught up"}, caught
        rebuilds = [timed_rebuild(scratch) for _ in range(max(1, args.runs // 2))]
        caught_recall, caught_labels = recall_at_10(scratch, queries, rebuilt=False)
        rebuilt_recall, rebuilt_labels = recall_at_10(scratch, queries, rebuilt=True)
        assert caught_labels == rebuilt_labels, "the two indexes hold different videos"
        median_caught, median_rebuilt = statistics.median(t for t, _ in caught), statistics.median(rebuilds)
        rows.append(
            f"| {total} changes: brought up to date | {median_caught:.3f} | {median_rebuilt / median_caught:.0f}× "
            f"| {caught_recall:.3f} (rebuilt: {rebuilt_recall:.3f}) |"
        )
        rows.append(f"| {total} changes: rebuilt | {median_rebuilt:.3f} | | |")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.videos} videos, first `Library.ann()` of a fresh reader (s, median of {args.runs}):\n")
    print("| index files | time (s) | faster than a rebuild | recall@10 vs exact |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
