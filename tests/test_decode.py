from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ts2cli import decode
from ts2cli.decode import SampledVideo, resize_and_crop_geometry, sample_frames, uniform_targets
from ts2cli.errors import VideoDecodeError

MakeVideo = Callable[..., Any]  # conftest.make_video -> conftest.WrittenVideo
read_index: Callable[[np.ndarray], int]


@pytest.fixture(autouse=True)
def _index_reader(read_frame_index: Callable[[np.ndarray], int]) -> None:
    # conftest is not importable under every pytest import mode; its helpers arrive as fixtures.
    global read_index
    read_index = read_frame_index


def indices(result: SampledVideo) -> list[int]:
    return [read_index(frame) for frame in result.frames]


def expected_indices(video: Any, duration: float, num_frames: int = 12) -> list[int]:
    """Frame on screen at each uniform target: the last one written at or before it, each once."""
    chosen: list[int] = []
    for target in uniform_targets(duration, num_frames):
        index = max(i for i, t in enumerate(video.times) if t <= target + 1e-6)
        if not chosen or chosen[-1] != index:
            chosen.append(index)
    return chosen


def check_sampling(video: Any, result: SampledVideo, num_frames: int = 12, size: int = 224) -> None:
    # Containers disagree on how long the last frame lasts; allow one (longest) frame period.
    period = float(np.diff(video.times).max()) if video.num_frames > 1 else 0.1
    assert result.duration == pytest.approx(video.duration, abs=1.01 * period + 1e-3)
    assert result.frames.dtype == np.uint8
    assert result.frames.shape[1:] == (size, size, 3)
    assert len(result.times) == len(result.frames) <= num_frames
    assert result.times == sorted(result.times) and len(set(result.times)) == len(result.times)
    assert indices(result) == expected_indices(video, result.duration, num_frames)
    # Returned times are the written presentation times of the returned frames.
    assert result.times == pytest.approx([video.times[i] for i in indices(result)], abs=2e-3)


def test_uniform_targets_are_segment_centres() -> None:
    assert uniform_targets(12.0, 4) == [1.5, 4.5, 7.5, 10.5]
    assert uniform_targets(0.0, 3) == [0.0, 0.0, 0.0]
    assert uniform_targets(5.0, 0) == []


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("h264.mp4", {}),
        ("h264.mkv", {}),
        ("h264.mov", {"gop": 4}),
        ("vp9.webm", {}),
        ("mpeg4.avi", {}),
        ("mjpeg.mov", {"codec": "mjpeg"}),
        ("mpeg2.mpg", {"fps": 25}),  # MPEG-PS: non-zero start time (0.54 s), no index
        ("h264.ts", {"gop": 5}),  # MPEG-TS: no index, seeks by timestamp search
        ("bframes.mp4", {"bframes": 3, "preset": "veryfast", "gop": 8}),  # decode order != display order
    ],
)
@pytest.mark.parametrize("method", ["seek", "sequential", "auto"])
def test_samples_the_right_frames(make_video: MakeVideo, name: str, options: dict, method: str) -> None:
    video = make_video(name, seconds=3, width=80, height=64, **options)
    check_sampling(video, sample_frames(video.path, 12, 64, method=method), size=64)


def test_seek_and_sequential_return_identical_frames(make_video: MakeVideo) -> None:
    video = make_video("gop.mp4", seconds=6, fps=10, width=96, height=64, gop=7)
    seek = sample_frames(video.path, 12, 96, method="seek")
    sequential = sample_frames(video.path, 12, 96, method="sequential")
    assert seek.times == sequential.times
    assert np.array_equal(seek.frames, sequential.frames)
    assert (seek.duration, seek.width, seek.height) == (
        sequential.duration,
        sequential.width,
        sequential.height,
    )


@pytest.mark.parametrize("shape", [(320, 240), (240, 320), (1920, 1080), (853, 480), (1000, 563), (225, 224)])
def test_resize_and_crop_geometry_is_open_clips(shape: tuple[int, int]) -> None:
    """Spec §1.2: short side to 224, centre crop, as open_clip's eval transform (torchvision Resize + CenterCrop)."""
    import torch
    from torchvision.transforms import functional as tvf

    width, height = shape
    new_w, new_h, top, left = resize_and_crop_geometry(width, height, 224)
    assert tuple(tvf.resize(torch.zeros(1, height, width), 224, antialias=True).shape[1:]) == (new_h, new_w)
    rows = torch.arange(new_h, dtype=torch.float32)[:, None].expand(new_h, new_w)
    columns = torch.arange(new_w, dtype=torch.float32)[None, :].expand(new_h, new_w)
    crop = tvf.center_crop(torch.stack([rows, columns]), [224, 224])
    assert (int(crop[0, 0, 0]), int(crop[1, 0, 0])) == (top, left)


