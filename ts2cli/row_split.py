"""One large numpy operation split by rows across the cores, for the torch-free search path.

``ts2 search`` keeps OpenBLAS on one thread (``ts2cli/cli.py``): OpenBLAS's own threads spin while they wait for
each other, and a query that shared two cores with another busy process took a second instead of tens of
milliseconds. Splitting the rows ourselves degrades gracefully instead: each part is an ordinary single-threaded
call that releases the GIL, so on idle cores the parts run side by side (the text encoder's matrix products take
about two thirds of the time on two cores, see docs/benchmarks.md), and on a busy machine they simply take turns.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_WORKERS = 4
"""More parts than this stop paying off: the work is bound by memory bandwidth, not arithmetic."""


class RowSplitter:
    """Runs ``work(start, stop)`` over contiguous parts of ``range(rows)``, one part per worker, and waits."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers - 1, "ts2-rows") if self.workers > 1 else None

    def run(self, work: Callable[[int, int], object], rows: int) -> None:
        bounds = part_bounds(rows, self.workers)
        if self._pool is None or len(bounds) == 1:
            for start, stop in bounds:
                work(start, stop)
            return
        pending = [self._pool.submit(work, start, stop) for start, stop in bounds[1:]]
        work(*bounds[0])  # the calling thread takes a part instead of idling
        for future in pending:
            future.result()


def part_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` non-empty (start, stop) ranges covering ``range(rows)``, sizes differing by at most one."""
    parts = max(1, min(parts, rows))
    size, extra = divmod(rows, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + size + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def shared_splitter() -> RowSplitter:
    """The process's splitter: one worker per usable core, up to ``MAX_WORKERS``."""
    return RowSplitter(min(usable_cores(), MAX_WORKERS))
