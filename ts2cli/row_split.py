"""One large numpy operation split by rows across the cores, for the torch-free search path.

``ts2 search`` keeps OpenBLAS on one thread (``ts2cli/cli.py``): OpenBLAS's own threads spin while they wait for
each other, and a query that shared two cores with another busy process took a second instead of tens of
milliseconds. Splitting the rows ourselves degrades gracefully instead: each part is an ordinary single-threaded
call that releases the GIL, so on idle cores the parts run side by side (the text encoder's matrix products take
about two thirds of the time on two cores, see docs/benchmarks.md), and on a busy machine they simply take turns.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_WORKERS = 4
"""More parts than this stop paying off: the work is bound by memory bandwidth, not arithmetic."""
PARTS_PER_WORKER = 4
"""Parts are handed out one at a time, so a worker the OS has not scheduled holds up the caller by one part at
most: with the work split in halves, a busy machine made text encoding 2-3× slower instead of no faster."""


class RowSplitter:
    """Runs ``work(start, stop)`` over contiguous parts of ``range(rows)`` on the calling thread and the workers,
    each taking the next part when it is free, and returns when every part is done."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers - 1, "ts2-rows") if self.workers > 1 else None

    def run(self, work: Callable[[int, int], object], rows: int) -> None:
        bounds = part_bounds(rows, self.workers * PARTS_PER_WORKER)
        if self._pool is None or len(bounds) == 1:
            for start, stop in bounds:
                work(start, stop)
            return
        job = _Job(work, bounds)
        for _ in range(self.workers - 1):
            self._pool.submit(job.take_parts)
        job.take_parts()
        job.wait()


class _Job:
    """The parts of one ``run``; whoever is free takes the next. Done when all parts are, not when every helper
    has returned: a helper that starts late finds nothing left and leaves."""

    def __init__(self, work: Callable[[int, int], object], bounds: list[tuple[int, int]]) -> None:
        self._work = work
        self._bounds = bounds
        self._next = itertools.count()  # next() on it is atomic under the GIL
        self._left = len(bounds)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None

    def take_parts(self) -> None:
        while (index := next(self._next)) < len(self._bounds):
            try:
                self._work(*self._bounds[index])
            except Exception as error:  # handed to the caller by wait()
                self._error = self._error or error
            finally:
                with self._lock:
                    self._left -= 1
                    if self._left == 0:
                        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


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
