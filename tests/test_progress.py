"""The live bars as a terminal shows them: rich renders into a string, ANSI codes stripped."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console
from rich.progress import Task, TaskID

from ts2cli.progress import IndexProgressBar, ResearchProgress, _TimeLeft


def terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120, color_system=None), screen


def last_frame(bar: IndexProgressBar | ResearchProgress, screen: io.StringIO) -> str:
    bar._progress.refresh()
    frames = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()))
    return [frame for frame in frames if frame.strip()][-1]


def test_index_bar_says_what_runs_before_it_can_count():
    console, screen = terminal()
    with IndexProgressBar(console) as bar:
        bar.stage("writing the text encoder for ts2 search")
        shown = last_frame(bar, screen)
        assert shown.startswith("writing the text encoder") and "/?" not in shown and "ETA" not in shown
        for found in range(1235):
            bar.scanned(found)
        assert "1,234 files" in last_frame(bar, screen)
        bar.planned(10)
        for _ in range(5):
            bar.done(Path("a.mp4"), "indexed")
        shown = last_frame(bar, screen)
        assert shown.startswith("indexing") and " 5/10 " in shown and "videos/s" in shown and "ETA " in shown
        assert "files" not in shown  # the scanning step was replaced, not stacked


def test_a_bar_with_nothing_to_show_leaves_the_terminal_alone():
    """The display starts with the first step: anything before it (a weights download with its own progress)
    writes to a terminal that no live display redraws."""
    console, screen = terminal()
    with ResearchProgress(console):
        console.print("downloading weights 42%")
    assert screen.getvalue() == "downloading weights 42%\n"


def test_time_left_is_the_average_pace_so_far():
    def task(completed: float, total: float | None) -> Task:
        started = Task(TaskID(0), "indexing", total, completed, _get_time=lambda: 100.0)
        started.start_time = 40.0
        return started

    left = _TimeLeft()
    assert left.render(task(5, 10)).plain == "ETA 0:01:00"  # 5 done in 60 s: 5 more take 60 s
    assert left.render(task(1, 121)).plain == "ETA 2:00:00"
    assert left.render(task(0, 10)).plain == "ETA -:--:--"
    assert left.render(task(0, None)).plain == ""  # a step of unknown length
