"""The live progress bars of ``ts2 index``, ``ts2 eval`` and ``ts2 train`` (rich.progress)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.markup import escape
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

if TYPE_CHECKING:
    from .train import EpochRecord


class LiveBar:
    """One rich progress bar in ts2's layout: label, bar, done/total, a live figure, elapsed time, ETA. Transient:
    it leaves the terminal when done (summaries are printed after it)."""

    def __init__(self, console: Console, label: str, figure: str, *, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(figure),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]


class IndexProgressBar(LiveBar, IndexProgress):
    """Files done of planned, videos per second, ETA; a failed file is printed above the bar as it happens."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        super().__init__(console, "[bold]indexing", "{task.fields[rate]} videos/s", enabled=enabled)

    def planned(self, total: int) -> None:
        self._task = self._progress.add_task("index", total=total, rate="-")

    def done(self, path: Path, outcome: str) -> None:
        if self._task is None:
            return
        self._progress.advance(self._task)
        speed = self._progress.tasks[self._task].speed
        self._progress.update(self._task, rate=f"{speed:.1f}" if speed else "-")
        if outcome == "failed" and self.enabled:
            self._progress.console.print(f"[yellow]skipped[/yellow] {escape(str(path))}")


class ResearchProgress(LiveBar):
    """Rich progress for both commands: decoding/encoding counts, then training steps with loss and lr."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        super().__init__(console, "[bold]{task.description}", "{task.fields[info]}", enabled=enabled)

    def _new_task(self, description: str, total: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, info="")

    # EvalProgress
    def start(self, description: str, total: int) -> None:
        self._new_task(description, total)

    def advance(self, count: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, count)

    def failed(self, name: str, reason: str) -> None:
        if self.enabled:
            self._progress.console.print(f"[yellow]skipped[/yellow] {escape(name)}: {escape(reason)}")

    # TrainProgress
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._new_task(f"epoch {epoch}/{epochs}", steps)

    def step_done(self, loss: float, lr: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, info=f"loss {loss:.4f}  lr {lr:.2e}")

    def epoch_done(self, record: EpochRecord) -> None:
        if not self.enabled:
            return
        scored = ""
        if record.metrics:
            scored = f", t2v R@1 {record.metrics['t2v']['R@1']:.1f}, v2t R@1 {record.metrics['v2t']['R@1']:.1f}"
        saved = escape(str(record.checkpoint))
        self._progress.console.print(f"epoch {record.epoch}: loss {record.loss:.4f}{scored} → {saved}")
