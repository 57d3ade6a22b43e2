"""A small captioned data set of moving shapes in which only motion tells some captions apart.

Captions read "a {colour} {shape} {motion}": 4 colours × 3 shapes × 6 motions = 72 captions. The motions
come in opposite pairs (moving left / moving right, rising / falling, shrinking / growing), and so do the
clips: clips 2k and 2k+1 are each other played backwards, so both show the same frames, background noise
included, in opposite orders. A model that treats a clip as an unordered bag of frames cannot tell the two
captions of a pair apart (50% at best within a pair), while colour, shape and the axis of motion can be read
off single frames. Each pair draws its own start, distance, size, colour tint, background and noise level; a
moving shape crosses most of the frame, and a shrinking one ends at under half its size, on a plain background.

``colours`` and ``shapes`` restrict the captions to a subset (``caption_count`` says how many they make): fewer
captions that differ only in colour or shape put more of a contrastive batch's pairs on motion.

Layout written by ``write_shapes_dataset``: ``videos/clip_XXXX.mp4`` and ``captions.csv`` (``video,caption``,
paths relative to the CSV), readable with ``ts2cli.datasets.load_caption_csv``. Output is deterministic for a
seed, and a data set with more clips extends one with fewer.

Frame rate: 16 frames at the default 8 fps make 2-second clips. A decoder that samples one frame per second
(spec §1.1) sees only 2 of them; pass ``fps=1`` for clips whose every frame is one such sample.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 75, 225),
    "yellow": (225, 200, 35),
}
SHAPES = ("square", "ball", "triangle")
# (forward, backward): the forward motion is rendered, the backward one is the same frames reversed.
MOTION_PAIRS = (("moving left", "moving right"), ("rising", "falling"), ("shrinking", "growing"))

# Independent random streams per purpose, so that adding clips never changes earlier ones.
_STREAM_ORDER, _STREAM_PAIR = 0, 1


@dataclass(frozen=True)
class _Pair:
    colour: str
    shape: str
    axis: int  # index into MOTION_PAIRS
    backward_first: bool  # which of the two clips gets the lower number


def caption_count(colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES) -> int:
    """How many distinct captions these colours and shapes make: one round of the data set."""
    return len(colours) * len(shapes) * 2 * len(MOTION_PAIRS)


def write_shapes_dataset(
    out_dir: Path,
    n_clips: int,
    seed: int,
    size: int = 64,
    frames: int = 16,
    fps: int = 8,
    *,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> Path:
    """Write ``n_clips`` clips and ``captions.csv`` under ``out_dir``; returns the CSV's path.

    Every caption occurs equally often when ``n_clips`` is a multiple of ``caption_count(colours, shapes)`` (72
    with all four colours and three shapes; fewer colours or shapes make fewer captions that differ only in
    motion more often).
    """
    out_dir = Path(out_dir)
    combos = _combos(colours, shapes)
    rows = _write_clips(out_dir, seed, combos, split=0, n_clips=n_clips, first=0, size=size, frames=frames, fps=fps)
    return _write_csv(out_dir / "captions.csv", rows)


def write_shapes_splits(
    out_dir: Path,
    n_train: int,
    n_test: int,
    seed: int,
    size: int = 64,
    frames: int = 16,
    fps: int = 8,
    *,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> tuple[Path, Path]:
    """Write disjoint ``train.csv`` and ``test.csv`` over one ``videos/`` folder; returns both CSV paths.

    The two splits draw from separate random streams, so their clips differ (test clips are numbered after the
    training ones), and each starts its own round through the captions: every run of
    ``caption_count(colours, shapes)`` test clips from the first one on holds each caption once, so a retrieval
    matrix over one such run has one right answer per row.
    """
    out_dir = Path(out_dir)
    combos = _combos(colours, shapes)
    common = {"size": size, "frames": frames, "fps": fps}
    train = _write_clips(out_dir, seed, combos, split=0, n_clips=n_train, first=0, **common)
    test = _write_clips(out_dir, seed, combos, split=1, n_clips=n_test, first=n_train, **common)
    return _write_csv(out_dir / "train.csv", train), _write_csv(out_dir / "test.csv", test)


def _combos(colours: Sequence[str], shapes: Sequence[str]) -> list[tuple[str, str, int]]:
    unknown = sorted((set(colours) - set(COLOURS)) | (set(shapes) - set(SHAPES)))
    if unknown or not colours or not shapes:
        raise ValueError(f"colours must come from {list(COLOURS)} and shapes from {list(SHAPES)}; got {unknown}")
    return list(itertools.product(colours, shapes, range(len(MOTION_PAIRS))))


def _write_clips(
    out_dir: Path,
    seed: int,
    combos: list[tuple[str, str, int]],
    *,
    split: int,
    n_clips: int,
    first: int,
    size: int,
    frames: int,
    fps: int,
) -> list[tuple[str, str]]:
    """Render and encode clips ``first … first+n_clips-1``; returns their (relative path, caption) rows."""
    if size < 32 or size % 2:
        raise ValueError("size must be an even number of pixels, at least 32")
    if frames < 2:
        raise ValueError("frames must be at least 2")
    videos = out_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(math.ceil(n_clips / 2)):
        pair = _pair_spec(seed, split, k, combos)
        forward = _render_forward(pair, np.random.default_rng([seed, split, _STREAM_PAIR, k]), size, frames)
        clips = [(forward, MOTION_PAIRS[pair.axis][0]), (forward[::-1], MOTION_PAIRS[pair.axis][1])]
        if pair.backward_first:
            clips.reverse()
        for offset, (pixels, motion) in enumerate(clips[: n_clips - 2 * k]):
            name = f"videos/clip_{first + 2 * k + offset:04d}.mp4"
            _encode(out_dir / name, pixels, fps)
            rows.append((name, f"a {pair.colour} {pair.shape} {motion}"))
    return rows


def _pair_spec(seed: int, split: int, k: int, combos: list[tuple[str, str, int]]) -> _Pair:
    # Pairs walk through all colour × shape × axis combinations (36 by default) in a fresh shuffled order per
    # round, which keeps the captions balanced in any prefix of the data set.
    round_, slot = divmod(k, len(combos))
    order = np.random.default_rng([seed, split, _STREAM_ORDER, round_]).permutation(len(combos))
    colour, shape, axis = combos[order[slot]]
    backward_first = bool(np.random.default_rng([seed, split, _STREAM_ORDER, round_, slot]).integers(2))
    return _Pair(colour, shape, axis, backward_first)


def _render_forward(pair: _Pair, rng: np.random.Generator, size: int, frames: int) -> np.ndarray:
    """(frames, size, size, 3) uint8 frames of the pair's forward motion (left, up or shrinking)."""
    cx, cy, radius = _trajectory(pair.axis, rng, size, frames)
    colour = np.clip(np.array(COLOURS[pair.colour]) + rng.integers(-20, 21, size=3), 0, 255)
    background = _backgrounds(rng, size, frames)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        alpha = _coverage(pair.shape, cx[t], cy[t], radius[t], size)[:, :, None]
        out[t] = np.rint(background[t][:, :, None] * (1 - alpha) + colour * alpha).astype(np.uint8)
    return out


