"""Shared test fixtures: small synthetic videos written with PyAV, and a set of broken files.

Every frame carries its own index as a 5x5 grid of black/white cells inside the centre square of the
picture (the part that survives a centre crop), so a test can tell exactly WHICH frame a decoder returned:
``read_index(rgb)`` recovers it from a decoded, square-cropped frame of any size.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

GRID = 5
DATA_BITS = GRID * GRID - 2  # the last two cells are fixed markers (white, black): validity + orientation
_WHITE, _BLACK = 235, 16
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"

# Codec chosen from the file extension when the caller does not name one.
_DEFAULT_CODECS = {
    ".mp4": "libx264",
    ".m4v": "libx264",
    ".mov": "libx264",
    ".mkv": "libx264",
    ".ts": "libx264",
    ".webm": "libvpx-vp9",
    ".avi": "mpeg4",
    ".mpg": "mpeg2video",
    ".mpeg": "mpeg2video",
}


@dataclass(frozen=True)
class WrittenVideo:
    path: Path
    times: list[float]  # presentation time (s) of every frame written, frame i shows index i
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        """End of the last frame, assuming it lasts as long as the gap before it."""
        if len(self.times) < 2:
            return self.times[-1] + 0.1
        return self.times[-1] + (self.times[-1] - self.times[-2])


def index_bits(index: int) -> np.ndarray:
    if not 0 <= index < 2**DATA_BITS:
        raise ValueError(f"frame index {index} does not fit in {DATA_BITS} bits")
    bits = [(index >> b) & 1 for b in range(DATA_BITS)] + [1, 0]
    return np.array(bits, dtype=bool)


def _cell_map(side: int) -> np.ndarray:
    """(side, side) array giving, for each pixel of the centre square, the grid cell it belongs to."""
    cells = (np.arange(side) * GRID) // side
    return cells[:, None] * GRID + cells[None, :]


def render_frame(index: int, width: int, height: int, texture: np.ndarray | None = None) -> np.ndarray:
    """RGB frame with ``index`` encoded in the centre square; grey elsewhere."""
    side = min(width, height)
    img = np.full((height, width, 3), 128, dtype=np.uint8)
    square = np.where(index_bits(index)[_cell_map(side)], _WHITE, _BLACK).astype(np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    img[top : top + side, left : left + side] = square[:, :, None]
    if texture is not None:
        # Low-amplitude moving noise gives the encoder realistic work without hiding the index cells.
        shift = (index * 7) % texture.shape[1]
        img = np.clip(img.astype(np.int16) + np.roll(texture, shift, axis=1)[:height, :width, None], 0, 255)
        img = img.astype(np.uint8)
    return img


def read_index(rgb: np.ndarray) -> int:
    """Index encoded in a decoded frame that has been centre-cropped to a square (any size)."""
    side = rgb.shape[0]
    if rgb.shape[1] != side:
        raise ValueError("read_index expects a square (centre-cropped) frame")
    centres = ((np.arange(GRID) + 0.5) * side / GRID).astype(int)
    luma = rgb[:, :, :3].astype(np.float32).mean(axis=2)
    bits = luma[centres[:, None], centres[None, :]].reshape(-1) > 128
    if not (bits[DATA_BITS] and not bits[DATA_BITS + 1]):
        raise ValueError("marker cells not found: frame is not a test frame or is rotated")
    return int(sum(1 << b for b in range(DATA_BITS) if bits[b]))


def _frame_times(num_frames: int, fps: float, vfr: bool, seed: int) -> list[float]:
    if not vfr:
        return [i / fps for i in range(num_frames)]
    # Irregular gaps between 0.3x and 3x the nominal frame period, like a phone that drops frames.
    rng = np.random.default_rng(seed)
    gaps = rng.uniform(0.3, 3.0, size=num_frames) / fps
    return [0.0, *np.cumsum(gaps[: num_frames - 1]).round(3).tolist()]


def _pixel_format(codec: str, width: int, height: int) -> str:
    if codec == "mjpeg":
        return "yuvj420p"
    if codec == "libx264" and (width % 2 or height % 2):
        return "yuv444p"  # x264 refuses odd sizes with 4:2:0 chroma
    return "yuv420p"


def write_video(
    path: Path,
    seconds: float = 2.0,
    fps: float = 10,
    width: int = 64,
    height: int = 48,
    codec: str | None = None,
    gop: int | None = None,
    vfr: bool = False,
    rotation: int = 0,
    num_frames: int | None = None,
    texture: bool = False,
    preset: str = "ultrafast",
    crf: int = 20,
    bframes: int | None = None,
    seed: int = 0,
    container_options: dict[str, str] | None = None,
) -> WrittenVideo:
    """Encode a synthetic video whose frame i shows index i; the container follows the extension.

    ``gop`` is the keyframe interval in frames (None: the encoder default; use a huge value for a single
    keyframe). ``vfr`` gives irregular timestamps. ``rotation`` writes display-matrix rotation metadata
    (counter-clockwise degrees, as ``VideoFrame.rotation`` reads it back). ``num_frames`` overrides
    ``seconds * fps``. ``container_options`` go to the muxer, e.g. ``{"movflags": "faststart"}``.
    """
    path = Path(path)
    codec = codec or _DEFAULT_CODECS.get(path.suffix.lower(), "libx264")
    count = num_frames if num_frames is not None else max(1, round(seconds * fps))
    times = _frame_times(count, fps, vfr, seed)
    # A millisecond clock represents VFR gaps exactly; CFR uses the frame rate itself where it is integral.
    time_base = Fraction(1, 1000) if vfr or fps != int(fps) else Fraction(1, int(fps))
    rate = Fraction(fps).limit_denominator(1001)
    texture_img = None
    if texture:
        rng = np.random.default_rng(seed)
        texture_img = rng.integers(-12, 13, size=(height, width * 2), dtype=np.int16)

    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = _pixel_format(codec, width, height)
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if gop is not None:
            stream.codec_context.gop_size = gop
        options: dict[str, str] = {}
        if codec == "libx264":
            options = {"preset": preset, "crf": str(crf)}
            if gop is not None:
                # Without these x264 inserts extra keyframes at scene cuts (every frame here is a "cut").
                options.update({"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"})
            if bframes is not None:
                options["bframes"] = str(bframes)
        elif codec in ("libvpx-vp9", "libvpx"):
            options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        elif codec in ("mpeg4", "mpeg2video", "mjpeg"):
            stream.codec_context.bit_rate = 4_000_000
            options = {"qscale": "3"}
        stream.options = options
        if rotation:
            stream.set_display_rotation(rotation)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(render_frame(i, width, height, texture_img), format="rgb24")
            frame.pts = round(t / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return WrittenVideo(path=path, times=times, width=width, height=height)


def _png_bytes(width: int = 32, height: int = 24) -> bytes:
    """A valid grey PNG written by hand, so the tests need no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes([100, 150, 200]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _write_audio_only(path: Path, seconds: float = 1.0) -> None:
    rate = 16000
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = (np.sin(np.arange(int(rate * seconds)) * 0.05) * 0.3).astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_broken_files(directory: Path) -> dict[str, Path]:
    """Files a decoder must reject cleanly (or, for ``partly_corrupt``, may decode in part).

    Keys: empty, random_bytes, truncated, audio_only, png_as_mp4, partly_corrupt, and unreadable (only when
    not running as root, since root ignores file permissions).
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    files["empty"] = directory / "empty.mp4"
    files["empty"].write_bytes(b"")

    files["random_bytes"] = directory / "random.mp4"
    files["random_bytes"].write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())

    # The mp4 index (moov) is written at the end, so the first half of the file has frames but no index.
    whole = write_video(directory / "whole.mp4", seconds=3, fps=10, width=96, height=64, gop=10).path
    data = whole.read_bytes()
    files["truncated"] = directory / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])

    # Overwrite a stretch in the middle of the frame data: the index survives, some frames are garbage.
    corrupt = bytearray(data)
    mid = len(corrupt) // 2
    corrupt[mid : mid + 400] = np.random.default_rng(2).integers(0, 256, 400, dtype=np.uint8).tobytes()
    files["partly_corrupt"] = directory / "partly_corrupt.mp4"
    files["partly_corrupt"].write_bytes(bytes(corrupt))
    whole.unlink()

    files["audio_only"] = directory / "audio_only.mp4"
    _write_audio_only(files["audio_only"])

    files["png_as_mp4"] = directory / "picture.mp4"
    files["png_as_mp4"].write_bytes(_png_bytes())

    if os.geteuid() != 0:
        files["unreadable"] = directory / "unreadable.mp4"
        shutil.copyfile(files["partly_corrupt"], files["unreadable"])
        files["unreadable"].chmod(0)
    return files


@pytest.fixture(scope="session", autouse=True)
def private_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The user cache folder (weights digests, eval features) of every test and the ts2 processes they start: a
    fresh one, never the user's."""
    folder = tmp_path_factory.mktemp("user-cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., WrittenVideo]:
    """``make_video(name, **write_video_options)`` writes ``tmp_path / name`` and returns a WrittenVideo."""

    def make(name: str = "video.mp4", **options: object) -> WrittenVideo:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_video(target, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_broken_files(tmp_path: Path) -> Iterator[Callable[[], dict[str, Path]]]:
    """``make_broken_files()`` writes the broken-file set under ``tmp_path / 'broken'``."""
    written: list[Path] = []

    def make() -> dict[str, Path]:
        files = write_broken_files(tmp_path / "broken")
        written.extend(files.values())
        return files

    yield make
    for path in written:  # give permissions back so pytest can clean tmp_path
        if path.exists():
            path.chmod(0o644)


@pytest.fixture
def shared_videos() -> Path:
    """The sample videos shipped beside the repository (skips when they are absent)."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"shared sample videos not present at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@pytest.fixture
def read_frame_index() -> Callable[[np.ndarray], int]:
    """``read_frame_index(rgb)``: the index a make_video frame carries, from a square-cropped decode."""
    return read_index


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and several times faster than on two when cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
