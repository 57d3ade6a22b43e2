"""The reference implementation's frame sampler (spec §1.1–§1.2), used under ``--compat official``.

CLIP4Clip/TS2-Net read videos with OpenCV: ``fps = int(CAP_PROP_FPS)`` (truncated, 29.97 → 29), ``total =
ceil(frame_count / fps)`` whole seconds, then for ``sec = 0 … total`` (inclusive) the frame number ``sec·fps``,
stopping at the first frame that cannot be read. That is one frame per second, the first of each second. More
than ``max_frames`` (12) such frames are thinned with ``np.linspace(0, n-1, 12, dtype=int)``; fewer are kept as
they are. Each frame is resized with PIL bicubic so its short side is ``size``, then centre-cropped.

Here PyAV replaces OpenCV: frames are decoded in order and "frame number n" is the n-th decoded frame, which is
what OpenCV's frame seek lands on for constant-frame-rate files (MSR-VTT's are). Display rotation and pixel
aspect ratio are ignored, as OpenCV's reader of the time did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .decode import check_file, video_stream
from .errors import VideoDecodeError, one_line

OFFICIAL_MAX_FRAMES = 12


@dataclass(frozen=True)
class OfficialSample:
    frames: np.ndarray
    """(n, size, size, 3) uint8 RGB, n ≤ max_frames."""
    frame_numbers: list[int]
    """The decoded frame number of each returned frame."""
    fps: int
    """The truncated integer frame rate the reference computes with."""


def second_starts(frame_count: int, fps: int, decodable: float = math.inf) -> list[int]:
    """Frame numbers the reference reads: ``sec·fps`` for ``sec = 0 … ceil(frame_count/fps)``, up to the first
    number at or beyond ``decodable`` (the read that fails). ``fps`` below 1 is taken as 1 (the reference would
    divide by zero)."""
    fps = max(fps, 1)
    total_seconds = -(-frame_count // fps)
    numbers = []
    for sec in range(total_seconds + 1):
        if sec * fps >= decodable:
            break
        numbers.append(sec * fps)
    return numbers


def thin_out(count: int, max_frames: int = OFFICIAL_MAX_FRAMES) -> list[int]:
    """Positions kept out of ``count`` frames: all of them, or ``linspace(0, count-1, max_frames)`` truncated."""
    if count <= max_frames:
        return list(range(count))
    return np.linspace(0, count - 1, num=max_frames, dtype=int).tolist()


def resize_and_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3): torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image,
    i.e. open_clip's eval transform before ``ToTensor`` (spec §1.2), written with PIL alone."""
    from PIL import Image

    image = Image.fromarray(rgb)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # torchvision truncates the long side
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != (width, height):
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    # torchvision rounds the offsets (half to even, as Python's round does).
    left, top = round((width - size) / 2.0), round((height - size) / 2.0)
    return np.array(image.crop((left, top, left + size, top + size)).convert("RGB"))


def sample_official(path: Path | str, size: int = 224, max_frames: int = OFFICIAL_MAX_FRAMES) -> OfficialSample:
    """The frames the reference would feed the model for ``path``; ``VideoDecodeError`` if there are none
    (where the reference would silently use an all-zero video and mask, spec §10.1 quirk 6)."""
    path = Path(path)
    check_file(path)
    try:
        numbers, frames, fps = _read_second_starts(path, size)
    except VideoDecodeError:
        raise
    except av.error.InvalidDataError as error:
        raise VideoDecodeError("not a video file or unsupported format (or the file is damaged)") from error
    except (av.FFmpegError, OSError, EOFError, ValueError, MemoryError) as error:
        raise VideoDecodeError(f"could not decode: {one_line(error)}") from error
    if not frames:
        raise VideoDecodeError("no decodable frames")
    keep = thin_out(len(frames), max_frames)
    return OfficialSample(np.stack([frames[i] for i in keep]), [numbers[i] for i in keep], fps)


def _read_second_starts(path: Path, size: int) -> tuple[list[int], list[np.ndarray], int]:
    with av.open(str(path), mode="r", metadata_errors="ignore") as container:
        stream = video_stream(container)
        stream.codec_context.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 0
        fps = int(rate)
        # Reads past the last decodable frame fail, which the decode loop below finds out by itself.
        wanted = second_starts(_frame_count(container, stream, float(rate)), fps)
        wanted_set, last = set(wanted), wanted[-1]
        numbers: list[int] = []
        frames: list[np.ndarray] = []
        try:
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted_set:
                    numbers.append(number)
                    frames.append(resize_and_crop(frame.to_ndarray(format="rgb24"), size))
                if number >= last:
                    break
        except (av.FFmpegError, EOFError) as error:
            # The reference stops at the first failed read and keeps what it has.
            if not frames:
                raise VideoDecodeError(f"could not decode: {one_line(error)}") from error
    return numbers, frames, max(fps, 1)


def _frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream, rate: float) -> int:
    """OpenCV's ``CAP_PROP_FRAME_COUNT``: the stream's frame count, else round(duration × frame rate)."""
    if stream.frames:
        return stream.frames
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    return math.floor(duration * rate + 0.5)
