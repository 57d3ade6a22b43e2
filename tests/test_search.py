"""`ts2 search` over a real library built from videos the test writes, with a tiny random model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import TINY_CLIP, tiny_net

from ts2cli.errors import LibraryError, Ts2Error
from ts2cli.indexer import IndexOptions, index_folders
from ts2cli.model import ModelOptions, load_model
from ts2cli.query import embed_example, like_query, load_library_model, text_query
from ts2cli.search import SearchOptions, global_vector, matching_moment, rank, score_videos, widen_float16
from ts2cli.store import Library


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    (folder / "tiny.json").write_text(json.dumps(TINY_CLIP))
    torch.save(
        {k.removeprefix("clip."): v for k, v in tiny_net(zero_shot=True).state_dict().items()}, folder / "tiny.pt"
    )
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_files):
    """A library of 14 distinct videos in two folders, indexed through the library API."""
    from conftest import write_video

    root = tmp_path_factory.mktemp("search")
    for i in range(14):
        folder = root / "videos" / ("holiday" if i < 5 else "work")
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / f"clip {i}.mp4", seconds=2 + i % 3, fps=8, width=64, height=48, texture=True, seed=i)
    options = ModelOptions(model="tiny", backbone_cfg=TINY_CLIP, pretrained=str(tiny_files / "tiny.pt"), device="cpu")
    model = load_model(options)
    model.precision_known = True  # fp32: a copy embedded later must get the same features (no timing-based bf16)
    with Library.open(root / "lib", write=True, create=True) as lib:
        summary = index_folders(lib, model, IndexOptions(roots=[root / "videos"]))
    assert summary.indexed == 14
    return root, options


def exact_ranking(lib, vector):
    ids, frames = lib.all_frame_features()
    scores, _ = score_videos(vector, frames)
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], scores[order]


@pytest.mark.parametrize("text", ["a dog catching a frisbee", "city street at night", "someone cooking"])
def test_results_equal_exact_ranking_when_candidates_cover_the_library(built, text):
    root, _ = built
    with Library.open(root / "lib") as lib:
        model = load_library_model(lib, None, device="cpu")
        vector, notes = text_query(model, text)
        hits = rank(lib, vector, SearchOptions(limit=14, candidates=14))
        expected_ids, expected_scores = exact_ranking(lib, vector)
    assert notes == []
    assert [h.video_id for h in hits] == expected_ids
    np.testing.assert_allclose([h.score for h in hits], expected_scores, rtol=1e-6)


def test_moment_points_at_the_heaviest_frames(built):
    root, _ = built
    with Library.open(root / "lib") as lib:
        model = load_library_model(lib, None, device="cpu")
        hits = rank(lib, text_query(model, "a red ball")[0], SearchOptions(limit=5))
    for hit in hits:
        times, weights = zip(*hit.frames, strict=True)
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
        best = int(np.argmax(weights))
        assert hit.moment.time == times[best]
        assert hit.moment.start <= times[best] <= hit.moment.end
        assert hit.moment.start >= 0 and hit.moment.end <= hit.duration + 1e-6


def test_matching_moment_spans_the_heavy_run():
    times = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    weights = np.array([0.02, 0.05, 0.4, 0.35, 0.1, 0.08])
    moment = matching_moment(times, weights, duration=6.0)
    assert (moment.start, moment.end, moment.time) == (2.0, 4.0, 2.5)
    edge = matching_moment(times, np.array([0.5, 0.3, 0.05, 0.05, 0.05, 0.05]), duration=6.0)
    assert (edge.start, edge.end) == (0.0, 2.0)


def test_large_folder_filter_goes_through_the_ann_index(built, monkeypatch):
    from ts2cli import search

    root, _ = built
    holiday = (root / "videos" / "holiday").resolve()
    with Library.open(root / "lib") as lib:
        vector = text_query(load_library_model(lib, None, device="cpu"), "a beach")[0]
        exact = rank(lib, vector, SearchOptions(limit=20, within=holiday))
        monkeypatch.setattr(search, "EXACT_SUBSET_LIMIT", 2)
        through_ann = rank(lib, vector, SearchOptions(limit=20, within=holiday))
    assert [h.video_id for h in through_ann] == [h.video_id for h in exact] and len(exact) == 5


def test_filters_and_limit(built, tmp_path):
    root, _ = built
    holiday = (root / "videos" / "holiday").resolve()
    link = tmp_path / "holiday link"
    link.symlink_to(holiday, target_is_directory=True)
    with Library.open(root / "lib") as lib:
        model = load_library_model(lib, None, device="cpu")
        vector = text_query(model, "a beach")[0]
        within = rank(lib, vector, SearchOptions(limit=20, within=holiday))
        assert len(within) == 5 and all(h.path.startswith(str(holiday)) for h in within)
        through_link = rank(lib, vector, SearchOptions(limit=20, within=link))  # indexed paths are resolved
        assert [h.video_id for h in through_link] == [h.video_id for h in within]
        three = rank(lib, vector, SearchOptions(limit=3))
        assert len(three) == 3
        everything = rank(lib, vector, SearchOptions(limit=14))
        threshold = everything[6].score
        above = rank(lib, vector, SearchOptions(limit=14, min_score=threshold))
        assert [h.video_id for h in above] == [h.video_id for h in everything if h.score >= threshold]


def test_query_by_example_video(built, tmp_path):
    from conftest import write_video

    root, _ = built
    example = root / "videos" / "work" / "clip 7.mp4"
    with Library.open(root / "lib") as lib:
        text_model = load_library_model(lib, None, device="cpu")
        vector, own_id, identity = like_query(lib, example, None, device="cpu")
        assert identity == lib.model_config()
        hits = rank(lib, vector, SearchOptions(limit=5), exclude=own_id)
        assert own_id is not None and own_id not in [h.video_id for h in hits] and len(hits) == 5
        # a copy that is not indexed is embedded on the fly and finds the original first
        outside = tmp_path / "outside.mp4"
        write_video(outside, seconds=3, fps=8, width=64, height=48, texture=True, seed=7)
        loaded_vector, none_id, _ = like_query(lib, outside, None, device="cpu")
        assert none_id is None
        full_model = load_library_model(lib, None, device="cpu", text_only=False)
        full_model.precision_known = True  # fp32, as the library was built
        vector = embed_example(full_model, outside)
        # sampled and embedded as the indexer did: the original's stored vector, up to its float16 storage
        original = lib.get_by_path(str(example.resolve()))
        np.testing.assert_allclose(vector, global_vector(lib.frame_features([original.id])[original.id]), atol=1e-4)
        assert float(np.dot(loaded_vector, vector)) > 0.999  # like_query's own model may have chosen bf16
        # the tiny random model scores every video within 1e-4 of the others: near the top is all it can show
        assert original.id in [h.video_id for h in rank(lib, vector, SearchOptions(limit=3))]
        junk = tmp_path / "junk.mp4"
        junk.write_bytes(b"not a video")
        with pytest.raises(Ts2Error, match=r"junk\.mp4: not a video file"):  # which file, not only why
            like_query(lib, junk, None, device="cpu")
    assert text_model.net.clip.visual is None


def test_errors_are_clear(built, tmp_path):
    root, _ = built
    with Library.open(root / "lib") as lib:
        model = load_library_model(lib, None, device="cpu")
        with pytest.raises(Ts2Error, match="empty"):
            text_query(model, "   ")
        _, notes = text_query(model, "a very long description " * 10)
        assert notes and "first 30 tokens" in notes[0]
        other = ModelOptions(model="tiny", backbone_cfg=TINY_CLIP, pretrained=None, device="cpu")
        with pytest.raises(LibraryError, match="another model"):
            load_library_model(lib, other)


def run_ts2(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ts2cli", *args], capture_output=True, text=True, env=env)


def test_command_line_json_paths_and_errors(built, tmp_path):
    root, _ = built
    library = str(root / "lib")
    result = run_ts2("search", "a cat on a sofa", "--library", library, "--json", "--limit", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["query"] == "a cat on a sofa" and data["model"]["mode"] == "zero-shot"
    assert len(data["results"]) == 4
    for item in data["results"]:
        assert set(item) == {"path", "score", "duration", "moment", "frames"}
        assert isinstance(item["score"], float) and set(item["moment"]) == {"start", "end"}
        assert all(set(f) == {"time", "weight"} for f in item["frames"])
    scores = [item["score"] for item in data["results"]]
    assert scores == sorted(scores, reverse=True)

    paths = run_ts2("search", "a cat on a sofa", "--library", library, "--paths", "--limit", "4", "--device", "cpu")
    assert paths.stdout.splitlines() == [item["path"] for item in data["results"]]
    ended = run_ts2("search", "a cat on a sofa", "--library", library, "--print0", "--limit", "4", "--device", "cpu")
    assert ended.stdout.split("\0") == [*paths.stdout.splitlines(), ""]  # for xargs -0: a newline may be in a name
    # the table is the answer: on stdout, one row per video with its whole path, however narrow rich thinks it is
    table = run_ts2("search", "a cat on a sofa", "--library", library, "--limit", "4")
    rows = table.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4"] and table.stderr == ""
    assert all(row.rstrip().endswith(item["path"]) for row, item in zip(rows, data["results"], strict=True))

    # a filter that leaves nothing says which, on stderr; the output stays valid (empty) for scripts
    nowhere = run_ts2("search", "a cat", "--library", library, "--in", str(tmp_path / "elsewhere"), "--json")
    assert nowhere.returncode == 0 and json.loads(nowhere.stdout)["results"] == []
    assert f"No indexed videos under {tmp_path / 'elsewhere'}" in nowhere.stderr
    at_home = {**os.environ, "HOME": str(tmp_path)}
    home = run_ts2("search", "a cat", "--library", library, "--in", "~/elsewhere", env=at_home)
    assert f"No indexed videos under {tmp_path / 'elsewhere'}" in home.stderr  # ~ quoted past the shell, too
    too_high = run_ts2("search", "a cat", "--library", library, "--min-score", "2", "--paths")
    assert too_high.returncode == 0 and too_high.stdout == "" and "No video scored 2 or more" in too_high.stderr

    unquoted = run_ts2("search", "a", "cat", "on", "a", "sofa", "--library", library, "--json", "--limit", "4")
    assert json.loads(unquoted.stdout) == data  # the words of an unquoted query are one query

    empty = run_ts2("search", "", "--library", library)
    missing = run_ts2("search", "x", "--library", str(tmp_path / "none"))
    for failed, words in ((empty, "empty"), (missing, "No library")):
        assert failed.returncode == 1 and words in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    for args, words in (
        (("x", "--like", "a.mp4"), "give a query or --like VIDEO, not both"),
        ((), "give a query or --like VIDEO"),
        (("x", "--json", "--paths"), "Invalid value for '--paths': give one of --json, --paths and --print0"),
        (("x", "--min-score", "nan"), "Invalid value for '--min-score': must be a number"),
        (("x", "--in", ""), "Invalid value for '--in': an empty name was given"),  # not the current folder
        (("--like", ""), "Invalid value for '--like': an empty name was given"),
    ):
        misused = run_ts2("search", *args, "--library", library)
        errors = [line for line in misused.stderr.splitlines() if line.startswith("Error: ")]
        assert misused.returncode == 2 and len(errors) == 1 and words in errors[0], misused.stderr


def test_float16_widening_equals_numpy_cast_for_every_finite_value():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(-1, 4)  # 2-d, as the re-rank calls it
    widened = widen_float16(finite)
    assert widened.dtype == np.float32
    assert np.array_equal(widened.view(np.uint32), finite.astype(np.float32).view(np.uint32))  # -0.0 too


def test_no_videos_score_to_empty_arrays():
    scores, weights = score_videos(np.ones(8, dtype=np.float32), [])
    assert scores.shape == (0,) and weights.shape == (0, 0)


@pytest.fixture
def own_library(tmp_path, tiny_files):
    """A small library of its own, built with weights at a path the test may move or delete."""
    from conftest import write_video

    def build(compat: str = "fixed"):
        weights = tmp_path / "weights" / "mine.pt"
        weights.parent.mkdir()
        weights.write_bytes((tiny_files / "tiny.pt").read_bytes())
        videos = tmp_path / "videos"
        videos.mkdir()
        for i in range(3):
            write_video(videos / f"v{i}.mp4", seconds=2, fps=8, width=64, height=48, texture=True, seed=20 + i)
        options = ModelOptions(
            model="tiny", backbone_cfg=TINY_CLIP, pretrained=str(weights), device="cpu", compat=compat
        )
        model = load_model(options)
        model.precision_known = True
        with Library.open(tmp_path / "lib", write=True, create=True) as lib:
            assert index_folders(lib, model, IndexOptions(roots=[videos])).indexed == 3
        return tmp_path / "lib", weights, videos

    return build


def test_moved_weights_and_partial_model_options_find_the_library_model(own_library):
    from ts2cli.query import search_model_options

    library, weights, _ = own_library(compat="official")
    moved = weights.with_name("renamed.pt")
    weights.rename(moved)
    with Library.open(library) as lib:
        with pytest.raises(LibraryError, match=rf"loaded from {re.escape(str(weights))}, which is no longer there"):
            load_library_model(lib, None)
        options = search_model_options(lib, "cpu", pretrained=str(moved))  # nothing but the new place
        assert (options.compat, options.model, options.backbone_cfg) == ("official", "tiny", TINY_CLIP)
        load_library_model(lib, options)  # the same content under another name is the same model
        other = moved.with_name("other.pt")
        torch.save({k: v + 1 for k, v in torch.load(moved).items()}, other)
        with pytest.raises(LibraryError, match=r"another model.*compat official"):
            load_library_model(lib, search_model_options(lib, "cpu", pretrained=str(other)))


def test_an_empty_library_says_whether_an_index_is_running(tmp_path):
    from ts2cli.search import require_searchable

    writer = Library.open(tmp_path / "lib", write=True, create=True)  # a first run, or a --rebuild, under way
    try:
        with Library.open(tmp_path / "lib") as reader, pytest.raises(Ts2Error, match="a ts2 index is running on it"):
            require_searchable(reader)
    finally:
        writer.close()
    with Library.open(tmp_path / "lib") as reader, pytest.raises(Ts2Error, match=r"run `ts2 index FOLDER` first"):
        require_searchable(reader)
    with Library.open(tmp_path / "lib", write=True) as writer:  # the check takes no lock a writer would meet
        assert writer.count_ok() == 0


def test_like_an_indexed_video_needs_no_weights_and_a_bad_path_is_checked_first(own_library):
    library, weights, videos = own_library()
    weights.unlink()  # the stored features are all an indexed example needs
    found = run_ts2("search", "--like", str(videos / "v1.mp4"), "--library", str(library), "--json")
    assert found.returncode == 0, found.stderr
    data = json.loads(found.stdout)
    assert data["query"] == f"like:{(videos / 'v1.mp4').resolve()}" and data["model"]["mode"] == "zero-shot"
    assert sorted(item["path"] for item in data["results"]) == [str(videos / n) for n in ("v0.mp4", "v2.mp4")]
    for path, words in ((videos / "none.mp4", "No such video"), (videos, "is a folder")):
        failed = run_ts2("search", "--like", str(path), "--library", str(library))
        assert failed.returncode == 1 and words in failed.stderr and "Weights" not in failed.stderr, failed.stderr


def test_query_of_nothing_printable_and_a_damaged_model_record(built, own_library):
    root, _ = built
    with Library.open(root / "lib") as lib:
        model = load_library_model(lib, None, device="cpu")
        for text in ("\ufeff", "\x01 \x02", "\u200b\n"):
            with pytest.raises(Ts2Error, match="empty"):
                text_query(model, text)
    library, _, _ = own_library()
    with Library.open(library, write=True) as lib:
        lib._set_meta("model", "not json")
    damaged = run_ts2("status", "--library", str(library))
    assert damaged.returncode == 1 and "damaged model record" in damaged.stderr and "Traceback" not in damaged.stderr
    with Library.open(library, write=True) as lib:
        lib.clear({"backbone": "tiny"})  # a rebuild with another model starts over
        assert lib.model_config() == {"backbone": "tiny"} and lib.count_ok() == 0


def test_results_that_are_gone_are_pointed_out_and_not_opened(own_library):
    library, _, videos = own_library()
    (videos / "v0.mp4").unlink()
    (videos / "v2.mp4").unlink()
    found = run_ts2("search", "--like", str(videos / "v1.mp4"), "--library", str(library), "--paths")
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 2
    assert "2 of these videos are no longer there" in found.stderr
    opened = run_ts2("search", "--like", str(videos / "v1.mp4"), "--library", str(library), "--open")
    assert opened.returncode == 1 and "it is no longer there" in opened.stderr, opened.stderr


def test_a_narrow_terminal_shows_every_result_whole():
    from rich.console import Console

    from ts2cli.report import results_table
    from ts2cli.search import Hit, Moment

    path = "/videos/holidays/2024/a long file name.mp4"
    hit = Hit(video_id=1, path=path, score=0.291, duration=63.2, moment=Moment(21.0, 31.6, 25.0), frames=[])
    for width in (30, 50, 100):
        console = Console(width=width, record=True)
        console.print(results_table([hit], width))
        text = console.export_text()
        assert "0.291" in text and "0:21.0–0:31.6" in text and "1:03.2" in text, text
        assert path.replace(" ", "") in "".join(text.split()), text  # folded, maybe, but all there
    tiny = Hit(video_id=2, path=path, score=-0.0002, duration=1.0, moment=Moment(0.0, 1.0, 0.5), frames=[])
    console = Console(width=100, record=True)
    console.print(results_table([tiny], 100))
    shown = console.export_text()
    assert "-0.000" not in shown and "0.000" in shown, shown


def test_a_video_removed_while_a_search_runs_gives_its_place_to_the_next_best(own_library, monkeypatch):
    """An index run that removes a scored video before its row is read (a real second connection, deleting at
    that moment) leaves the result one shorter unless the next best video steps in."""
    libdir, _, videos = own_library()
    with Library.open(libdir) as lib:
        vector = text_query(load_library_model(lib, None, device="cpu"), "a beach")[0]
        everything = [h.video_id for h in rank(lib, vector, SearchOptions(limit=3))]
        read_rows = lib.videos

        def removed_first(ids):
            if everything[0] in ids:
                with Library.open(libdir, write=True) as writer:
                    writer.begin_scan([videos])  # a scan that no longer sees the best video
                    for video_id in everything[1:]:
                        writer.mark_seen(video_id)
                    writer.sweep_unseen([videos])
            return read_rows(ids)

        monkeypatch.setattr(lib, "videos", removed_first)
        hits = rank(lib, vector, SearchOptions(limit=2))
    assert [h.video_id for h in hits] == everything[1:]
