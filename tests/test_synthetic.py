import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from ts2cli.datasets import load_caption_csv
from ts2cli.synthetic import COLOURS, MOTION_PAIRS, SHAPES, caption_count, write_shapes_dataset, write_shapes_splits

REPO = Path(__file__).resolve().parents[1]


def _rows(csv_path: Path) -> list[tuple[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["video", "caption"]
        return [(video, caption) for video, caption in reader]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def _shape_mask(frames: np.ndarray) -> np.ndarray:
    # The background is grey, every shape colour is strongly saturated.
    return frames.max(axis=-1) - frames.min(axis=-1) > 60


@pytest.fixture(scope="module")
def full_round(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete round of the 72 captions."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_clips=72, seed=7)


def test_deterministic_and_prefix_stable(tmp_path: Path):
    first = write_shapes_dataset(tmp_path / "a", n_clips=4, seed=11)
    again = write_shapes_dataset(tmp_path / "b", n_clips=4, seed=11)
    longer = write_shapes_dataset(tmp_path / "c", n_clips=5, seed=11)
    write_shapes_dataset(tmp_path / "d", n_clips=4, seed=12)

    assert first.read_bytes() == again.read_bytes()
    assert _rows(longer)[:4] == _rows(first)
    for i in range(4):
        name = f"videos/clip_{i:04d}.mp4"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "d" / name).read_bytes()
    assert len(_rows(longer)) == 5


def test_a_full_round_has_every_caption_once(full_round: Path):
    rows = _rows(full_round)
    assert [video for video, _ in rows] == [f"videos/clip_{i:04d}.mp4" for i in range(72)]
    counts = Counter(caption for _, caption in rows)
    expected = {
        f"a {colour} {shape} {motion}"
        for colour in COLOURS
        for shape in SHAPES
        for pair in MOTION_PAIRS
        for motion in pair
    }
    assert set(counts) == expected
    assert set(counts.values()) == {1}
    # Clips 2k and 2k+1 show one colour and shape with the two opposite motions of one pair.
    opposite = {frozenset(pair) for pair in MOTION_PAIRS}
    for k in range(0, 72, 2):
        (subject_a, motion_a), (subject_b, motion_b) = (_split_caption(c) for _, c in rows[k : k + 2])
        assert subject_a == subject_b
        assert frozenset((motion_a, motion_b)) in opposite


def _split_caption(caption: str) -> tuple[str, str]:
    """("a red square", "moving left") from "a red square moving left"."""
    words = caption.split(" ")
    return " ".join(words[:3]), " ".join(words[3:])


def _first_pair(rows: list[tuple[str, str]], motions: tuple[str, str]) -> dict[str, str]:
    for k in range(0, len(rows), 2):
        pair = {_split_caption(caption)[1]: video for video, caption in rows[k : k + 2]}
        if set(pair) == set(motions):
            return pair
    raise AssertionError(f"no pair for {motions}")


@pytest.mark.parametrize("motions", MOTION_PAIRS)
def test_motion_follows_the_caption(full_round: Path, motions: tuple[str, str]):
    pair = _first_pair(_rows(full_round), motions)
    for motion, video in pair.items():
        mask = _shape_mask(_decode(full_round.parent / video))
        ys, xs = np.arange(mask.shape[1]), np.arange(mask.shape[2])
        area = mask.sum(axis=(1, 2))
        assert area.min() > 0
        cx = (mask.sum(axis=1) * xs).sum(axis=1) / area
        cy = (mask.sum(axis=2) * ys).sum(axis=1) / area
        track, sign = {
            "moving left": (cx, -1),
            "moving right": (cx, 1),
            "rising": (cy, -1),  # image rows grow downwards
            "falling": (cy, 1),
            "shrinking": (area, -1),
            "growing": (area, 1),
        }[motion]
        steps = sign * np.diff(track)
        assert sign * (track[-1] - track[0]) > 0.25 * np.abs(track).max(), motion
        assert (steps > -1.0).all(), motion  # steady, apart from sub-pixel jitter


@pytest.mark.parametrize("motions", MOTION_PAIRS)
def test_mirrored_pair_shows_the_same_frames(full_round: Path, motions: tuple[str, str]):
    first, second = (_decode(full_round.parent / video) for video in _first_pair(_rows(full_round), motions).values())
    frames = len(first)
    distance = np.abs(first[:, None] - second[None]).mean(axis=(2, 3, 4))  # mean |Δ| per frame pair
    reversed_pairs = distance[np.arange(frames), frames - 1 - np.arange(frames)]
    same_time = distance[np.arange(frames), np.arange(frames)]
    # Frame i of one clip is frame T-1-i of the other up to codec noise; in time order the clips differ.
    assert reversed_pairs.max() < 3.5
    assert same_time.max() > 1.5 * reversed_pairs.max()


def test_splits_share_videos_and_load(tmp_path: Path):
    train_csv, test_csv = write_shapes_splits(tmp_path, n_train=6, n_test=5, seed=3)
    train, test = load_caption_csv(train_csv), load_caption_csv(test_csv)
    assert train.video_ids == [f"videos/clip_{i:04d}.mp4" for i in range(6)]
    assert test.video_ids == [f"videos/clip_{i:04d}.mp4" for i in range(6, 11)]
    assert len(set(test.captions)) == 5
    assert all(path.is_file() for path in train.videos + test.videos)
    assert _rows(train_csv) == _rows(write_shapes_dataset(tmp_path / "alone", n_clips=6, seed=3))


def test_caption_subsets(tmp_path: Path):
    subset = {"colours": ("red", "blue"), "shapes": ("ball",)}
    assert caption_count(**subset) == 12 and caption_count() == 72
    _, test_csv = write_shapes_splits(tmp_path, n_train=2, n_test=12, seed=0, size=32, frames=2, **subset)
    captions = [caption for _, caption in _rows(test_csv)]
    assert len(set(captions)) == 12
    assert {_split_caption(c)[0] for c in captions} == {"a red ball", "a blue ball"}
    with pytest.raises(ValueError, match="colours"):
        write_shapes_dataset(tmp_path / "bad", n_clips=2, seed=0, colours=("purple",))


def test_rejects_odd_sizes(tmp_path: Path):
    with pytest.raises(ValueError, match="even"):
        write_shapes_dataset(tmp_path, n_clips=2, seed=0, size=63)


def test_benchmark_cli(tmp_path: Path):
    script = REPO / "benchmarks" / "shapes.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--n", "3", "--n-test", "2", "--seed", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "train.csv" in done.stdout
    assert len(_rows(tmp_path / "train.csv")) == 3
    assert len(_rows(tmp_path / "test.csv")) == 2
