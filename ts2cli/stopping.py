"""The signals that stop a command, and putting handlers in their place for a while."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, ``kill`` (or a service manager) and a closed terminal: each stops a command the same tidy way."""

Handler = Callable[[int, Any], Any]


def replace_stop_handlers(handler: Handler) -> dict[int, Any]:
    """Put ``handler`` in place for each stop signal, except one set to be ignored (``nohup``, a background job of a
    script), which stays ignored. Returns the handlers replaced, for ``restore_handlers``: one set outside Python
    comes back as the default. Only the main thread can set handlers; elsewhere nothing is replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    before: dict[int, Any] = {}
    for number in STOP_SIGNALS:
        previous = signal.getsignal(number)
        if previous is not signal.SIG_IGN:
            before[number] = signal.SIG_DFL if previous is None else previous
            signal.signal(number, handler)
    return before


def restore_handlers(before: dict[int, Any]) -> None:
    for number, handler in before.items():
        signal.signal(number, handler)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold the stop signals until the block ends, then deliver the first one that came (signals reach only the
    main thread, so a block run elsewhere needs nothing held)."""
    came: list[int] = []
    before = replace_stop_handlers(lambda number, frame: came.append(number))
    try:
        yield
    finally:
        restore_handlers(before)
        if came:
            signal.raise_signal(came[0])
