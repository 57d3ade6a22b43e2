"""How the model and library are described to people and in ``--json`` output."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from rich.filesize import decimal
from rich.table import Table

from .markup import counted, shown
from .model_record import model_summary

ZERO_SHOT_NOTE = (
    "zero-shot: CLIP frame features combined by the TS2 similarity; no trained TS2-Net parts "
    "(pass --checkpoint for a trained model)"
)
FINE_TUNED_CLIP_NOTE = (
    "fine-tuned CLIP without TS2-Net parts (a --head meanpool checkpoint): its frame features combined by the "
    "TS2 similarity"
)


def describe_model(loaded: Any) -> dict[str, Any]:
    """The model's identity plus where it runs; ``mode`` and ``note`` say whether it is zero-shot."""
    identity = dict(loaded.identity)
    note = _model_note(identity)
    # --precision auto on a CPU: bf16 only where the first video batch shows it accurate and faster
    dtype = loaded.dtype_name if loaded.precision_known else None
    described = {**identity, "note": note, "device": str(loaded.device), "precision": loaded.precision}
    return {**described, "dtype": dtype, "trained": training_record(loaded.config.provenance)}


def training_record(provenance: dict[str, Any]) -> dict[str, Any] | None:
    """What ``ts2 train`` recorded in a checkpoint it wrote: data, epoch, steps, and the evaluation after that
    epoch (None for CLIP weights and official checkpoints, which record nothing)."""
    if provenance.get("trained_by") != "ts2 train":
        return None
    keys = ("data", "epoch", "step", "head", "eval")
    return {key: provenance.get(key) for key in keys}


def _training_line(trained: dict[str, Any]) -> str:
    line = f"epoch {trained['epoch']} ({trained['step']} steps) on {trained['data']}"
    t2v = (trained.get("eval") or {}).get("t2v") or {}
    return line + (f"; held-out t2v R@1 {t2v['R@1']:.1f}" if "R@1" in t2v else "")