def test_pixels_are_resized_and_centre_cropped(make_video: MakeVideo) -> None:
    video = make_video("wide.mp4", seconds=1, width=160, height=64, crf=10)
    result = sample_frames(video.path, 4, 32)
    assert result.frames.shape == (4, 32, 32, 3)
    assert (result.width, result.height) == (160, 64)
    # The index grid fills the centre square; grey (128) borders must have been cropped away, and the
    # full-range conversion must give near-black and near-white cells (limited range would be 16/235).
    first = result.frames[0].astype(int)
    assert first.min() <= 30 and first.max() >= 220


def test_mjpeg_full_range_levels(make_video: MakeVideo) -> None:
    video = make_video("full.avi", codec="mjpeg", seconds=1, width=64, height=64, num_frames=1)
    frame = sample_frames(video.path, 1, 64).frames[0].astype(int)
    # Cells 23 (row 4, column 3) and 24 (row 4, column 4) are always white and black.
    white_marker = frame[int(4.5 * 64 / 5), int(3.5 * 64 / 5)]
    black_marker = frame[int(4.5 * 64 / 5), int(4.5 * 64 / 5)]
    assert abs(white_marker.mean() - 235) < 12 and abs(black_marker.mean() - 16) < 12


@pytest.mark.parametrize("method", ["seek", "sequential"])
def test_variable_frame_rate(make_video: MakeVideo, method: str) -> None:
    video = make_video("vfr.mp4", num_frames=40, fps=10, vfr=True, gop=6)
    assert np.ptp(np.diff(video.times)) > 0.1  # really irregular
    check_sampling(video, sample_frames(video.path, 12, 48, method=method), size=48)


@pytest.mark.parametrize("method", ["seek", "sequential", "auto"])
def test_video_with_fewer_frames_than_requested(make_video: MakeVideo, method: str) -> None:
    video = make_video("three.mp4", num_frames=3, fps=10)
    result = sample_frames(video.path, 12, 32, method=method)
    assert indices(result) == [0, 1, 2]  # every frame once, no padding duplicates
    assert result.times == pytest.approx([0.0, 0.1, 0.2])


def test_single_frame_video(make_video: MakeVideo) -> None:
    video = make_video("one.mp4", num_frames=1)
    result = sample_frames(video.path, 12, 32)
    assert indices(result) == [0] and result.times == [0.0]


def test_long_sparse_video_is_fast_with_seeking(make_video: MakeVideo) -> None:
    video = make_video("long.mp4", seconds=600, fps=1, width=32, height=32, gop=30)
    began = time.perf_counter()
    result = sample_frames(video.path, 12, 32)
    elapsed = time.perf_counter() - began
    check_sampling(video, result, size=32)
    assert elapsed < 2.0


@pytest.mark.parametrize("name", ["odd.avi", "odd.mp4"])  # MPEG-4 part 2 4:2:0, H.264 4:4:4
def test_odd_resolution(make_video: MakeVideo, name: str) -> None:
    video = make_video(name, seconds=2, width=131, height=71)
    result = sample_frames(video.path, 12, 50)
    check_sampling(video, result, size=50)
    assert (result.width, result.height) == (131, 71)


@pytest.mark.parametrize(("rotation", "turn"), [(90, 1), (-90, 3), (180, 2)])
def test_rotation_metadata_is_applied(make_video: MakeVideo, rotation: int, turn: int) -> None:
    video = make_video("phone.mp4", seconds=1, width=96, height=64, rotation=rotation)
    result = sample_frames(video.path, 4, 64)
    # The frame is turned counter-clockwise by `rotation`; turning it back recovers the encoded index.
    assert [read_index(np.rot90(f, -turn)) for f in result.frames] == expected_indices(video, result.duration, 4)
    assert (result.width, result.height) == ((64, 96) if turn % 2 else (96, 64))


