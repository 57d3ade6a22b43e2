"""Caption/video lists for evaluation and training: MSR-VTT (CLIP4Clip's layout, spec §11.1, §8.1) and CSVs.

MSR-VTT videos are looked up as ``{video_id}.mp4``, then ``{video_id}.webm`` (spec §1.1), in these folders of
the data directory, first hit wins:

1. ``videos/``
2. ``MSRVTT/videos/all/`` (the layout of the MSR-VTT download itself)
3. ``compressed_videos/`` (the authors' ffmpeg-compressed copies)
4. the data directory itself
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ts2cli.errors import Ts2Error

MSRVTT_TEST_CSV = "MSRVTT_JSFUSION_test.csv"
MSRVTT_TRAIN_CSV = "MSRVTT_train.9k.csv"
MSRVTT_DATA_JSON = "MSRVTT_data.json"

MSRVTT_VIDEO_DIRS = ("videos", "MSRVTT/videos/all", "compressed_videos", "")
MSRVTT_VIDEO_EXTENSIONS = (".mp4", ".webm")
EVAL_BATCH_SIZE = 8
"""Videos per batch of the reference evaluation loader (spec §11.2); official-mode top-k noise is split by it."""

# How many missing names an error message spells out before it only counts.
_NAMES_SHOWN = 3


@dataclass
class CaptionSet:
    """Captions and the videos they describe.

    ``caption_video[c]`` is the index into ``videos`` of caption c's video, so one video may own several
    captions. ``expanded`` says which unit a trainer should iterate: one item per caption (spec §8.1) or one
    per video. ``missing`` lists the ids of videos skipped because their file was absent (only with
    ``allow_missing``).
    """

    videos: list[Path]
    captions: list[str]
    caption_video: np.ndarray
    video_ids: list[str]
    expanded: bool = True
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions) if self.expanded else len(self.videos)

    def captions_of(self, video_index: int) -> list[str]:
        return [self.captions[c] for c in np.flatnonzero(self.caption_video == video_index)]

    def digest(self) -> str:
        """SHA-256 of the items as a trainer sees them (video ids, captions, which caption is whose, the unit), not
        of where the files lie: a data folder that moved is the same data."""
        content = {
            "videos": self.video_ids,
            "captions": self.captions,
            "caption_video": self.caption_video.tolist(),
            "expanded": self.expanded,
        }
        return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def load_msrvtt_test(data_dir: Path, *, allow_missing: bool = False) -> CaptionSet:
    """The 1k-A test split: one caption per video, row i's caption describes row i's video (spec §11.1)."""
    csv_path = _require_file(Path(data_dir) / MSRVTT_TEST_CSV, "the MSR-VTT 1k-A test list")
    rows = _read_csv(csv_path, required=("video_id", "sentence"), aliases={"sentences": "sentence"})
    _require_rows(csv_path, rows, ("video_id", "sentence"))
    pairs = [(row["video_id"], row["sentence"]) for _, row in rows]
    return _msrvtt_caption_set(Path(data_dir), pairs, csv_path.name, expanded=True, allow_missing=allow_missing)


def load_msrvtt_train(data_dir: Path, *, expand_sentences: bool = True, allow_missing: bool = False) -> CaptionSet:
    """The 9k training split: each caption of ``MSRVTT_data.json`` whose video is in the 9k CSV (spec §8.1).

    Videos keep the CSV's order and captions the JSON's order. ``expand_sentences`` only sets ``expanded``:
    the captions are the same either way, the trainer samples per caption (180k items) or per video (9k).
    """
    data_dir = Path(data_dir)
    csv_path = _require_file(data_dir / MSRVTT_TRAIN_CSV, "the MSR-VTT 9k training list")
    json_path = _require_file(data_dir / MSRVTT_DATA_JSON, "the MSR-VTT captions")
    rows = _read_csv(csv_path, required=("video_id",))
    _require_rows(csv_path, rows, ("video_id",))
    video_ids = list(dict.fromkeys(row["video_id"] for _, row in rows))

    sentences = _read_msrvtt_sentences(json_path)
    wanted = set(video_ids)
    pairs = [(vid, caption) for vid, caption in sentences if vid in wanted]
    captioned = {vid for vid, _ in pairs}
    without = [vid for vid in video_ids if vid not in captioned]
    if without:
        raise Ts2Error(
            f"{json_path} has no captions for {len(without)} of the {len(video_ids)} videos listed in "
            f"{csv_path.name} ({_names(without)})."
        )
    # Order videos as the CSV does, whatever order the captions come in.
    order = {vid: i for i, vid in enumerate(video_ids)}
    return _msrvtt_caption_set(
        data_dir, pairs, csv_path.name, expanded=expand_sentences, allow_missing=allow_missing, order=order
    )


def load_caption_csv(csv_path: Path, videos_dir: Path | None = None, *, allow_missing: bool = False) -> CaptionSet:
    """A user's own ``video,caption`` CSV: header required, other columns ignored, rows may share a video.

    ``video`` is absolute or relative to ``videos_dir``, which defaults to the CSV's folder. Videos are
    identified by their path relative to ``videos_dir`` when they lie under it, else by their absolute path.
    """
    csv_path = _require_file(Path(csv_path), "the caption list")
    if videos_dir is not None and not Path(videos_dir).is_dir():
        problem = "is a file, not a folder" if Path(videos_dir).exists() else "does not exist"
        raise Ts2Error(f"{videos_dir} (the folder the caption list's paths are relative to) {problem}.")
    videos_dir = Path(videos_dir) if videos_dir is not None else csv_path.parent
    rows = _read_csv(csv_path, required=("video", "caption"))
    _require_rows(csv_path, rows, ("video", "caption"))

    pairs = []
    files: dict[str, Path] = {}
    for _, row in rows:
        path = Path(os.path.abspath(videos_dir / row["video"]))
        video_id = _relative_id(path, videos_dir)
        files.setdefault(video_id, path)
        pairs.append((video_id, row["caption"]))
    found = {vid: path for vid, path in files.items() if path.is_file()}
    where = f"listed in {csv_path} were not found in {videos_dir}"
    return _build(pairs, found, where, expanded=True, allow_missing=allow_missing)


def find_msrvtt_videos(data_dir: Path, video_ids: Iterable[str]) -> dict[str, Path]:
    """The file of each video id that exists, following the search order in the module docstring."""
    listings = [(folder, _file_names(folder)) for folder in (data_dir / d for d in MSRVTT_VIDEO_DIRS)]
    found = {}
    for vid in video_ids:
        for folder, names in listings:
            name = next((vid + ext for ext in MSRVTT_VIDEO_EXTENSIONS if vid + ext in names), None)
            if name is not None:
                found[vid] = folder / name
                break
    return found


def _msrvtt_caption_set(
    data_dir: Path,
    pairs: list[tuple[str, str]],
    list_name: str,
    *,
    expanded: bool,
    allow_missing: bool,
    order: dict[str, int] | None = None,
) -> CaptionSet:
    found = find_msrvtt_videos(data_dir, dict.fromkeys(vid for vid, _ in pairs))
    folders = [str(data_dir / d) for d in MSRVTT_VIDEO_DIRS]
    where = f"listed in {list_name} were not found as .mp4 or .webm in {', '.join(folders[:-1])} or {folders[-1]}"
    return _build(pairs, found, where, expanded=expanded, allow_missing=allow_missing, order=order)


def _build(
    pairs: list[tuple[str, str]],
    found: dict[str, Path],
    where: str,
    *,
    expanded: bool,
    allow_missing: bool,
    order: dict[str, int] | None = None,
) -> CaptionSet:
    """Assemble a CaptionSet from (video id, caption) pairs, given the files found for the ids.

    ``where`` completes the sentence "N of M videos ..." that reports missing files.
    """
    wanted = list(dict.fromkeys(vid for vid, _ in pairs))
    if order is not None:
        wanted.sort(key=order.__getitem__)
    missing = [vid for vid in wanted if vid not in found]
    if missing and (not allow_missing or len(missing) == len(wanted)):
        partial = not allow_missing and len(missing) < len(wanted)
        hint = "; add them, or pass --allow-missing to use the rest" if partial else ""
        raise Ts2Error(f"{len(missing)} of {len(wanted)} videos {where} ({_names(missing)}){hint}.")

    video_ids = [vid for vid in wanted if vid in found]
    index = {vid: i for i, vid in enumerate(video_ids)}
    kept = [(vid, caption) for vid, caption in pairs if vid in index]
    return CaptionSet(
        videos=[found[vid] for vid in video_ids],
        captions=[caption for _, caption in kept],
        caption_video=np.array([index[vid] for vid, _ in kept], dtype=np.int64),
        video_ids=video_ids,
        expanded=expanded,
        missing=missing,
    )


def _read_csv(
    path: Path, *, required: Sequence[str], aliases: dict[str, str] | None = None
) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, stripped values by column) for a CSV with a header naming ``required``."""
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs write.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise Ts2Error(f"Could not read {path}: {error}.") from error
    first = text.partition("\n")[0]
    # Some published copies of the MSR-VTT lists are ';'-separated.
    delimiter = ";" if ";" in first and "," not in first else ","
    # The csv module splits records (only \r and \n, quoted line breaks kept); str.splitlines would also split
    # a caption at U+2028 and other Unicode line separators.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [(aliases or {}).get(name.strip(), name.strip()) for name in next(reader, [])]
    absent = [name for name in required if name not in header]
    if absent:
        raise Ts2Error(
            f"{path} needs a header row with the columns {', '.join(required)} "
            f"(missing {', '.join(absent)}; found {', '.join(header) or 'nothing'})."
        )
    columns = {name: header.index(name) for name in required}
    rows, short = [], []
    for values in reader:
        line = reader.line_num  # the file's line where the record ends
        if not any(v.strip() for v in values):
            continue
        if len(values) <= max(columns.values()):
            short.append(line)
            continue
        rows.append((line, {name: values[i].strip() for name, i in columns.items()}))
    if short:
        raise Ts2Error(f"{path} has rows with too few columns ({_lines(short)}).")
    return rows


