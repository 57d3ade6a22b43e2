"""Measure frame sampling: seek vs sequential vs auto (exact and keyframe-snapped) vs decoding every frame.

Run ``python benchmarks/decode_bench.py`` from the repository root (``--quick`` skips the 600 s videos).
Synthetic H.264 videos (640x360, 25 fps, light moving texture) are generated once into a cache folder
(``--cache``, default: the system temp folder): MP4 with a keyframe every 250 frames or a single keyframe,
10 s / 60 s / 600 s, plus 10 s and 30 s MPEG-TS with 1 s GOPs (no index: auto's length rule). The sample
videos in ../shared/videos are measured too when present. Prints a markdown table of median wall times, the
600 s vs 10 s ratios, and a calibration of the seek overhead (SEEK_OVERHEAD_FRAMES in ts2cli/decode.py).
Timings are wall-clock: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import av

from ts2cli.decode import plan_sampling, sample_frames

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
SINGLE_KEYFRAME_GOP = 1_000_000
SNAP = 0.25  # keyframe_snap measured next to exact sampling
VIDEOS = [  # (file name, seconds, gop); .ts has no index, so auto falls back to the length rule
    ("h264_10s_gop25.ts", 10, 25),
    ("h264_30s_gop25.ts", 30, 25),
    ("h264_10s_gop250", 10, 250),
    ("h264_10s_1kf", 10, SINGLE_KEYFRAME_GOP),
    ("h264_60s_gop250", 60, 250),
    ("h264_60s_1kf", 60, SINGLE_KEYFRAME_GOP),
    ("h264_600s_gop250", 600, 250),
    ("h264_600s_1kf", 600, SINGLE_KEYFRAME_GOP),
]


def _load_writer() -> Callable[..., object]:
    """The synthetic-video writer lives with the tests; load it by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_ts2_test_videos", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module.write_video


def generate(cache: Path, quick: bool) -> list[Path]:
    write_video = _load_writer()
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seconds, gop in VIDEOS:
        if quick and seconds > 60:
            continue
        path = cache / (name if "." in name else f"{name}.mp4")
        if not path.exists():
            began = time.perf_counter()
            unfinished = path.with_name(f"part-{path.name}")
            write_video(unfinished, seconds=seconds, fps=25, width=640, height=360, gop=gop, texture=True, crf=23)
            unfinished.rename(path)
            print(f"generated {path.name} in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        paths.append(path)
    return paths


def decode_all(path: Path) -> int:
    """Decode every frame (no conversion): the floor for any sequential approach."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@dataclass
class Row:
    video: str
    duration: float
    keyframes: int | None  # in the container index; None when the format has none
    picks: str  # what auto chooses (exact targets)
    picks_snap: str  # what auto chooses with keyframe_snap=SNAP
    seconds: dict[str, float] = field(default_factory=dict)  # median wall time per variant


def describe(path: Path) -> Row:
    with av.open(str(path)) as container:
        exact = plan_sampling(container, path, 12)
    with av.open(str(path)) as container:
        snapped = plan_sampling(container, path, 12, keyframe_snap=SNAP)
    keyframes = len(exact.keyframes) if exact.keyframes else None
    return Row(path.name, exact.duration, keyframes, exact.method, snapped.method)


def measure(path: Path, repeats: int) -> Row:
    row = describe(path)
    variants: dict[str, Callable[[], object]] = {
        "seek": partial(sample_frames, path, 12, 224, method="seek"),
        "sequential": partial(sample_frames, path, 12, 224, method="sequential"),
        "auto": partial(sample_frames, path, 12, 224),
        "auto_snap": partial(sample_frames, path, 12, 224, keyframe_snap=SNAP),
    }
    for name, fn in variants.items():
        row.seconds[name] = median_time(fn, repeats)
    row.seconds["all_frames"] = median_time(partial(decode_all, path), max(1, repeats // 2))
    print(f"measured {path.name}", file=sys.stderr)
    return row


def calibrate_seek(path: Path, seeks: int = 24) -> tuple[float, float]:
    """(ms per decoded frame, ms per seek that decodes one keyframe) on a video with regular keyframes."""
    frames = decode_all(path)
    per_frame = median_time(partial(decode_all, path), 3) / frames

    def seek_keyframes() -> None:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "AUTO"
            keyframes = [e.timestamp for e in stream.index_entries if e.is_keyframe]
            for i in range(seeks):
                container.seek(keyframes[i % len(keyframes)], stream=stream)
                next(container.decode(stream))

    per_seek = median_time(seek_keyframes, 3) / seeks
    return per_frame * 1000, per_seek * 1000


def print_report(rows: list[Row]) -> None:
    print(
        f"| video | duration (s) | keyframes | auto picks | seek (s) | sequential (s) | auto (s) "
        f"| auto, snap {SNAP} (s) | all frames (s) | sequential/seek | all frames/auto |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r.seconds
        picks = r.picks if r.picks == r.picks_snap else f"{r.picks} ({r.picks_snap} with snap)"
        print(
            f"| {r.video} | {r.duration:.1f} | {r.keyframes or '?'} | {picks} | {t['seek']:.3f} "
            f"| {t['sequential']:.3f} | {t['auto']:.3f} | {t['auto_snap']:.3f} | {t['all_frames']:.3f} "
            f"| {t['sequential'] / t['seek']:.2f} | {t['all_frames'] / t['auto']:.1f} |"
        )
    by_name = {r.video: r for r in rows}
    print()
    for gop in ("gop250", "1kf"):
        long, short = by_name.get(f"h264_600s_{gop}.mp4"), by_name.get(f"h264_10s_{gop}.mp4")
        if long and short:
            for variant in ("auto", "auto_snap"):
                ratio = long.seconds[variant] / short.seconds[variant]
                print(f"- {variant}, 600 s vs 10 s ({gop}): {ratio:.2f}x (target: within 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ts2cli-decode-bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the 600 s videos")
    args = parser.parse_args()

    paths = generate(args.cache, args.quick)
    if SHARED_VIDEOS.is_dir():
        paths += sorted(p for p in SHARED_VIDEOS.iterdir() if p.is_file())
    rows = [measure(path, args.repeats) for path in paths]
    print_report(rows)
    per_frame, per_seek = calibrate_seek(args.cache / "h264_60s_gop250.mp4")
    print(
        f"\nseek calibration (640x360 H.264): {per_frame:.2f} ms per decoded frame, {per_seek:.2f} ms per seek "
        f"to a keyframe -> one seek costs about {per_seek / per_frame - 1:.0f} frames of decoding"
    )


if __name__ == "__main__":
    main()
