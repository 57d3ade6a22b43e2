"""The live progress bars of ``ts2 index``, ``ts2 eval`` and ``ts2 train`` (rich.progress)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from .indexer import Progress as IndexProgress
from .markup import shown

if TYPE_CHECKING:
    from .train import EpochRecord


class _DoneOfTotal(MofNCompleteColumn):
    """Done of total ("12/30"); nothing for a step of unknown length (rich would show "0/?")."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class _TimeLeft(ProgressColumn):
    """Time left ("ETA 0:01:23") at the average pace so far; nothing for a step of unknown length. Work that
    finishes a batch at a time makes rich's windowed speed (and its ETA) jump by orders of magnitude."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        if not (task.completed and task.elapsed):
            return Text("ETA -:--:--", style="progress.remaining")
        left = (task.total - task.completed) * task.elapsed / task.completed
        return Text(f"ETA {timedelta(seconds=round(left))}", style="progress.remaining")


class LiveBar:
    """One rich progress bar in ts2's layout: what runs, bar, done/total, a live figure, elapsed time, ETA.
    Transient: it leaves the terminal when done (summaries are printed after it). Before the work can be counted
    (writing the text encoder, scanning folders) a ``stage`` shows what is happening, so the command does not
    look stuck."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _DoneOfTotal(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            _TimeLeft(),
            console=console,
            disable=not enabled,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress.live.is_started:
            self._progress.stop()

    def _start(self) -> None:
        # The live display starts with its first task, not before: whatever runs earlier inside the ``with``
        # (a first use downloading the weights) keeps the terminal and shows its own progress.
        if not self._progress.live.is_started:
            self._progress.start()

    def stage(self, description: str) -> None:
        """A step of unknown length has begun (the bar pulses)."""
        self._new_task(description, None)

    def _new_task(self, description: str, total: int | None, info: str = "") -> None:
        self._start()
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, info=info)

    def _current(self) -> Task | None:
        return next((task for task in self._progress.tasks if task.id == self._task), None)


class IndexProgressBar(LiveBar, IndexProgress):
    """Files found while scanning; then files done of planned, videos per second (the average so far: videos
    finish a batch at a time), ETA. A failed file is printed above the bar as it happens."""

    _scanning: TaskID | None = None

    def scanned(self, files: int) -> None:
        if self._task is None or self._task != self._scanning:
            self._new_task("scanning", None)
            self._scanning = self._task
        self._progress.update(self._task, info=f"{files:,} files")

    def planned(self, total: int) -> None:
        self._new_task("indexing", total, "- videos/s")

    def done(self, path: Path, outcome: str, reason: str = "") -> None:
        task = self._current()
        if task is None:
            return
        self._progress.advance(task.id)
        rate = f"{task.completed / task.elapsed:.1f}" if task.elapsed else "-"
        self._progress.update(task.id, info=f"{rate} videos/s")
        # Told on stderr with --json too (the bar is off then): stdout holds the document alone.
        if outcome == "failed":
            self.skipped(str(path), reason)
        elif reason:
            self._progress.console.print(f"[yellow]note:[/yellow] {shown(str(path))}: {shown(reason)}")

    def skipped(self, path: str, reason: str) -> None:
        because = f": {shown(reason)}" if reason else ""
        self._progress.console.print(f"[yellow]skipped[/yellow] {shown(path)}{because}")  # --json too


class ResearchProgress(LiveBar):
    """Rich progress for both commands: decoding/encoding counts, then training steps with loss and lr."""

    # EvalProgress
    def start(self, description: str, total: int) -> None:
        self._new_task(description, total)

    def advance(self, count: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, count)

    def failed(self, name: str, reason: str) -> None:
        self._progress.console.print(f"[yellow]skipped[/yellow] {shown(name)}: {shown(reason)}")  # --json too

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
        saved = shown(str(record.checkpoint))
        self._progress.console.print(f"epoch {record.epoch}: loss {record.loss:.4f}{scored} → {saved}")