def _require_rows(path: Path, rows: list[tuple[int, dict[str, str]]], columns: Sequence[str]) -> None:
    """At least one row, and a value in each of ``columns`` of every row."""
    if not rows:
        raise Ts2Error(f"{path} lists no videos: it has a header and no rows.")
    bad = [line for line, row in rows if not all(row[name] for name in columns)]
    if bad:
        raise Ts2Error(f"{path} has rows with an empty {' or '.join(columns)} ({_lines(bad)}).")


def _read_msrvtt_sentences(path: Path) -> list[tuple[str, str]]:
    try:
        with path.open(encoding="utf-8") as handle:
            sentences = json.load(handle)["sentences"]
        pairs = [(str(s["video_id"]), s["caption"]) for s in sentences]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Ts2Error(f"{path} is not an MSR-VTT annotation file with a 'sentences' list ({error!r}).") from error
    bad = [
        number for number, (_, caption) in enumerate(pairs, 1) if not isinstance(caption, str) or not caption.strip()
    ]
    if bad:
        raise Ts2Error(f"{path} has captions that are empty or not text ({_lines(bad, 'sentence')}, counting from 1).")
    return [(video_id, caption.strip()) for video_id, caption in pairs]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise Ts2Error(f"{path} ({what}) {problem}.")
    return path


def _file_names(folder: Path) -> set[str]:
    # One listing per folder instead of a stat per candidate name (1000 ids × 4 folders × 2 extensions).
    try:
        return {entry.name for entry in os.scandir(folder) if entry.is_file()}
    except OSError:
        return set()


def _relative_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return str(path)


def _names(names: Sequence[str]) -> str:
    if len(names) <= _NAMES_SHOWN:
        return ", ".join(names)
    return "first: " + ", ".join(names[:_NAMES_SHOWN])


def _lines(numbers: Sequence[int], word: str = "line") -> str:
    return f"{word}{'s' if len(numbers) > 1 else ''} {_numbers(numbers)}"


def _numbers(numbers: Sequence[int]) -> str:
    listed = ", ".join(map(str, numbers[:_NAMES_SHOWN]))
    return listed + (f" and {len(numbers) - _NAMES_SHOWN} more" if len(numbers) > _NAMES_SHOWN else "")