def test_seeks_once_per_group_of_pictures(make_video: MakeVideo, monkeypatch: pytest.MonkeyPatch) -> None:
    seeks: list[float] = []
    real_seek = decode._seek

    def counting_seek(container, plan, target, seeker):  # type: ignore[no-untyped-def]
        seeks.append(target)
        return real_seek(container, plan, target, seeker)

    monkeypatch.setattr(decode, "_seek", counting_seek)
    single = make_video("single_keyframe.mp4", seconds=6, fps=10, gop=1000)
    check_sampling(single, sample_frames(single.path, 12, 48, method="seek"), size=48)
    assert len(seeks) == 1  # every target is in the one GOP: decode forward, never jump back

    seeks.clear()
    regular = make_video("gop10.mp4", seconds=24, fps=10, gop=10)
    check_sampling(regular, sample_frames(regular.path, 12, 48, method="seek"), size=48)
    assert len(seeks) == 12  # one keyframe per second, targets two seconds apart

    seeks.clear()
    # MPEG-TS has no index; seeking into the single GOP lands on frames that do not decode, so it falls
    # back to the start once and then decodes forward instead of seeking for every target.
    no_index = make_video("single_keyframe.ts", seconds=30, fps=10, width=32, height=32, gop=1000)
    check_sampling(no_index, sample_frames(no_index.path, 12, 32, method="seek"), size=32)
    assert len(seeks) <= 2


def test_keyframe_snap_moves_targets_just_past_keyframes(make_video: MakeVideo) -> None:
    video = make_video("snap.mp4", seconds=24, fps=10, width=32, height=32, gop=10)  # keyframe every 1 s
    seek = sample_frames(video.path, 12, 32, method="seek", keyframe_snap=0.25)
    sequential = sample_frames(video.path, 12, 32, method="sequential", keyframe_snap=0.25)
    assert seek.times == sequential.times and np.array_equal(seek.frames, sequential.frames)
    window = 0.25 * seek.duration / 12
    for target, got in zip(uniform_targets(seek.duration, 12), seek.times, strict=True):
        assert abs(got - target) <= window + 1e-6
    # Targets 1, 3, 5, ... s move to 3 frames past the keyframe at 1, 3, 5, ... s.
    assert [i % 10 for i in indices(seek)] == [decode.SNAP_LEAD_FRAMES] * 12
    with pytest.raises(ValueError, match="keyframe_snap"):
        sample_frames(video.path, keyframe_snap=0.9)


def test_auto_rule() -> None:
    keyframes_every_10s = [10.0 * i for i in range(60)]
    long_targets = uniform_targets(600, 12)
    assert decode.choose_method(600, 25, keyframes_every_10s, long_targets) == "seek"
    assert decode.choose_method(600, 25, [0.0], long_targets) == "sequential"  # one keyframe: seeking is moot
    assert decode.choose_method(10, 25, [0.0], uniform_targets(10, 12)) == "sequential"
    assert decode.choose_method(10, 25, None, uniform_targets(10, 12)) == "sequential"  # no index, short
    assert decode.choose_method(600, 25, None, long_targets) == "seek"  # no index, long


@pytest.mark.parametrize("missing", ["duration", "timestamps"])
def test_unknown_duration_fallbacks(make_video: MakeVideo, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    video = make_video("nodur.mp4", seconds=2, fps=10)
    monkeypatch.setattr(decode, "_known_duration", lambda container, stream: None)
    if missing == "timestamps":
        monkeypatch.setattr(decode, "_demuxed_duration", lambda path, index, fps: None)
    check_sampling(video, sample_frames(video.path, 12, 32), size=32)


def test_raw_stream_without_timestamps(make_video: MakeVideo) -> None:
    video = make_video("raw.h264", seconds=2, fps=10, codec="libx264")
    result = sample_frames(video.path, 12, 32)  # raw H.264 has no timestamps and cannot seek
    assert len(result.frames) == 12
    found = indices(result)
    assert found == sorted(found) and len(set(found)) == 12 and found[0] <= 1 and found[-1] >= 18


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        sample_frames("x.mp4", method="fastest")
    with pytest.raises(ValueError):
        sample_frames("x.mp4", num_frames=0)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "empty file"),
        ("random_bytes", "not a video file"),
        ("truncated", "not a video file"),
        ("audio_only", "no video stream"),
        ("png_as_mp4", "still image"),
        ("unreadable", "permission denied"),
    ],
)
def test_broken_files_give_one_line_reasons(make_broken_files: Callable, kind: str, message: str) -> None:
    files = make_broken_files()
    if kind not in files:
        pytest.skip("running as root: file permissions are not enforced")
    with pytest.raises(VideoDecodeError, match=message) as caught:
        sample_frames(files[kind])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("method", ["seek", "sequential"])
