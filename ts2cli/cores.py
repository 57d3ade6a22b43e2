"""How many CPU cores this process may use: the indexer's thread plan and the text encoder's threads size from it."""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and container CPU sets
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
