"""Sample a few evenly spaced frames from a video with PyAV, resized and centre-cropped for the model.

Frames are taken at the centres of ``num_frames`` equal segments of the video. For each target time the
frame on screen at that moment is returned: the last frame whose presentation time is <= the target.
Times come from timestamps, never from frame counts, so variable frame rate video is sampled correctly.

Two strategies produce the same frames at different costs:

* ``seek``: for each target, seek to the keyframe before it and decode forward to it. Cost grows with the
  number of targets and the keyframe spacing, not with the length of the video.
* ``sequential``: decode the whole video once from the start. Cheaper for short clips, and for videos
  whose keyframes are so far apart that every seek would re-decode most of the file anyway.

``auto`` estimates both costs from the keyframe index when the container has one and picks the cheaper;
see ``choose_method`` and benchmarks/decode_bench.py for the measurements behind its constants.

Rotation: PyAV >= 13 exposes the display-matrix rotation of decoded frames as ``VideoFrame.rotation``
(counter-clockwise degrees). Frames are turned upright with ``np.rot90`` after cropping; mirror flips in
the matrix are not applied (PyAV reports only the rotation component).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
from av.video.reformatter import Colorspace, Interpolation

from ts2cli.errors import Ts2Error, VideoDecodeError, one_line

METHODS = ("auto", "seek", "sequential")

# Cost of one seek, in units of "decoding one frame": demuxer seek, decoder flush, refilling the
# frame-threading pipeline and decoding the keyframe itself. benchmarks/decode_bench.py measured 4-6 ms per
# seek against 0.65 ms per frame (640x360 H.264, 2 cores): 6-9 frames.
SEEK_OVERHEAD_FRAMES = 8.0
# Without a keyframe index (MPEG-TS/PS) the cost of seeking is unknown, so decide on length alone. Seeking
# there is also dearer (timestamp search, landing mid-GOP): on H.264 TS with 1 s GOPs the benchmark found
# seek and sequential at parity around 30 s.
SHORT_VIDEO_S = 30.0
# Seek only when the estimate says clearly cheaper: estimates are rough, and sequential reads are kinder to
# spinning disks. The estimate tracked measured time within ~15% in the benchmark.
SEEK_ADVANTAGE = 1.2
# How far past a keyframe a snapped target lands (see snap_targets).
SNAP_LEAD_FRAMES = 3
# Containers whose demuxer loads a complete keyframe index when the file is opened. Others (MPEG-PS/TS,
# raw streams) build it while reading, so an early index is partial and would mislead the cost estimate.
_INDEXED_FORMATS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})
# Demuxers that open single still pictures (png_pipe, jpeg_pipe, ...): a photo named .mp4 is reported
# rather than indexed as a one-frame video. Animated formats (gif, apng) are decoded like any video.
_IMAGE_FORMAT_SUFFIX = "_pipe"
_IMAGE_FORMATS = frozenset({"image2"})
# Files up to this size without a keyframe index get an exact duration from a demux pass (~300 MB/s here).
_EXACT_DURATION_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SampledVideo:
    frames: np.ndarray  # (n, size, size, 3) uint8 RGB, n <= num_frames, upright, short side resized, cropped
    times: list[float]  # presentation time (s, from the start of the video) of each returned frame, ascending
    duration: float  # seconds (best estimate)
    width: int  # display width after rotation and pixel aspect ratio
    height: int
    cut_short: bool = False  # the frames ran out well before ``duration``, which the container states for sure

    @property
    def playable_seconds(self) -> float:
        """How long the video plays: its duration, or up to its last frame when the frames ran out early (a
        truncated download states the whole file's duration but plays only what it holds)."""
        return self.times[-1] if self.cut_short and self.times else self.duration


@dataclass
class _Pick:
    time: float
    pixels: np.ndarray
    display_size: tuple[int, int]


def in_time_order(picks: list[_Pick]) -> list[_Pick]:
    """The picks by time, one per time: a damaged file's timestamps can jump back, and token shift and the
    temporal transformer take the frames' order for time's."""
    return sorted({pick.time: pick for pick in picks}.values(), key=lambda pick: pick.time)


def uniform_targets(duration: float, num_frames: int) -> list[float]:
    """Centres of ``num_frames`` equal segments of ``[0, duration]``."""
    if num_frames <= 0:
        return []
    step = max(duration, 0.0) / num_frames
    return [(i + 0.5) * step for i in range(num_frames)]


def sample_frames(
    path: Path | str,
    num_frames: int = 12,
    size: int = 224,
    method: str = "auto",
    *,
    keyframe_snap: float = 0.0,
) -> SampledVideo:
    """Decode ``num_frames`` evenly spaced frames of ``path`` (fewer if the video has fewer frames).

    ``keyframe_snap`` (0 to 0.5, default 0 = exact) lets each target move by up to that fraction of a
    segment to just after a keyframe (known from the container index), so reaching it decodes a handful
    of frames instead of up to a whole group of pictures: about 8x faster on long videos (see the
    benchmark). Both methods still return the same frames for the same setting.

    Raises ``VideoDecodeError`` with a one-line reason for any file that cannot be decoded.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if num_frames < 1 or size < 1:
        raise ValueError("num_frames and size must be positive")
    if not 0.0 <= keyframe_snap <= 0.5:
        raise ValueError("keyframe_snap must be between 0 and 0.5")
    path = Path(path)
    check_file(path)
    try:
        return _sample(path, num_frames, size, method, keyframe_snap)
    except VideoDecodeError:
        raise
    except av.error.InvalidDataError as error:
        raise VideoDecodeError("not a video file or unsupported format (or the file is damaged)") from error
    except av.error.DecoderNotFoundError as error:
        raise VideoDecodeError("unsupported video codec") from error
    except (av.FFmpegError, OSError, EOFError, ValueError, MemoryError) as error:
        # Matched on errno, not on PermissionError: FFmpeg maps EPERM ("cannot seek") to it as well.
        if getattr(error, "errno", None) == errno.EACCES:
            raise VideoDecodeError("permission denied") from error
        raise VideoDecodeError(f"could not decode: {one_line(error)}") from error


def check_file(path: Path) -> None:
    """Turn the common filesystem problems into plain reasons before FFmpeg turns them into codes."""
    try:
        info = path.stat()
    except FileNotFoundError as error:
        raise VideoDecodeError("file not found") from error
    except PermissionError as error:
        raise VideoDecodeError("permission denied") from error
    except OSError as error:
        raise VideoDecodeError(f"cannot read file: {one_line(error)}") from error
    if path.is_dir():
        raise VideoDecodeError("is a folder, not a video file")
    if info.st_size == 0:
        raise VideoDecodeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoDecodeError("permission denied")


@dataclass
class _Plan:
    stream: av.video.stream.VideoStream
    start: float  # absolute time of the first frame (s)
    duration: float
    fps: float
    keyframes: list[float] | None  # absolute seconds, from the container index; None if unknown
    targets: list[float]  # absolute seconds
    method: str  # "seek" or "sequential"
    duration_known: bool = True  # False for a demuxer's estimate (MPEG-PS/TS without an index, from the bit rate)


def plan_sampling(
    container: av.container.InputContainer,
    path: Path,
    num_frames: int,
    method: str = "auto",
    keyframe_snap: float = 0.0,
) -> _Plan:
    """Everything decided before decoding: stream, duration, target times, and the method ``auto`` picks."""
    stream = video_stream(container)
    stream.codec_context.thread_type = "AUTO"
    for other in container.streams:
        if other.index != stream.index:
            other.discard = av.stream.Discard.all  # the demuxer then skips their packets cheaply
    start = _start_time(container, stream)
    keyframes = _index_keyframes(container, stream)
    duration = _known_duration(container, stream)
    known = keyframes is not None
    # Without an index the duration is the demuxer's estimate, which can be well off for MPEG-PS/TS;
    # reading the packets (no decoding) of a small file costs milliseconds and makes it exact.
    if duration is None or (keyframes is None and _file_size(path) <= _EXACT_DURATION_MAX_BYTES):
        demuxed = _demuxed_duration(path, stream.index, _frame_rate(stream))
        duration, known = demuxed or duration, demuxed is not None
    if duration is None:
        # No timestamps at all (raw elementary streams): seeking is impossible, so decode everything.
        duration, method = _decoded_duration(path, stream.index), "sequential"
    fps = _frame_rate(stream, duration)
    targets = [start + t for t in uniform_targets(duration, num_frames)]
    if keyframe_snap > 0 and keyframes:
        targets = snap_targets(targets, keyframes, fps, keyframe_snap * duration / num_frames)
    if method == "auto":
        method = choose_method(duration, fps, keyframes, targets)
    return _Plan(stream, start, duration, fps, keyframes, targets, method, known)


def _sample(path: Path, num_frames: int, size: int, method: str, keyframe_snap: float) -> SampledVideo:
    # metadata_errors="ignore": a badly encoded title tag must not cost us the pictures.
    with av.open(str(path), mode="r", metadata_errors="ignore") as container:
        plan = plan_sampling(container, path, num_frames, method, keyframe_snap)
        convert = _Converter(size, plan.stream)
        if plan.method == "seek":
            picks = _sample_by_seeking(container, plan, convert)
        else:
            decoded = _decode(container, plan.stream, plan.fps, plan.start)
            picks = _sample_sequentially(decoded, plan.targets, convert)
    if not picks:
        raise VideoDecodeError("no decodable frames")
    picks = in_time_order(picks)
    # A frame is picked within a segment of each target (a quarter more with keyframe snapping): the last one
    # further from the end than two segments means the frames ran out (a truncated download, a damaged tail).
    missing = plan.duration - (picks[-1].time - plan.start)
    return SampledVideo(
        frames=np.stack([p.pixels for p in picks]),
        times=[round(max(0.0, p.time - plan.start), 6) for p in picks],  # 2.6, not 2.5999999999999996
        duration=plan.duration,
        width=picks[0].display_size[0],
        height=picks[0].display_size[1],
        cut_short=plan.duration_known and missing > max(1.0, 2 * plan.duration / num_frames),
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    fmt = container.format.name
    if fmt.endswith(_IMAGE_FORMAT_SUFFIX) or fmt in _IMAGE_FORMATS:
        kind = fmt.removesuffix(_IMAGE_FORMAT_SUFFIX)
        raise VideoDecodeError(f"a still image ({kind}), not a video")
    # Cover art in music files shows up as a one-picture video stream; it is not video content.
    attached = av.stream.Disposition.attached_pic
    videos = [s for s in container.streams.video if not s.disposition & attached]
    if not videos:
        if container.streams.audio:
            raise VideoDecodeError("no video stream (audio only?)")
        raise VideoDecodeError("no video stream")
    stream = max(videos, key=lambda s: (bool(s.disposition & av.stream.Disposition.default), s.width * s.height))
    if stream.codec_context is None or stream.codec_context.codec is None:
        raise VideoDecodeError("unsupported video codec")
    return stream


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _start_time(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    start = _seconds(stream.start_time, stream.time_base)
    if start is None and container.start_time is not None:
        start = container.start_time / av.time_base
    return start or 0.0


def _known_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    # The video stream's own duration first: the container's is the longest stream, often the audio.
    duration = _seconds(stream.duration, stream.time_base)
    if duration and duration > 0:
        return duration
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _demuxed_duration(path: Path, index: int, fps: float) -> float | None:
    """Duration from packet timestamps: reads the file but decodes nothing."""
    first = last = None
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams[index]
        # Some containers (FLV, MPEG-TS) leave packet durations at 0: the last frame lasts one period.
        period = max(1, round(1 / (fps * stream.time_base)))
        try:
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                end = packet.pts + (packet.duration or period)
                first = packet.pts if first is None else min(first, packet.pts)
                last = end if last is None else max(last, end)
        except (av.FFmpegError, OSError, ValueError):
            pass  # damaged tail: what was read so far is still the best estimate
        if first is None or last is None or last <= first:
            return None
        return float((last - first) * stream.time_base)


def _decoded_duration(path: Path, index: int) -> float:
    """Last resort for streams without timestamps: count decoded frames."""
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams[index]
        stream.codec_context.thread_type = "AUTO"
        fps = _frame_rate(stream)
        times = [_time(frame) for frame in _decode(container, stream, fps, 0.0)]
    if not times:
        raise VideoDecodeError("no decodable frames")
    return max(times) - min(times) + 1 / fps


def _frame_rate(stream: av.video.stream.VideoStream, duration: float | None = None) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and 0 < rate < 1000:
            return float(rate)
    if duration and stream.frames:
        return stream.frames / duration
    return 30.0


def _index_keyframes(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> list[float] | None:
    """Keyframe times (absolute seconds) from the container index, or None when it is absent or partial."""
    if not _INDEXED_FORMATS & set(container.format.name.split(",")):
        return None
    times = sorted(float(e.timestamp * stream.time_base) for e in stream.index_entries if e.is_keyframe)
    return times or None


def snap_targets(targets: list[float], keyframes: list[float], fps: float, window: float) -> list[float]:
    """Move each target to just after its nearest keyframe when that is within ``window`` seconds.

    "Just after" (a few frame periods) because index times can be decode times, which precede the
    keyframe's display time when B-frames are used; a target before it would fall in the previous GOP.
    """
    lead = SNAP_LEAD_FRAMES / fps
    snapped: list[float] = []
    for target in targets:
        i = bisect.bisect_left(keyframes, target)
        near = min(keyframes[max(0, i - 1) : i + 1], key=lambda k: abs(k - target))
        moved = near + lead
        ok = abs(moved - target) <= window and (not snapped or moved > snapped[-1])
        snapped.append(moved if ok else target)
    return snapped


def choose_method(duration: float, fps: float, keyframes: list[float] | None, targets: list[float]) -> str:
    """'seek' or 'sequential', whichever should decode less (seek overheads counted as frames)."""
    if keyframes is None:
        return "sequential" if duration < SHORT_VIDEO_S else "seek"
    sequential_cost = duration * fps
    seek_cost = _SeekPlan(keyframes, fps).estimate_cost(targets)
    return "seek" if seek_cost * SEEK_ADVANTAGE < sequential_cost else "sequential"


@dataclass
class _SeekPlan:
    """Decides, target by target, whether a seek saves work over decoding forward."""

    keyframes: list[float] | None  # absolute seconds, sorted; None when unknown
    fps: float
    seeking_useless: bool = False  # set when a seek landed no further than where we already were

    def keyframe_before(self, t: float) -> float | None:
        if not self.keyframes:
            return None
        i = bisect.bisect_right(self.keyframes, t + 1e-6)
        return self.keyframes[i - 1] if i else self.keyframes[0]

    def should_seek(self, position: float | None, target: float) -> bool:
        if position is None:
            return True
        if self.seeking_useless:
            return False
        if self.keyframes is None:
            # Unknown keyframes: seek when the gap is worth more than a seek would cost.
            return (target - position) * self.fps > SEEK_OVERHEAD_FRAMES
        keyframe = self.keyframe_before(target)
        # Seeking only helps if it jumps past frames we would otherwise decode: a keyframe must lie ahead.
        return keyframe is not None and (keyframe - position) * self.fps > SEEK_OVERHEAD_FRAMES

    def estimate_cost(self, targets: list[float]) -> float:
        """Frames decoded (plus seek overheads) to reach every target; mirrors _sample_by_seeking."""
        cost, position = 0.0, None
        for target in targets:
            if self.should_seek(position, target):
                keyframe = self.keyframe_before(target)
                start = keyframe if keyframe is not None and keyframe <= target else target
                cost += SEEK_OVERHEAD_FRAMES + (target - start) * self.fps + 1
            else:
                cost += max(0.0, target - (position or 0.0)) * self.fps
            position = target
        return cost


def resize_and_crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(width, height) to resize a picture to so that its short side is ``size``, and the (top, left) of the centred
    ``size`` square: the geometry of open_clip's eval transform (torchvision's Resize truncates the long side,
    CenterCrop rounds the offsets), so that only the resampling filter differs from it."""
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    return new_w, new_h, round((new_h - size) / 2), round((new_w - size) / 2)


class _Converter:
    """Turns the few frames we keep into upright, square RGB arrays: resize, crop, rotate."""

    def __init__(self, size: int, stream: av.video.stream.VideoStream) -> None:
        self.size = size
        sar = stream.sample_aspect_ratio
        self.pixel_aspect = float(sar) if sar and sar > 0 else 1.0

    def __call__(self, frame: av.VideoFrame, time: float) -> _Pick:
        size = self.size
        width, height = frame.width, frame.height
        display_width = max(1, round(width * self.pixel_aspect))
        # Scale so the short side of the *displayed* picture is `size`, in one swscale pass.
        new_w, new_h, top, left = resize_and_crop_geometry(display_width, height, size)
        rgb = frame.reformat(
            width=new_w,
            height=new_h,
            format="rgb24",
            interpolation=Interpolation.BICUBIC,
            src_colorspace=self._colorspace(frame),
            src_color_range=frame.color_range or None,
            threads=1,
        ).to_ndarray()
        pixels = rgb[top : top + size, left : left + size]
        rotation = _rotation(frame)
        if rotation % 180:
            display_width, height = height, display_width
        if rotation:
            pixels = np.rot90(pixels, k=rotation // 90)  # rot90 turns counter-clockwise, like the matrix
        return _Pick(time, np.ascontiguousarray(pixels), (display_width, height))

    @staticmethod
    def _colorspace(frame: av.VideoFrame) -> Colorspace | None:
        # Untagged video: players assume BT.709 for HD and BT.601 for SD; swscale would assume BT.601.
        if frame.colorspace == 2 and frame.height >= 720:  # 2 = AVCOL_SPC_UNSPECIFIED
            return Colorspace.ITU709
        return None


def _rotation(frame: av.VideoFrame) -> int:
    """Display rotation in counter-clockwise degrees, snapped to 0/90/180/270."""
    try:
        degrees = frame.rotation
    except (AttributeError, ValueError):  # PyAV without display-matrix support
        return 0
    if degrees is None or not math.isfinite(degrees):
        return 0
    return (round(degrees / 90) * 90) % 360


def _decode(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: float, start: float
) -> Iterator[av.VideoFrame]:
    """Decoded frames of ``stream`` from the current position, skipping damaged packets.

    Frames without a timestamp (raw streams) get one: the previous frame's time plus one frame period.
    """
    period = 1 / fps
    last_time = start - period
    for frame in _decode_raw(container, stream):
        if frame.pts is None and frame.time_base:
            frame.pts = round((last_time + period) / frame.time_base)
        last_time = _time(frame)
        yield frame


def _decode_raw(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[av.VideoFrame]:
    packets = container.demux(stream)
    flushed = False
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except (av.FFmpegError, OSError, ValueError):
            break  # the demuxer gave up (damaged or truncated file): keep what was decoded
        flushed = packet.size == 0
        try:
            frames = stream.decode(packet)
        except (av.FFmpegError, ValueError):
            continue  # one damaged packet costs at most the frames that depend on it
        yield from frames
    if not flushed:
        # The flush packet never came: drain the frames still inside the (threaded) decoder.
        try:
            yield from stream.decode(None)
        except (av.FFmpegError, ValueError):
            return


def _time(frame: av.VideoFrame) -> float:
    time = frame.time
    return float(time) if time is not None else 0.0


def _sample_sequentially(frames: Iterator[av.VideoFrame], targets: list[float], convert: _Converter) -> list[_Pick]:
    picks: list[_Pick] = []
    previous: av.VideoFrame | None = None
    remaining = list(targets)

    def keep(frame: av.VideoFrame) -> None:
        time = _time(frame)
        if not picks or picks[-1].time != time:
            picks.append(convert(frame, time))

    for frame in frames:
        while remaining and _time(frame) > remaining[0]:
            keep(previous if previous is not None else frame)
            remaining.pop(0)
        if not remaining:
            break  # everything after the last target is never looked at
        previous = frame
    if remaining and previous is not None:
        keep(previous)  # the duration was overestimated: the last frame covers the remaining targets
    return picks


def _sample_by_seeking(container: av.container.InputContainer, plan: _Plan, convert: _Converter) -> list[_Pick]:
    seeker = _SeekPlan(plan.keyframes, plan.fps)
    picks: list[_Pick] = []
    frames: Iterator[av.VideoFrame] | None = None
    previous: av.VideoFrame | None = None  # last frame at or before the current target
    ahead: av.VideoFrame | None = None  # first frame after it, already decoded
    for target in plan.targets:
        position = _time(previous) if previous is not None else None
        if frames is None or seeker.should_seek(position, target):
            frames = _seek(container, plan, target, seeker)
            landed = next(frames, None)
            if seeker.keyframes is None and position is not None and landed is not None:
                # Landing no further than where we were means no keyframe lies between: stop jumping back.
                seeker.seeking_useless |= _time(landed) <= position
            previous, ahead = None, landed
        while True:
            frame = ahead if ahead is not None else next(frames, None)
            ahead = None
            if frame is None:
                break  # end of stream: the last frame covers the target
            if _time(frame) > target:
                ahead = frame
                break
            previous = frame
        chosen = previous if previous is not None else ahead
        if chosen is not None and (not picks or _time(chosen) > picks[-1].time):
            picks.append(convert(chosen, _time(chosen)))
    return picks


def _seek(
    container: av.container.InputContainer, plan: _Plan, target: float, seeker: _SeekPlan
) -> Iterator[av.VideoFrame]:
    """Frames from the keyframe at or before ``target``.

    Demuxers without an index (MPEG-PS/TS) seek by searching timestamps and may land after the target, or on
    a frame that is not a keyframe, from which nothing decodes. Then try a second earlier, then the start.
    """
    stream = plan.stream
    for when in (target, target - 1.0, None):
        offset = (stream.start_time or 0) if when is None else max(0, math.floor(when / stream.time_base))
        try:
            container.seek(offset, stream=stream, backward=True)
        except (av.FFmpegError, OSError):
            break  # unseekable: decode on from wherever we are
        frames = _decode(container, stream, plan.fps, plan.start)
        first = next(frames, None)
        if first is not None and (_time(first) <= target or when is None):
            if when is None and target - plan.start > 1.0:
                seeker.seeking_useless = True  # seeking failed here and will fail again: decode forward
            return itertools.chain([first], frames)
    return _decode(container, stream, plan.fps, plan.start)


# ----------------------------------------------------------------------------- decoding ahead of a consumer

T = TypeVar("T")
R = TypeVar("R")


def decode_ahead(items: Sequence[T], decode: Callable[[T], R], workers: int, ahead: int) -> Iterator[tuple[T, R | str]]:
    """``decode(item)`` for every item, in order, with up to ``ahead`` decodes running in ``workers`` threads.

    PyAV releases the GIL while decoding, so threads overlap decoding with the model. A failure comes back as
    a one-line reason instead of an exception: one broken file must never stop a run.
    """
    queue: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ts2-decode") as pool:
        try:
            for item in items:
                queue.append((item, pool.submit(decode, item)))
                if len(queue) >= max(ahead, workers):
                    yield _outcome(*queue.popleft())
            while queue:
                yield _outcome(*queue.popleft())
        finally:
            for _, future in queue:
                future.cancel()


def _outcome(item: T, future: Future[R]) -> tuple[T, R | str]:
    try:
        return item, future.result()
    except Exception as error:  # a broken file must never abort the run
        return item, _failure_reason(error)


def _failure_reason(error: Exception) -> str:
    """What the user reads about a video that could not be decoded: ts2's own message, else FFmpeg's in one line."""
    if isinstance(error, Ts2Error):
        return str(error)
    return f"could not decode: {type(error).__name__}: {one_line(error)}"