def test_partly_corrupt_video_decodes_or_fails_cleanly(make_broken_files: Callable, method: str) -> None:
    # Either outcome is acceptable for damaged files in general; this one (keyframe every second, damage
    # around 1.5 s) should decode, with the damaged stretch skipped and recovery at the next keyframe.
    path = make_broken_files()["partly_corrupt"]
    result = sample_frames(path, 12, 32, method=method)
    assert 1 <= len(result.frames) <= 12 and result.times == sorted(result.times)
    assert result.times[0] < 0.5 and result.times[-1] > 2.5


def test_truncated_file_with_index_first_keeps_what_is_there(make_video: MakeVideo) -> None:
    video = make_video("fast.mp4", seconds=4, fps=10, gop=10, container_options={"movflags": "faststart"})
    data = video.path.read_bytes()
    video.path.write_bytes(data[: len(data) // 2])  # the index promises 4 s; the data stops about halfway
    for method in ("seek", "sequential"):
        result = sample_frames(video.path, 12, 32, method=method)
        assert 1 <= len(result.frames) < 12 and result.times == sorted(result.times)
        assert indices(result) == sorted(set(indices(result)))
        assert result.cut_short and result.duration == pytest.approx(4.0, abs=0.2)


@pytest.mark.parametrize("name", ["whole.mkv", "cut.mkv", "whole.mp4"])
def test_frames_that_run_out_before_the_stated_duration_are_told(make_video: MakeVideo, name: str) -> None:
    video = make_video(name, seconds=10, fps=10, width=64, height=48, texture=True)
    if name.startswith("cut"):
        with open(video.path, "r+b") as file:  # a download stopped halfway: the header still says 10 s
            file.truncate(video.path.stat().st_size // 2)
    for method in ("seek", "sequential"):
        result = sample_frames(video.path, 12, 32, method=method, keyframe_snap=0.25)
        assert result.cut_short == name.startswith("cut"), (method, result.times, result.duration)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="not found"):
        sample_frames(tmp_path / "nope.mp4")
    with pytest.raises(VideoDecodeError, match="folder"):
        sample_frames(tmp_path)


@pytest.mark.parametrize("name", ["vtest.avi", "Megamind.avi", "cityCC0.mpg"])
def test_shared_sample_videos(shared_videos: Path, name: str) -> None:
    path = shared_videos / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    seek = sample_frames(path, 12, 224, method="seek")
    sequential = sample_frames(path, 12, 224, method="sequential")
    assert seek.frames.shape == (12, 224, 224, 3)
    assert seek.times == sequential.times and np.array_equal(seek.frames, sequential.frames)
    step = seek.duration / 12
    for target, got in zip(uniform_targets(seek.duration, 12), seek.times, strict=True):
        assert target - step / 2 <= got <= target + 1e-6  # the frame on screen at the target
    assert seek.frames.std() > 10  # real pictures, not blank frames
    assert not seek.cut_short and not sequential.cut_short


@pytest.mark.parametrize("method", ["seek", "sequential"])
def test_a_damaged_middle_still_gives_frames_in_time_order(make_video: MakeVideo, method: str) -> None:
    video = make_video("damaged.mp4", seconds=6, fps=10, width=160, height=120, texture=True)
    content = bytearray(video.path.read_bytes())
    third = len(content) // 3
    content[third : 2 * third] = np.random.default_rng(3).integers(0, 256, third, dtype=np.uint8).tobytes()
    video.path.write_bytes(bytes(content))
    try:
        sampled = sample_frames(video.path, 12, 32, method=method)
    except VideoDecodeError:
        return  # failing cleanly is allowed too
    assert sampled.times == sorted(set(sampled.times)) and len(sampled.times) == len(sampled.frames)
    assert all(t == round(t, 6) for t in sampled.times)


def test_frames_from_timestamps_that_jump_back_are_put_in_time_order() -> None:
    picks = [decode._Pick(time, np.full((2, 2, 3), int(time * 10), np.uint8), (2, 2)) for time in (3.1, 0.1, 3.7, 0.1)]
    ordered = decode.in_time_order(picks)
    assert [p.time for p in ordered] == [0.1, 3.1, 3.7] and [int(p.pixels[0, 0, 0]) for p in ordered] == [1, 31, 37]