def model_table(report: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in report.items():
        if key == "source":  # how to load it again: only where the weights come from is for people
            value = _weights_place(value)
            key = "loaded from"
        if key == "dtype" and value is None:
            value = "decided on the first video batch (float32, or bfloat16 where accurate and faster)"
        if key == "trained" and value is not None:
            value = _training_line(value)
        table.add_row(key, "-" if value is None else shown(str(value)))
    return table


def _weights_place(source: dict[str, Any] | None) -> str | None:
    if not source:
        return None
    places = [source.get("weights_file") or source.get("pretrained"), source.get("checkpoint")]
    return ", ".join(str(place) for place in places if place) or None


def status_json(stats: Any) -> dict[str, Any]:
    """``ts2 status --json``; the documented, stable fields are listed in docs/cli.md."""
    model = stats.model or {}
    return {
        "library": str(stats.directory),
        "model": {**model, "note": _model_note(model)} if model else None,
        "videos": stats.videos_ok,
        "failed": [{"path": path, "reason": reason} for path, reason in stats.failures],
        "bytes": stats.bytes_on_disk,
        "schema_version": stats.schema_version,
        "duration": round(stats.video_seconds, 1),
        "last_indexed": _iso_utc(stats.last_indexed),
        "folders": [_folder_json(root, videos, stats.folder_rules.get(root)) for root, videos in stats.folders],
        "rebuild_unfinished": stats.rebuild_unfinished,
    }


def _folder_json(root: str, videos: int, rules: Any) -> dict[str, Any]:
    """A folder of ``ts2 status --json``; ``exclude`` and ``hidden`` are null when its rules were not recorded."""
    return {
        "path": root,
        "videos": videos,
        "present": os.path.exists(root),
        "exclude": list(rules.exclude) if rules else None,
        "hidden": rules.include_hidden if rules else None,
    }


def _total_length(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _iso_utc(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _model_note(model: dict[str, Any]) -> str:
    if model.get("mode") != "zero-shot":
        return "trained TS2-Net"
    return FINE_TUNED_CLIP_NOTE if model.get("checkpoint") else ZERO_SHOT_NOTE


def status_table(status: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    model = status["model"] or {}
    table.add_row("library", shown(status["library"]))
    table.add_row("model", shown(model_summary(model)) if model else "-")
    length = f" ({_total_length(status['duration'])} of video)" if status["videos"] else ""
    table.add_row("videos", f"{status['videos']:,}{length}")
    table.add_row("failed", str(len(status["failed"])))
    for failure in status["failed"][:20]:
        table.add_row("", _failure_line(failure["path"], failure["reason"]))
    if len(status["failed"]) > 20:
        table.add_row("", f"… and {len(status['failed']) - 20} more (see --json)")
    for number, folder in enumerate(status["folders"]):
        videos = counted(folder["videos"], "video")
        rules = [f"excluding {shown(' '.join(folder['exclude']))}"] if folder["exclude"] else []
        rules += ["hidden files too"] if folder["hidden"] else []
        gone = [] if folder["present"] else ["[yellow]not found[/yellow]"]
        details = ", ".join([videos, *gone, *rules])
        table.add_row("folders" if number == 0 else "", f"{shown(folder['path'])} ({details})")
    if status["rebuild_unfinished"]:
        table.add_row(
            "rebuild",
            "[yellow]stopped before it finished[/yellow]: the library is as it was until `ts2 index --rebuild` "
            "(with the same folders and model) runs to the end",
        )
    table.add_row("size", decimal(status["bytes"]))
    if status["last_indexed"]:
        local = datetime.fromisoformat(status["last_indexed"]).astimezone()
        table.add_row("last indexed", local.strftime("%Y-%m-%d %H:%M"))
    return table


def _failure_line(path: str, reason: str) -> str:
    """Paths and reasons are shown as they are: a file may be called ``[red].mp4``."""
    return f"[yellow]{shown(path)}[/yellow]: {shown(reason)}"


def summary_table(summary: Any, library: Any) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("library", shown(str(library)))
    table.add_row("indexed", str(summary.indexed))
    for path, what in summary.cut_short:
        table.add_row("", _failure_line(path, what))
    table.add_row("unchanged", str(summary.unchanged))
    table.add_row("moved or copied", str(summary.moved))
    table.add_row("removed", str(summary.removed))
    table.add_row("failed", str(len(summary.failed)))
    for path, reason in summary.failed:
        table.add_row("", _failure_line(path, reason))
    table.add_row("time", f"{summary.seconds:.1f} s")
    return table


def search_json(query: str, identity: dict[str, Any], hits: list[Any]) -> dict[str, Any]:
    """``ts2 search --json``; fields documented in docs/cli.md."""
    model = {k: v for k, v in identity.items() if k != "source"}
    return {"query": query, "model": {**model, "note": _model_note(model)}, "results": [h.to_json() for h in hits]}


def _score(score: float) -> str:
    """Three decimals; a score that rounds to zero is shown as 0.000, not -0.000."""
    return f"{score:.3f}".replace("-0.000", "0.000")


def clock(seconds: float) -> str:
    minutes, secs = divmod(max(seconds, 0.0), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes}:{secs:04.1f}"


NARROW_COLUMNS = 70
"""Below this terminal width a result's path goes on a line of its own, under its score and moment."""


def results_table(hits: list[Any], width: int | None = None) -> Table:
    """The results as a table of one line per hit, or, on a terminal narrower than ``NARROW_COLUMNS``, two: the
    score and moment, then the path (folded), so that neither is squeezed out."""
    from pathlib import Path
    from urllib.parse import quote

    narrow = width is not None and width < NARROW_COLUMNS
    table = Table(box=None, pad_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    if narrow:
        table.add_column("score  moment / video", overflow="fold")
    else:
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("moment", no_wrap=True)
        table.add_column("length", justify="right", no_wrap=True)
        table.add_column("video", overflow="fold")
    for rank, hit in enumerate(hits, start=1):
        link = "file://" + quote(Path(hit.path).as_posix())
        moment = f"{clock(hit.moment.start)}–{clock(hit.moment.end)}"
        length = clock(hit.duration) if hit.duration is not None else "-"
        video = f"[link={link}]{shown(hit.path)}[/link]"
        if narrow:
            table.add_row(str(rank), f"{_score(hit.score)}  {moment} of {length}\n{video}")
        else:
            table.add_row(str(rank), _score(hit.score), moment, length, video)
    return table
