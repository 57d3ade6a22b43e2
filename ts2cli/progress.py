"""The live progress bar of ``ts2 index`` (rich.progress)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .indexer import Progress as IndexProgress


class IndexProgressBar(IndexProgress):
    """Files done of planned, videos per second, ETA; a failed file is printed above the bar as it happens."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} videos/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> IndexProgressBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def planned(self, total: int) -> None:
        self._task = self._progress.add_task("index", total=total, rate="-")

    def done(self, path: Path, outcome: str) -> None:
        if self._task is None:
            return
        self._progress.advance(self._task)
        speed = self._progress.tasks[self._task].speed
        self._progress.update(self._task, rate=f"{speed:.1f}" if speed else "-")
        if outcome == "failed" and self.enabled:
            self._progress.console.print(f"[yellow]skipped[/yellow] {path}")