def _trajectory(
    axis: int, rng: np.random.Generator, size: int, frames: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, centre y and radius (pixels), moving at constant speed in the forward direction."""
    progress = np.linspace(0.0, 1.0, frames)
    if axis == 2:  # shrinking about a fixed centre, to well under half the starting size
        big = rng.uniform(0.3, 0.4) * size
        small = big * rng.uniform(0.3, 0.45)
        centre = rng.uniform(big + 1, size - big - 1, size=2)
        radius = big + (small - big) * progress
        return np.full(frames, centre[0]), np.full(frames, centre[1]), radius

    radius = np.full(frames, rng.uniform(0.15, 0.2) * size)
    r = radius[0]
    # The shape crosses most of the frame, so that its first and last positions are far apart.
    room = size - 2 * r - 2
    distance = rng.uniform(0.6, 1.0) * room
    start = rng.uniform(r + 1 + distance, size - r - 1)  # far end first: the forward motion decreases x or y
    moving = start - distance * progress
    fixed = np.full(frames, rng.uniform(r + 1, size - r - 1))
    # Sub-pixel jitter keeps the path from being a perfectly straight line; reversal keeps it a mirror image.
    moving = moving + rng.normal(0.0, 0.3, frames)
    return (moving, fixed, radius) if axis == 0 else (fixed, moving, radius)


def _backgrounds(rng: np.random.Generator, size: int, frames: int) -> np.ndarray:
    """(frames, size, size) grey levels: a plain per-clip level with a faint gradient and faint fresh noise in
    every frame (nothing in the background hints at the direction of motion)."""
    level = rng.uniform(60, 170)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size)
    gradient = rng.uniform(0, 15) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    noise = rng.normal(0.0, rng.uniform(1, 3), size=(frames, size, size))
    return np.clip(level + gradient + noise, 0, 255)


def _coverage(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Fraction of each pixel inside the shape, from 2×2 supersampling so sub-pixel motion stays smooth."""
    centres = (np.arange(2 * size) + 0.5) / 2
    dx = centres[None, :] - cx
    dy = centres[:, None] - cy
    if shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "ball":
        inside = dx**2 + dy**2 <= r**2
    else:  # equilateral triangle pointing up, inscribed in the circle of radius r
        inside = (dy <= r / 2) & (np.abs(dx) <= (dy + r) / math.sqrt(3))
    return inside.reshape(size, 2, size, 2).mean(axis=(1, 3))


def _encode(path: Path, pixels: np.ndarray, fps: int) -> None:
    time_base = Fraction(1, fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        # A fixed, fine quantiser (2 of 31): the clips are tiny, and codec noise should stay small next to the
        # motion. mpeg4's rate control would otherwise starve frames this small.
        stream.options = {"qmin": "2", "qmax": "2"}
        # One thread keeps the encoded bytes identical from run to run.
        stream.codec_context.thread_count = 1
        for t, image in enumerate(pixels):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = t
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("video", "caption"))
        writer.writerows(rows)
    return path
