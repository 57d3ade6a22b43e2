import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ts2cli.datasets import CaptionSet, load_caption_csv, load_msrvtt_test, load_msrvtt_train
from ts2cli.errors import Ts2Error

SHARED_MSRVTT = Path(__file__).resolve().parents[2] / "shared" / "msrvtt"
TEST_CSV = SHARED_MSRVTT / "MSRVTT_JSFUSION_test.csv"


@pytest.fixture
def real_test_csv() -> Path:
    if not TEST_CSV.is_file():
        pytest.skip(f"MSR-VTT 1k-A list not present at {TEST_CSV}")
    return TEST_CSV


def _data_dir_with_first_rows(tmp_path: Path, source: Path, n_rows: int) -> tuple[Path, list[str]]:
    """A data dir holding the header and the first ``n_rows`` rows of ``source``; returns it and their ids."""
    lines = source.read_text(encoding="utf-8").splitlines()[: n_rows + 1]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_dir, [line.split(",")[2] for line in lines[1:]]


def test_real_1k_a_list(real_test_csv: Path, tmp_path: Path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(real_test_csv, data_dir)
    # A single tiny file copied under every name keeps this fast; only the names matter here.
    ids = [line.split(",")[2] for line in real_test_csv.read_text(encoding="utf-8").splitlines()[1:]]
    (data_dir / "videos").mkdir()
    for vid in ids:
        (data_dir / "videos" / f"{vid}.mp4").write_bytes(b"x")

    data = load_msrvtt_test(data_dir)
    assert len(data.videos) == len(data.captions) == len(data.video_ids) == 1000
    assert data.video_ids[:2] == ["video9770", "video9771"]
    assert data.captions[0] == "a person is connecting something to system"
    np.testing.assert_array_equal(data.caption_video, np.arange(1000))  # ground truth is the diagonal
    assert data.videos[0] == data_dir / "videos" / "video9770.mp4"
    assert len(data) == 1000
    assert data.missing == []


def test_resolution_order_and_webm_fallback(real_test_csv: Path, tmp_path: Path, make_video):
    data_dir, ids = _data_dir_with_first_rows(tmp_path, real_test_csv, 5)
    make_video(f"data/videos/{ids[0]}.mp4", num_frames=3)
    make_video(f"data/videos/{ids[1]}.webm", num_frames=3)
    make_video(f"data/MSRVTT/videos/all/{ids[2]}.mp4", num_frames=3)
    make_video(f"data/compressed_videos/{ids[3]}.mp4", num_frames=3)
    make_video(f"data/{ids[4]}.mp4", num_frames=3)
    # Lower-priority duplicates that must lose.
    make_video(f"data/compressed_videos/{ids[0]}.mp4", num_frames=3)
    make_video(f"data/videos/{ids[0]}.webm", num_frames=3)

    data = load_msrvtt_test(data_dir)
    assert data.videos == [
        data_dir / "videos" / f"{ids[0]}.mp4",
        data_dir / "videos" / f"{ids[1]}.webm",
        data_dir / "MSRVTT" / "videos" / "all" / f"{ids[2]}.mp4",
        data_dir / "compressed_videos" / f"{ids[3]}.mp4",
        data_dir / f"{ids[4]}.mp4",
    ]
    assert data.video_ids == ids


def test_missing_videos_message_and_allow_missing(real_test_csv: Path, tmp_path: Path, make_video):
    data_dir, ids = _data_dir_with_first_rows(tmp_path, real_test_csv, 6)
    make_video(f"data/videos/{ids[1]}.mp4", num_frames=3)

    with pytest.raises(Ts2Error) as caught:
        load_msrvtt_test(data_dir)
    message = str(caught.value)
    assert message.startswith("5 of 6 videos listed in MSRVTT_JSFUSION_test.csv were not found")
    assert str(data_dir / "compressed_videos") in message
    assert f"first: {ids[0]}, {ids[2]}, {ids[3]}" in message
    assert ids[5] not in message
    assert "\n" not in message

    data = load_msrvtt_test(data_dir, allow_missing=True)
    assert data.video_ids == [ids[1]]
    assert data.missing == [ids[0], *ids[2:]]
    np.testing.assert_array_equal(data.caption_video, [0])


def test_nothing_found_is_an_error_even_when_missing_is_allowed(real_test_csv: Path, tmp_path: Path):
    data_dir, _ = _data_dir_with_first_rows(tmp_path, real_test_csv, 2)
    with pytest.raises(Ts2Error, match="2 of 2 videos"):
        load_msrvtt_test(data_dir, allow_missing=True)


def test_missing_csv(tmp_path: Path):
    with pytest.raises(Ts2Error, match=r"MSRVTT_JSFUSION_test\.csv .* does not exist"):
        load_msrvtt_test(tmp_path)
    (tmp_path / "MSRVTT_JSFUSION_test.csv").mkdir()
    with pytest.raises(Ts2Error, match=r"MSRVTT_JSFUSION_test\.csv .* is a folder, not a file"):
        load_msrvtt_test(tmp_path)


@pytest.mark.parametrize(
    ("text", "delimiter"),
    [("key,vid_key,video_id,sentences\n", ","), ("key;vid_key;video_id;sentence\n", ";")],
)
def test_header_variants(tmp_path: Path, text: str, delimiter: str):
    rows = ["ret0", "msr1", "video1", "a cat plays"], ["ret1", "msr2", "video2", "a dog runs"]
    text = "\ufeff" + text + "".join(delimiter.join(r) + "\n" for r in rows)
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(text, encoding="utf-8")
    for vid in ("video1", "video2"):
        (tmp_path / f"{vid}.mp4").write_bytes(b"x")
    data = load_msrvtt_test(tmp_path)
    assert data.captions == ["a cat plays", "a dog runs"]
    assert data.video_ids == ["video1", "video2"]


def test_msrvtt_test_list_without_rows_or_with_empty_ones(tmp_path: Path):
    test_list = tmp_path / "MSRVTT_JSFUSION_test.csv"
    test_list.write_text("key,vid_key,video_id,sentence\n", encoding="utf-8")  # metrics over nothing would be NaN
    with pytest.raises(Ts2Error, match="lists no videos: it has a header and no rows"):
        load_msrvtt_test(tmp_path)
    test_list.write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,a cat\nret1,msr2,video2,\n", encoding="utf-8")
    with pytest.raises(Ts2Error, match=r"with an empty video_id or sentence \(line 3\)"):
        load_msrvtt_test(tmp_path)


def test_bad_header(tmp_path: Path):
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("id,text\nvideo1,hi\n", encoding="utf-8")
    with pytest.raises(Ts2Error, match=r"columns video_id, sentence .*missing video_id, sentence"):
        load_msrvtt_test(tmp_path)


def _write_train_files(data_dir: Path, video_ids: list[str], sentences: list[tuple[str, str]]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(video_ids) + "\n", encoding="utf-8")
    payload = {
        "videos": [{"video_id": v} for v in video_ids],
        "sentences": [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }
    (data_dir / "MSRVTT_data.json").write_text(json.dumps(payload), encoding="utf-8")
    (data_dir / "videos").mkdir(exist_ok=True)


def test_msrvtt_train(tmp_path: Path):
    data_dir = tmp_path / "data"
    sentences = [("video2", "two a"), ("video1", "one a"), ("video9", "test video"), ("video2", "two b")]
    _write_train_files(data_dir, ["video1", "video2"], sentences)
    for vid in ("video1", "video2", "video9"):
        (data_dir / "videos" / f"{vid}.mp4").write_bytes(b"x")

    data = load_msrvtt_train(data_dir)
    assert data.video_ids == ["video1", "video2"]  # the CSV's order
    assert data.captions == ["two a", "one a", "two b"]  # the JSON's order, test video left out
    np.testing.assert_array_equal(data.caption_video, [1, 0, 1])
    assert data.expanded and len(data) == 3
    assert data.captions_of(1) == ["two a", "two b"]

    per_video = load_msrvtt_train(data_dir, expand_sentences=False)
    assert not per_video.expanded and len(per_video) == 2
    assert per_video.captions == data.captions


def test_msrvtt_train_errors(tmp_path: Path):
    with pytest.raises(Ts2Error, match=r"MSRVTT_train\.9k\.csv"):
        load_msrvtt_train(tmp_path)

    data_dir = tmp_path / "data"
    _write_train_files(data_dir, ["video1", "video2"], [("video1", "one")])
    with pytest.raises(Ts2Error, match=r"no captions for 1 of the 2 videos .*\(video2\)"):
        load_msrvtt_train(data_dir)

    (data_dir / "MSRVTT_data.json").write_text("{}", encoding="utf-8")
    with pytest.raises(Ts2Error, match="'sentences' list"):
        load_msrvtt_train(data_dir)

    for caption in ("  ", 5, None, ["a", "b"]):  # each would be trained on, as "5" or "None"
        _write_train_files(data_dir, ["video1", "video2"], [("video1", "one"), ("video2", caption)])
        with pytest.raises(Ts2Error, match=r"captions that are empty or not text \(sentence 2, counting from 1\)"):
            load_msrvtt_train(data_dir)

    (data_dir / "MSRVTT_train.9k.csv").write_text("video_id\n", encoding="utf-8")
    with pytest.raises(Ts2Error, match="lists no videos"):
        load_msrvtt_train(data_dir)


def test_caption_csv_shared_and_absolute_videos(tmp_path: Path, make_video):
    make_video("clips/a.mp4", num_frames=3)
    make_video("clips/sub/b.webm", num_frames=3)
    outside = make_video("elsewhere/c.mp4", num_frames=3).path
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(
        "video,caption,notes\n"
        "a.mp4,a first caption,x\n"
        f"{outside},the outside one,\n"
        "sub/b.webm,  padded caption  ,\n"
        "\n"
        "./a.mp4,a second caption for a,\n"
        '"a.mp4","quoted, with a comma",\n',
        encoding="utf-8",
    )
    data = load_caption_csv(csv_path, tmp_path / "clips")
    assert isinstance(data, CaptionSet)
    assert data.video_ids == ["a.mp4", str(outside), "sub/b.webm"]
    assert data.videos == [tmp_path / "clips" / "a.mp4", outside, tmp_path / "clips" / "sub" / "b.webm"]
    assert data.captions[2] == "padded caption"
    assert data.captions[4] == "quoted, with a comma"
    np.testing.assert_array_equal(data.caption_video, [0, 1, 2, 0, 0])


def test_caption_csv_defaults_to_its_folder(tmp_path: Path, make_video):
    make_video("videos/a.mp4", num_frames=3)
    (tmp_path / "list.csv").write_text("video,caption\nvideos/a.mp4,hello\n", encoding="utf-8")
    assert load_caption_csv(tmp_path / "list.csv").video_ids == ["videos/a.mp4"]


def test_caption_csv_bad_rows(tmp_path: Path, make_video):
    make_video("a.mp4", num_frames=3)
    csv_path = tmp_path / "captions.csv"

    csv_path.write_text("clip,text\na.mp4,hi\n", encoding="utf-8")
    with pytest.raises(Ts2Error, match="header row with the columns video, caption"):
        load_caption_csv(csv_path)

    # a caption may hold any character, Unicode line separators too; a quoted line break stays in its caption
    csv_path.write_text('video,caption\na.mp4,one\u2028two\x85three\na.mp4,"four\nfive"\n', encoding="utf-8")
    assert load_caption_csv(csv_path).captions == ["one\u2028two\x85three", "four\nfive"]
    csv_path.write_text('video,caption\na.mp4,"x\ny"\na.mp4\n', encoding="utf-8")
    with pytest.raises(Ts2Error, match=r"too few columns \(line 4\)"):  # the file's line, not the record's
        load_caption_csv(csv_path)

    csv_path.write_text("video,caption\n", encoding="utf-8")  # metrics over no queries would be NaN
    with pytest.raises(Ts2Error, match="lists no videos: it has a header and no rows"):
        load_caption_csv(csv_path)

    csv_path.write_text("video,caption\na.mp4,hi\na.mp4\n,no video\na.mp4,\n", encoding="utf-8")
    with pytest.raises(Ts2Error, match=r"too few columns \(line 3\)"):
        load_caption_csv(csv_path)

    csv_path.write_text("video,caption\na.mp4,hi\n,no video\na.mp4,\n", encoding="utf-8")
    with pytest.raises(Ts2Error, match=r"with an empty video or caption \(lines 3, 4\)"):
        load_caption_csv(csv_path)

    for folder, problem in ((tmp_path / "nowhere", "does not exist"), (csv_path, "is a file, not a folder")):
        with pytest.raises(Ts2Error, match=f"the caption list's paths are relative to\\) {problem}"):
            load_caption_csv(csv_path, folder)

    csv_path.write_text("video,caption\na.mp4,hi\ngone.mp4,absent\n", encoding="utf-8")
    with pytest.raises(
        Ts2Error, match=r"1 of 2 videos listed in .* were not found in .* \(gone.mp4\); .*--allow-missing"
    ):
        load_caption_csv(csv_path)
    data = load_caption_csv(csv_path, allow_missing=True)
    assert data.captions == ["hi"]
    assert data.missing == ["gone.mp4"]
