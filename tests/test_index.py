"""`ts2 index` end to end: real PyAV decoding, real SQLite and hnswlib, a tiny random model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_CLIP, tiny_net

from ts2cli.errors import LibraryError, Ts2Error
from ts2cli.indexer import (
    KEYFRAME_SNAP,
    IndexOptions,
    ModelOnDemand,
    Progress,
    forget,
    index_folders,
    model_request,
)
from ts2cli.model import ModelOptions, load_model
from ts2cli.scan import ScanRules
from ts2cli.store import Library


@pytest.fixture(scope="module")
def model():
    return load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu"))


@pytest.fixture
def library(tmp_path):
    with Library.open(tmp_path / "library", write=True, create=True) as lib:
        yield lib


def index(library, model, *roots, **options):
    return index_folders(library, model, IndexOptions(roots=list(roots), **options))


def test_failures_are_committed_as_they_come(tmp_path, make_video, library, model):
    """A kill during a run keeps the failures recorded before it, as it keeps the videos: a folder of broken files
    is not decoded again from the start."""
    make_video("v/good.mp4", seconds=1)
    for number in range(6):
        (tmp_path / "v" / f"broken {number}.mp4").write_bytes(b"not a video %d" % number)  # not copies
    committed: list[int] = []

    class Watching(Progress):
        def done(self, path: Path, outcome: str, reason: str = "") -> None:
            with Library.open(library.directory) as reader:  # sees only what was committed
                committed.append(len(reader.stats().failures))

    index_folders(library, model, IndexOptions(roots=[tmp_path / "v"], commit_every=2, workers=1), Watching())
    assert len(committed) == 7 and committed[-1] >= 4, committed


def test_videos_are_committed_after_a_while_however_few(tmp_path, make_video, library, model):
    """Long videos take long to decode: a kill -9 must lose at most ``commit_seconds`` of work, not 16 videos."""
    for number in range(3):
        make_video(f"v/{number}.mp4", seconds=1, texture=True, seed=number)
    committed: list[int] = []

    class Watching(Progress):
        def done(self, path: Path, outcome: str, reason: str = "") -> None:
            with Library.open(library.directory) as reader:  # sees only what was committed
                committed.append(reader.stats().videos_ok)

    options = IndexOptions(roots=[tmp_path / "v"], workers=1, batch_size=1, commit_seconds=0.0)
    index_folders(library, model, options, Watching())
    assert committed == [0, 1, 2], committed  # each told before its own commit, after the one before it


def test_a_video_whose_frames_run_out_early_is_indexed_and_told(tmp_path, make_video, library, model):
    cut = make_video("v/cut.mkv", seconds=10, fps=10, texture=True, seed=1).path
    make_video("v/whole.mkv", seconds=10, fps=10, texture=True, seed=2)
    with open(cut, "r+b") as file:
        file.truncate(cut.stat().st_size // 2)
    told: list[tuple[str, str]] = []

    class Listening(Progress):
        def done(self, path: Path, outcome: str, reason: str = "") -> None:
            told.append((path.name, reason))

    summary = index_folders(library, model, IndexOptions(roots=[tmp_path / "v"]), Listening())
    assert summary.indexed == 2 and [path for path, _ in summary.cut_short] == [str(cut)]
    assert "of the 10.0 s its file states (truncated or damaged?)" in summary.cut_short[0][1]
    assert summary.to_json()["cut_short"] == [{"path": str(cut), "reason": summary.cut_short[0][1]}]
    assert sorted(told) == [("cut.mkv", summary.cut_short[0][1]), ("whole.mkv", "")]
    # its length and the moments found in it end where its frames do, not at the duration it states
    row = library.get_by_path(str(cut.resolve()))
    assert row.duration == row.frame_times[-1] < 6.0
    assert library.get_by_path(str((tmp_path / "v" / "whole.mkv").resolve())).duration == pytest.approx(10.0, abs=0.2)


def test_first_index_of_a_messy_folder(tmp_path, make_video, make_broken_files, library, model):
    videos = tmp_path / "videos"
    make_video("videos/h264.mp4", seconds=3, fps=10)
    make_video("videos/sub dir/mpeg4 clip.AVI", seconds=2, fps=12, width=80, height=60)
    make_video("videos/vp9.webm", seconds=1.5, fps=10)
    make_video("videos/variable rate.mkv", seconds=3, fps=10, vfr=True)
    make_video("videos/three frames.mov", num_frames=3, fps=10)
    make_video("videos/long sparse.mp4", seconds=120, fps=1, width=48, height=32, gop=30)
    make_video("videos/odd size.mp4", seconds=1, fps=10, width=70, height=38)
    make_video("videos/.hidden.mp4", seconds=1)
    broken = make_broken_files()
    for name, path in broken.items():
        shutil.copy(path, videos / f"broken-{name}{path.suffix}")

    summary = index(library, model, videos)

    assert summary.indexed + len(summary.failed) == 7 + len(broken)  # hidden file skipped
    assert summary.indexed >= 7
    failed = dict(summary.failed)
    for name in ("empty", "random", "audio_only"):
        matches = [p for p in failed if f"broken-{name}" in p]
        assert len(matches) == 1, (name, failed)
        assert failed[matches[0]] and "\n" not in failed[matches[0]]
    three = library.get_by_path(str((videos / "three frames.mov").resolve()))
    assert three.status == "ok" and len(three.frame_times) == 3
    features = library.frame_features([three.id])[three.id]
    assert features.shape == (3, 64)
    long_row = library.get_by_path(str((videos / "long sparse.mp4").resolve()))
    assert len(long_row.frame_times) == 12 and long_row.duration == pytest.approx(120, abs=1.5)
    assert long_row.frame_times == sorted(long_row.frame_times) and long_row.frame_times[-1] > 100
    stats = library.stats()
    assert stats.videos_ok == summary.indexed and stats.videos_failed == len(summary.failed)


def test_stored_features_equal_a_direct_forward_pass(tmp_path, make_video, library, model):
    from ts2cli.decode import sample_frames
    from ts2cli.indexer import KEYFRAME_SNAP

    clip = make_video("v/clip.mp4", seconds=2, fps=10)
    index(library, model, tmp_path / "v")
    row = library.get_by_path(str(clip.path.resolve()))
    stored = library.frame_features([row.id])[row.id]
    sampled = sample_frames(clip.path, 12, model.image_size, keyframe_snap=KEYFRAME_SNAP)
    direct, mask = model.encode_videos([sampled.frames])
    np.testing.assert_allclose(stored, direct[0][mask[0]], rtol=2e-3, atol=2e-3)  # stored as fp16


class Recorder(Progress):
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def stage(self, description: str) -> None:
        self.events.append(("stage", description))

    def scanned(self, files: int) -> None:
        self.events.append(("scanned", files))

    def planned(self, total: int) -> None:
        self.events.append(("planned", total))

    def done(self, path: Path, outcome: str, reason: str = "") -> None:
        self.events.append(("done", outcome))


def test_reindex_is_incremental(tmp_path, make_video, library):
    folder = tmp_path / "v"
    make_video("v/a.mp4", seconds=1)
    make_video("v/b.mp4", seconds=1, seed=1, vfr=True)
    make_video("v/c.mp4", seconds=1, fps=8)
    make_video("v/d.mp4", seconds=1, fps=6)
    model = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu"))  # precision undecided
    told = Recorder()
    first = index_folders(library, model, IndexOptions(roots=[folder]), told)
    assert first.indexed == 4
    # what the bar shows: the text encoder being written (a first index only), files found, then videos done
    scanning = [("scanned", n) for n in range(5)]
    assert (
        told.events
        == [("stage", "writing the text encoder for ts2 search"), *scanning, ("planned", 4)] + [("done", "indexed")] * 4
    )
    ids = {p.name: library.get_by_path(str(p.resolve())).id for p in folder.iterdir()}
    features_b = library.frame_features([ids["b.mp4"]])[ids["b.mp4"]]

    told = Recorder()
    second = index_folders(library, model, IndexOptions(roots=[folder]), told)
    assert (second.indexed, second.unchanged, second.moved, second.removed) == (0, 4, 0, 0)
    assert told.events == [*scanning, ("planned", 0)]

    make_video("v/a.mp4", seconds=2, fps=7)  # modified: re-embedded under the same id
    (folder / "c.mp4").unlink()  # deleted
    (folder / "b.mp4").rename(folder / "renamed b.mp4")  # moved: features kept, not re-embedded
    shutil.copy2(folder / "d.mp4", folder / "copy of d.mp4")  # copied: features copied
    third = index(library, model, folder)
    assert (third.indexed, third.unchanged, third.moved, third.removed) == (1, 1, 2, 1)
    assert library.get_by_path(str((folder / "a.mp4").resolve())).id == ids["a.mp4"]
    moved = library.get_by_path(str((folder / "renamed b.mp4").resolve()))
    assert moved.id == ids["b.mp4"]
    assert np.array_equal(library.frame_features([moved.id])[moved.id], features_b)
    assert library.get_by_path(str((folder / "c.mp4").resolve())) is None
    assert library.stats().videos_ok == 4


def test_the_model_is_loaded_only_when_a_video_is_to_be_embedded(tmp_path, make_video, library, model):
    folder = tmp_path / "v"
    make_video("v/a.mp4", seconds=1)
    make_video("v/b.mp4", seconds=1, texture=True, seed=1)  # not a copy of a.mp4
    loads = []
    request = {"model": "tiny", "pretrained": None, "checkpoint": None, "compat": None}

    def run(asked: dict, **options) -> tuple:
        told = Recorder()
        source = ModelOnDemand(lambda: loads.append(asked) or model, asked)
        return index_folders(library, source, IndexOptions(roots=[folder], **options), told), told.events

    first, _ = run(request)
    assert first.indexed == 2 and len(loads) == 1  # a new library: loaded and checked before the scan
    assert library.loaded_from() == request

    nothing, events = run(request)
    assert (nothing.unchanged, len(loads)) == (2, 1) and ("stage", "loading the model") not in events
    assert nothing.pipeline.dtype is None and nothing.pipeline.to_json()["bottleneck"] is None
    (folder / "a.mp4").rename(folder / "c.mp4")
    moved, _ = run(request)
    (folder / "b.mp4").unlink()
    removed, _ = run(request)
    assert (moved.moved, removed.removed, len(loads)) == (1, 1, 1)  # features reused or dropped: no model needed

    make_video("v/d.mp4", seconds=2, fps=7)
    added, events = run(request)
    assert added.indexed == 1 and len(loads) == 2
    assert events.index(("stage", "loading the model")) > events.index(("scanned", 2))  # loaded after the scan

    record = library.model_config()  # the file it was loaded from is gone (say, open_clip's download of a tag)
    library.set_model_config({**record, "source": {**record["source"], "weights_file": str(tmp_path / "gone")}})
    library.remember_loaded_from(request)
    run(request)
    assert len(loads) == 3  # loaded up front, where a download would not fight the progress bar

    other = {**request, "compat": "official"}  # other options: loaded and checked first, though nothing is new
    for asked, options in ((other, {}), (request, {"rebuild": True})):
        run(asked, **options)
        assert loads[-1] is asked
    assert len(loads) == 5 and library.stats().videos_ok == 2


def test_a_model_request_names_local_files_by_content(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"first weights")
    asked = model_request("ViT-B-32", str(weights), None, None)
    assert asked["pretrained"] == {"path": str(weights.resolve()), "sha256": asked["pretrained"]["sha256"]}
    assert model_request("ViT-B-32", str(weights), None, None) == asked
    weights.write_bytes(b"other weights")  # retrained in place
    assert model_request("ViT-B-32", str(weights), None, None) != asked
    assert model_request("ViT-B-32", "openai", None, "fixed") == {
        "model": "ViT-B-32", "pretrained": "openai", "checkpoint": None, "compat": "fixed"
    }  # fmt: skip
    assert model_request("ViT-B-32", "openai", None, "fixed", "hard")["topk"] == "hard"


def test_running_out_of_memory_names_the_option_and_keeps_what_was_done(tmp_path, make_video, library):
    for name in ("a", "b", "c"):
        make_video(f"v/{name}.mp4", seconds=1, texture=True, seed=ord(name))
    model = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu", precision="float32"))
    forwards = []

    def second_batch_runs_out(module, inputs) -> None:
        # The only thing not real here: the allocator's answer, which a test cannot safely provoke for real.
        forwards.append(1)
        if len(forwards) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    model.net.clip.visual.conv1.register_forward_pre_hook(second_batch_runs_out)
    with pytest.raises(Ts2Error, match=r"^Out of memory embedding a batch of 1 video on cpu: .*--batch-size"):
        index(library, model, tmp_path / "v", batch_size=1, model_workers=1)
    assert library.stats().videos_ok == 1  # the batch before is kept; the next run goes on from there


def test_out_of_memory_is_recognised_from_torch_and_other_errors_pass():
    from ts2cli.model import out_of_memory_says

    refused = pytest.raises(Ts2Error, match=r"^Out of memory allocating 10 TB: ask for less\.$")
    with refused, out_of_memory_says("allocating 10 TB", "ask for less"):
        torch.empty(10**13, dtype=torch.uint8)  # the CPU allocator refuses: a plain RuntimeError
    with pytest.raises(RuntimeError, match="shape"), out_of_memory_says("reshaping", "ask for less"):
        torch.zeros(3).view(2, 2)


def test_copies_found_in_one_run_are_embedded_once(tmp_path, make_video, make_broken_files, library, model):
    folder = tmp_path / "v"
    make_video("v/a.mp4", seconds=2, fps=6)
    shutil.copy2(folder / "a.mp4", folder / "a copy.mp4")
    (folder / "backup").mkdir()
    shutil.copy2(folder / "a.mp4", folder / "backup" / "a.mp4")
    broken = make_broken_files()["truncated"]
    shutil.copy2(broken, folder / "broken.mp4")
    shutil.copy2(broken, folder / "broken copy.mp4")
    summary = index(library, model, folder)
    assert (summary.indexed, summary.moved, summary.pipeline.videos) == (1, 2, 2)  # a.mp4 and one broken file decoded
    assert sorted(Path(path).name for path, _ in summary.failed) == ["broken copy.mp4", "broken.mp4"]
    assert len({reason for _, reason in summary.failed}) == 1
    ids = library.ids_under(folder)
    frames = library.frame_features(ids)
    assert len(ids) == 3 and all(np.array_equal(frames[ids[0]], frames[i]) for i in ids)
    assert library.stats().videos_ok == 3 and len(library.global_vectors()[0]) == 3


def test_a_renamed_folder_of_identical_files_moves_each_of_them(tmp_path, make_video, library, model):
    """Two identical files in a folder that is then renamed: both rows move to the new name (none is left behind
    at the old one, where it would show as a result that is not there)."""
    make_video("R/a.mp4", seconds=1)
    shutil.copy2(tmp_path / "R" / "a.mp4", tmp_path / "R" / "b.mp4")
    index(library, model, tmp_path / "R")
    before = sorted(row.id for row in library.videos(library.ids_under(tmp_path / "R")).values())
    (tmp_path / "R").rename(tmp_path / "S")
    summary = index(library, model, tmp_path / "S")
    assert (summary.indexed, summary.moved, summary.vacated_folders) == (0, 2, [str((tmp_path / "R").resolve())])
    assert library.ids_under(tmp_path / "R") == [] and sorted(library.ids_under(tmp_path / "S")) == before


def test_a_copy_whose_original_vanished_mid_run_is_embedded_itself(tmp_path, make_video, library, model):
    folder = tmp_path / "v"
    make_video("v/1.mp4", seconds=1)
    shutil.copy2(folder / "1.mp4", folder / "2.mp4")

    class DeletesTheOriginal(Progress):  # after the plan (1.mp4 to embed, 2.mp4 its copy), before decoding
        def planned(self, total: int) -> None:
            (folder / "1.mp4").unlink()

    summary = index_folders(library, model, IndexOptions(roots=[folder]), DeletesTheOriginal())
    assert (summary.indexed, summary.moved, summary.failed) == (1, 0, [])
    assert [Path(row.path).name for row in library.videos(library.ids_under(folder)).values()] == ["2.mp4"]


def test_a_file_that_grows_while_it_is_planned_is_stored_at_the_size_it_was_read(
    tmp_path, make_video, library, model, monkeypatch
):
    """A file still being written (a copy in progress) grows between the scan's stat and its fingerprint: the row
    holds the size and time the fingerprint read, so that once the file is whole the next run re-embeds it instead
    of taking the rest for a touch of the same content."""
    from ts2cli import indexer, scan

    make_video("v/a.mp4", seconds=1)
    path = (tmp_path / "v" / "a.mp4").resolve()

    def grown_first(file):
        with open(file, "ab") as f:  # the copy goes on while the plan is made
            f.write(b"\0" * 1000)
        return scan.fingerprint_and_stat(file)

    monkeypatch.setattr(indexer, "fingerprint_and_stat", grown_first)
    assert index(library, model, tmp_path / "v").indexed == 1
    monkeypatch.undo()
    row = library.get_by_path(str(path))
    assert (row.size, row.mtime) == (path.stat().st_size, path.stat().st_mtime)
    assert scan.fingerprint(path) == row.fingerprint
    assert index(library, model, tmp_path / "v").unchanged == 1


def test_other_model_is_refused_unless_rebuild(tmp_path, make_video, library, model):
    make_video("v/a.mp4", seconds=1)
    index(library, model, tmp_path / "v")
    other = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu", frames=8))
    with pytest.raises(LibraryError, match="--rebuild"):
        index(library, other, tmp_path / "v")
    rebuilt = index(library, other, tmp_path / "v", rebuild=True)
    assert rebuilt.indexed == 1 and library.model_config()["frames"] == 8
    again = index(library, other, tmp_path / "v", rebuild=True)  # the same model: everything embedded again
    assert (again.indexed, again.unchanged, again.removed) == (1, 0, 0)


def test_a_stopped_rebuild_leaves_the_library_as_it_was_and_goes_on_when_run_again(
    tmp_path, make_video, library, model
):
    """A rebuild with another model builds the new library beside the old one: stopped half way, the old library is
    whole and searchable (its model, videos and folders); run again, the rebuild goes on from where it stopped and
    then takes the old one's place, with ids the old library never handed out."""
    for seed in range(4):
        make_video(f"v/{seed}.mp4", seconds=1, texture=True, seed=seed)
    make_video("w/x.mp4", seconds=1, texture=True, seed=9)
    index(library, model, tmp_path / "v", tmp_path / "w")
    before = library.stats()
    old_ids = set(library.ids_under(tmp_path))
    other = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu", frames=8))

    class StoppedAfterTwo(Progress):
        def __init__(self) -> None:
            self.indexed = 0

        def done(self, path: Path, outcome: str, reason: str = "") -> None:
            self.indexed += outcome == "indexed"
            if self.indexed == 2:
                raise KeyboardInterrupt

    options = IndexOptions(roots=[tmp_path / "v"], rebuild=True, workers=1, batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        index_folders(library, other, options, StoppedAfterTwo())
    with Library.open(library.directory) as reader:
        stats = reader.stats()
        assert (stats.videos_ok, stats.folders, stats.model) == (5, before.folders, before.model)
        assert stats.rebuild_unfinished and reader.knn(np.ones(reader.global_vectors()[1].shape[1]), 5)[0].size == 5

    again = index_folders(library, other, options)
    assert (again.indexed, again.unchanged, again.removed) == (2, 2, 5 - 4)  # w's video: forgotten
    stats = library.stats()
    assert stats.model["frames"] == 8 and stats.videos_ok == 4 and not stats.rebuild_unfinished
    assert stats.folders == [(str((tmp_path / "v").resolve()), 4)]
    new_ids = set(library.ids_under(tmp_path))
    assert min(new_ids) > max(old_ids) and not (library.directory / "rebuild").exists()
    assert set(library.knn(np.ones(library.global_vectors()[1].shape[1]), 10)[0].tolist()) == new_ids
    with Library.open(library.directory) as reader:  # a reader rebuilds its index from the new vectors too
        assert set(reader.knn(np.ones(reader.global_vectors()[1].shape[1]), 10)[0].tolist()) == new_ids


def test_a_rebuild_of_other_folders_does_not_take_what_a_stopped_one_did(tmp_path, make_video, library, model):
    """A rebuild of v stopped half way, then one of w: the library ends up with w's videos only, and a damaged
    unfinished rebuild is begun again rather than refused."""
    make_video("v/a.mp4", seconds=1)
    make_video("w/b.mp4", seconds=1, texture=True, seed=1)
    index(library, model, tmp_path / "v", tmp_path / "w")
    staged = library.directory / "rebuild"
    with Library.open(staged, write=True, create=True) as unfinished:  # as a rebuild of v leaves it
        index(unfinished, model, tmp_path / "v")
    rebuilt = index(library, model, tmp_path / "w", rebuild=True)
    assert (rebuilt.indexed, rebuilt.removed) == (1, 1) and library.paths() == {str((tmp_path / "w/b.mp4").resolve())}
    assert library.stats().folders == [(str((tmp_path / "w").resolve()), 1)]

    staged.mkdir()
    (staged / "library.sqlite3").write_bytes(b"not a database")
    assert index(library, model, tmp_path / "w", rebuild=True).indexed == 1 and not staged.exists()


def test_a_rebuild_counts_the_videos_of_other_folders_it_forgets(tmp_path, make_video, library, model):
    make_video("v/a.mp4", seconds=1)
    make_video("v/gone.mp4", seconds=1, texture=True, seed=1)
    make_video("elsewhere/b.mp4", seconds=1, texture=True, seed=2)
    make_video("elsewhere/c.mp4", seconds=1, texture=True, seed=3)
    index(library, model, tmp_path / "v", tmp_path / "elsewhere")
    (tmp_path / "v" / "gone.mp4").unlink()
    rebuilt = index(library, model, tmp_path / "v", rebuild=True)
    assert (rebuilt.indexed, rebuilt.removed) == (1, 3)  # a.mp4 again; gone.mp4 and elsewhere's two forgotten
    assert library.paths() == {str((tmp_path / "v" / "a.mp4").resolve())}
    assert library.stats().folders == [(str((tmp_path / "v").resolve()), 1)]  # "elsewhere" is no longer covered


@pytest.mark.parametrize("named", [False, True])
def test_a_folder_moved_away_with_a_symlink_left_behind_is_followed(tmp_path, make_video, library, model, named):
    """~/Videos moved to a bigger disk, a symlink left in its place: its videos move with it (not copied, then
    removed), the folder's rules go with it, and from then on deleted files there are swept."""
    for seed in range(3):
        make_video(f"Videos/{seed}.mp4", seconds=1, texture=True, seed=seed)
    old, new = tmp_path / "Videos", tmp_path / "big" / "Videos"
    make_video("Videos/drafts/d.mp4", seconds=1, texture=True, seed=9)
    index(library, model, old, exclude=("drafts",))
    new.parent.mkdir()
    old.rename(new)
    old.symlink_to(new, target_is_directory=True)
    summary = index(library, model, *([old] if named else []), exclude=("drafts",) if named else ())
    assert (summary.moved, summary.removed, summary.indexed) == (3, 0, 0)
    assert list(library.folder_rules()) == [new] and library.folder_rules()[new].exclude == ("drafts",)
    assert sorted(library.paths()) == [str(new / f"{seed}.mp4") for seed in range(3)]
    (new / "1.mp4").unlink()
    assert index(library, model).removed == 1 and library.count_ok() == 2


def test_a_renamed_folder_indexed_by_its_new_name_leaves_the_list(tmp_path, make_video, library, model):
    """Its videos move to the new name; the old name, gone and empty, must not be skipped with a note on every later
    run nor block --rebuild. An unplugged folder, whose videos stay, keeps its place."""
    for seed in range(2):
        make_video(f"old/{seed}.mp4", seconds=1, texture=True, seed=seed)
        make_video(f"usb/{seed}.mp4", seconds=1, texture=True, seed=10 + seed)
    old, new, usb = tmp_path / "old", tmp_path / "new", tmp_path / "usb"
    index(library, model, old)
    index(library, model, usb)
    old.rename(new)
    usb.rename(tmp_path / "usb unplugged")
    summary = index(library, model, new)
    assert (summary.moved, summary.vacated_folders) == (2, [str(old)])
    assert summary.to_json()["vacated_folders"] == [str(old)]
    assert sorted(library.folder_rules()) == [new, usb]
    later = index(library, model)
    assert later.folders == [str(new)] and [path for path, _ in later.skipped_folders] == [str(usb)]


def test_naming_no_folder_updates_each_folder_with_its_own_rules(tmp_path, make_video, library, model):
    with pytest.raises(Ts2Error, match="covers no folder yet"):
        index(library, model)
    make_video("a/one.mp4", seconds=1)
    make_video("a/drafts/draft.mp4", seconds=1, texture=True, seed=1)
    make_video("a/.private/p.mp4", seconds=1, texture=True, seed=2)
    make_video("b/.h/two.mp4", seconds=1, texture=True, seed=3)
    index(library, model, tmp_path / "a", exclude=("drafts/*",))
    index(library, model, tmp_path / "b", include_hidden=True)
    a, b = (str((tmp_path / name).resolve()) for name in "ab")
    assert library.paths() == {f"{a}/one.mp4", f"{b}/.h/two.mp4"}
    assert library.stats().folder_rules == {a: ScanRules(("drafts/*",), False), b: ScanRules((), True)}

    make_video("a/new.mp4", seconds=1, texture=True, seed=4)
    make_video("a/drafts/new draft.mp4", seconds=1, texture=True, seed=5)  # excluded under a
    make_video("b/.h/new.mp4", seconds=1, texture=True, seed=6)  # hidden, but b takes hidden files
    (tmp_path / "a" / "one.mp4").unlink()
    updated = index(library, model)
    assert (updated.indexed, updated.removed, updated.folders, updated.skipped_folders) == (2, 1, [a, b], [])
    assert library.paths() == {f"{a}/new.mp4", f"{b}/.h/two.mp4", f"{b}/.h/new.mp4"}

    rebuilt = index(library, model, rebuild=True)  # every folder again, with the same rules
    assert (rebuilt.indexed, rebuilt.removed) == (3, 0) and library.paths() == updated_paths(a, b)

    (tmp_path / "b").rename(tmp_path / "b unplugged")
    kept = index(library, model)  # a drive that is not there now: its videos stay
    assert kept.folders == [a] and [(path, why.split(";")[0]) for path, why in kept.skipped_folders] == [
        (b, "not there now")
    ]
    assert library.paths() == updated_paths(a, b)
    with pytest.raises(Ts2Error, match=f"--rebuild would forget the videos of {b} "):
        index(library, model, rebuild=True)
    assert library.paths() == updated_paths(a, b)

    with library._write_step():  # as a library written before ts2 recorded the rules
        library._set_meta("folder_rules", "{}")
    with pytest.raises(Ts2Error, match=f"None of the library's folders can be updated: {a} \\(indexed by an older"):
        index(library, model)
    index(library, model, tmp_path / "a", exclude=("drafts/*",))  # naming it records them again
    assert index(library, model).folders == [a]


def test_a_folder_named_again_keeps_the_rules_it_was_indexed_with_unless_told(tmp_path, make_video, library, model):
    """``ts2 index ~/Videos --exclude 'drafts/*'``, later ``ts2 index ~/Videos``: the drafts stay out. Rules named
    replace the recorded ones one by one (an empty exclude, ``--no-exclude``, drops the globs)."""
    make_video("a/one.mp4", seconds=1)
    make_video("a/drafts/draft.mp4", seconds=1, texture=True, seed=1)
    make_video("a/.private/p.mp4", seconds=1, texture=True, seed=2)
    a = (tmp_path / "a").resolve()
    index(library, model, a, exclude=("drafts/*",), include_hidden=True)
    assert library.paths() == {f"{a}/one.mp4", f"{a}/.private/p.mp4"}
    again = index(library, model, a)
    assert (again.indexed, again.unchanged) == (0, 2)
    assert library.stats().folder_rules == {str(a): ScanRules(("drafts/*",), True)}
    assert index(library, model, a, rebuild=True).indexed == 2  # a rebuild of it too
    assert library.stats().folder_rules == {str(a): ScanRules(("drafts/*",), True)}
    index(library, model, a, include_hidden=False)  # the globs kept, hidden files dropped
    assert library.paths() == {f"{a}/one.mp4"}
    assert library.stats().folder_rules == {str(a): ScanRules(("drafts/*",), False)}
    index(library, model, a, exclude=())  # --no-exclude
    assert library.paths() == {f"{a}/one.mp4", f"{a}/drafts/draft.mp4"}
    assert library.stats().folder_rules == {str(a): ScanRules((), False)}


def updated_paths(a: str, b: str) -> set[str]:
    return {f"{a}/new.mp4", f"{b}/.h/two.mp4", f"{b}/.h/new.mp4"}


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_reported_and_the_rest_indexed(tmp_path, make_video, library, model):
    make_video("v/good.mp4", seconds=1)
    odd = os.fsdecode(os.fsencode(tmp_path / "v") + b"/bad\xffname.mp4")
    shutil.copyfile(tmp_path / "v" / "good.mp4", odd)
    told: list[tuple[str, str]] = []

    class Listening(Progress):
        def skipped(self, path: str, reason: str) -> None:
            told.append((path, reason))

    summary = index_folders(library, model, IndexOptions(roots=[tmp_path / "v"]), Listening())
    assert summary.indexed == 1
    assert (
        summary.failed
        == told
        == [  # told as it is found, as the files that fail to decode are
            (f"{tmp_path / 'v'}/bad\ufffdname.mp4", "the file name is not valid UTF-8 (rename it to index it)")
        ]
    )
    assert json.dumps(summary.to_json())  # printable as --json
    assert index(library, model, tmp_path / "v").unchanged == 1  # and again, without a row for it


def test_roots_that_cannot_be_indexed_are_refused_up_front(tmp_path):
    from ts2cli.scan import check_roots

    with pytest.raises(Ts2Error, match="empty name"):
        check_roots([""])
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(Ts2Error, match="neither a folder nor a file"):
        check_roots([fifo])


def test_a_folder_without_videos_says_so(tmp_path, tiny_files):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("no videos here")
    run = subprocess.run(ts2_index(tmp_path / "notes", tmp_path / "lib", tiny_files), capture_output=True, text=True)
    assert run.returncode == 0 and "note: No video files under" in run.stderr, run.stderr


def test_a_file_named_on_its_own_is_tried_whatever_its_extension(tmp_path, tiny_files):
    from conftest import write_video

    odd, notes = tmp_path / "clip.bin", tmp_path / "notes.txt"
    write_video(tmp_path / "clip.mp4", seconds=2, fps=8, width=64, height=48, texture=True)
    (tmp_path / "clip.mp4").rename(odd)
    notes.write_text("no video here")
    run = subprocess.run([*ts2_index(odd, tmp_path / "lib", tiny_files), "--json"], capture_output=True, text=True)
    assert run.returncode == 0 and json.loads(run.stdout)["indexed"] == 1, run.stderr
    run = subprocess.run([*ts2_index(notes, tmp_path / "lib", tiny_files), "--json"], capture_output=True, text=True)
    assert run.returncode == 1 and json.loads(run.stdout)["failed"] == 1
    assert f"skipped {notes}: not a video file" in run.stderr, run.stderr  # told on stderr with --json too


def test_missing_folder_is_an_error(tmp_path, library, model):
    from ts2cli.errors import Ts2Error

    with pytest.raises(Ts2Error, match="No such file or folder"):
        index(library, model, tmp_path / "nope")


def test_shared_sample_videos_index(shared_videos, library, model):
    summary = index(library, model, shared_videos)
    assert summary.indexed == 3 and not summary.failed
    for row in library.videos(range(1, 4)).values():
        assert len(row.frame_times) == 12 and row.duration > 5


# --- the command as a process: interruption, concurrency ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    (folder / "tiny.json").write_text(json.dumps(TINY_CLIP))
    net = tiny_net(zero_shot=True)
    torch.save({k.removeprefix("clip."): v for k, v in net.state_dict().items()}, folder / "tiny.pt")
    return folder


def ts2_index(folder: Path, library: Path, tiny_files: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ts2cli", "index", str(folder), "--library", str(library),
            "--model", str(tiny_files / "tiny.json"), "--pretrained", str(tiny_files / "tiny.pt"),
            "--device", "cpu", *extra]  # fmt: skip


def count_ok(library: Path) -> int:
    if not (library / "library.sqlite3").exists():
        return 0
    try:
        lib = Library.open(library)
    except LibraryError:  # the indexer is still creating it
        return 0
    with lib:
        return lib.stats().videos_ok


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def many_videos(tmp_path_factory):
    from conftest import write_video

    folder = tmp_path_factory.mktemp("many") / "vidéos à voir"
    folder.mkdir()
    for i in range(24):
        write_video(folder / f"clip {i:02d}.mp4", seconds=6, fps=10, width=96, height=64, texture=True, seed=i)
    return folder


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_index_resumes_without_redoing_work(tmp_path, tiny_files, many_videos, how):
    library = tmp_path / "lib"
    command = ts2_index(many_videos, library, tiny_files, "--batch-size", "1", "--commit-every", "1", "--workers", "1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: count_ok(library) >= 1 or process.poll() is not None)
        process.send_signal(how)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    done_before = count_ok(library)
    assert 1 <= done_before < 24, "the run was not interrupted mid-way"
    if how != signal.SIGKILL:  # stopped tidily, saying so, with the shell's code for the signal
        assert process.returncode == 128 + how and "Traceback" not in stderr
        assert "Interrupted; the videos indexed so far are kept" in stderr

    resumed = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["unchanged"] >= done_before and summary["indexed"] + summary["unchanged"] == 24
    pipeline = summary["pipeline"]  # the documented --json fields (docs/cli.md)
    assert pipeline["videos"] == summary["indexed"] and pipeline["batch_size"] == 1
    assert pipeline["dtype"] in {"float32", "bfloat16"} and pipeline["bottleneck"] in {"model", "decode"}
    assert set(pipeline["shares"]) == {"model_idle", "decode_idle"}
    with Library.open(library) as lib:
        stats = lib.stats()
        assert stats.videos_ok == 24 and not stats.failures
        ids, vectors = lib.global_vectors()
        assert len(set(ids.tolist())) == 24 == len(vectors)


def test_a_second_ctrl_c_stops_at_once_and_the_library_stays_whole(tmp_path, tiny_files, many_videos):
    library = tmp_path / "lib"
    command = ts2_index(many_videos, library, tiny_files, "--batch-size", "1", "--commit-every", "1", "--workers", "1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: count_ok(library) >= 1 or process.poll() is not None)
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)  # before the first one's tidy-up can have ended
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # 130, or killed by the second SIGINT once the command was over (the shell shows 130 too); never an abort
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr
    assert "Stopped at once" in stderr or "Interrupted;" in stderr
    resumed = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["indexed"] + summary["unchanged"] == 24 and summary["indexed"] < 24
    with Library.open(library) as lib:
        assert lib.stats().videos_ok == 24 and len(lib.global_vectors()[0]) == 24


@pytest.mark.skipif(sys.platform != "linux", reason="the pseudo-terminal's hang-up is checked on Linux")
def test_closing_the_terminal_stops_the_index_tidily(tmp_path, tiny_files, many_videos):
    import pty
    import select

    library = tmp_path / "lib"
    command = ts2_index(many_videos, library, tiny_files, "--batch-size", "1", "--commit-every", "1", "--workers", "1")
    pid, terminal = pty.fork()  # the child runs ts2 with the pseudo-terminal as its controlling terminal
    if pid == 0:
        os.execv(command[0], command)
    shown = b""
    try:
        deadline = time.monotonic() + 120
        while count_ok(library) < 1 and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                shown += os.read(terminal, 65536)  # drained, so that the progress bar never blocks on a full pty
    finally:
        os.close(terminal)  # the terminal goes away: the kernel hangs up its session (SIGHUP)
    _, status = os.waitpid(pid, 0)
    kept = count_ok(library)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP and 1 <= kept < 24, shown[-2000:]
    resumed = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["unchanged"] >= kept and count_ok(library) == 24


SLOW_TIDY_UP = """
import sys, time
from ts2cli import cli

@cli.app.command("work")
def work() -> None:
    try:
        print("working", flush=True)
        time.sleep(60)
    finally:
        print("tidying up", flush=True)
        time.sleep(60)

sys.argv = ["ts2", "work"]
cli.main()
"""


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_cuts_a_slow_tidy_up_short(first):
    process = subprocess.Popen([sys.executable, "-c", SLOW_TIDY_UP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        assert process.stdout.readline() == "working\n"
        process.send_signal(first)
        assert process.stdout.readline() == "tidying up\n"  # the first signal lets the command tidy up
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and "Stopped at once" in stderr and "Traceback" not in stderr, stderr


INDEX_AND_REPORT = """
import sys
from ts2cli.cli import app
app(sys.argv[1:], standalone_mode=False)
print("torch" in sys.modules)
"""


def test_reindexing_unchanged_folders_does_not_import_torch(tmp_path, tiny_files, make_video):
    make_video("v/a.mp4", seconds=1)
    arguments = ts2_index(tmp_path / "v", tmp_path / "lib", tiny_files, "--json")[3:]  # without "python -m ts2cli"
    for expected in ({"indexed": 1, "torch": True}, {"indexed": 0, "unchanged": 1, "torch": False}):
        run = subprocess.run([sys.executable, "-c", INDEX_AND_REPORT, *arguments], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        summary, imported = run.stdout.rsplit("\n", 2)[:2]
        assert {**json.loads(summary), "torch": imported == "True"}.items() >= expected.items()


def test_a_folder_that_is_gone_is_forgotten_on_request(tmp_path, tiny_files, make_video):
    make_video("videos/kept/a.mp4", seconds=1)
    make_video("videos/gone/b.mp4", seconds=2, fps=6)
    make_video("videos/gone/deeper/c.mp4", seconds=2, fps=7)
    library = tmp_path / "lib"
    for folder in ("kept", "gone"):
        assert subprocess.run(ts2_index(tmp_path / "videos" / folder, library, tiny_files)).returncode == 0
    shutil.rmtree(tmp_path / "videos" / "gone")
    status = [sys.executable, "-m", "ts2cli", "status", "--library", str(library)]
    shown = subprocess.run([*status, "--json"], capture_output=True, text=True)
    kept, gone = (str((tmp_path / "videos" / folder).resolve()) for folder in ("kept", "gone"))
    assert json.loads(shown.stdout)["folders"] == [  # the folders the library covers, in path order
        {"path": gone, "videos": 2, "present": False, "exclude": [], "hidden": False},
        {"path": kept, "videos": 1, "present": True, "exclude": [], "hidden": False},
    ]
    assert "(2 videos, not found)" in subprocess.run(status, capture_output=True, text=True).stdout

    again = subprocess.run(ts2_index(tmp_path / "videos" / "gone", library, tiny_files), capture_output=True, text=True)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "still holds 2 videos from there: `ts2 forget" in " ".join(again.stderr.split())
    forget = [sys.executable, "-m", "ts2cli", "forget", str(tmp_path / "videos" / "gone"), "--library", str(library)]
    forgotten = subprocess.run([*forget, "--json"], capture_output=True, text=True)
    assert forgotten.returncode == 0, forgotten.stderr
    assert json.loads(forgotten.stdout)["removed"] == 2
    with Library.open(library) as lib:
        assert lib.stats().videos_ok == 1 and len(lib.global_vectors()[0]) == 1
        assert lib.get_by_path(str((tmp_path / "videos" / "kept" / "a.mp4").resolve())) is not None
        assert str((tmp_path / "videos" / "gone").resolve()) not in lib._links()
        assert lib.stats().folders == [(kept, 1)]
    nothing = subprocess.run([*forget, "--library", str(library), "x" * 100], capture_output=True, text=True)
    assert nothing.returncode == 0 and "holds no video under" in nothing.stderr
    assert len(nothing.stderr.splitlines()) == 1  # a note to a pipe or a log file is not folded at 80 columns


def test_index_without_model_options_uses_the_librarys_model(tmp_path, tiny_files, make_video):
    make_video("v/a.mp4", seconds=1)
    library = tmp_path / "lib"
    assert subprocess.run(ts2_index(tmp_path / "v", library, tiny_files), capture_output=True).returncode == 0
    with Library.open(library) as lib:
        record = lib.model_config()
    make_video("v/b.mp4", seconds=1, texture=True, seed=1)
    plain = ["index", "--library", str(library), "--device", "cpu", "--json"]  # no folder, no model option
    for expected in ({"indexed": 1, "torch": True}, {"indexed": 0, "unchanged": 2, "torch": False}):
        run = subprocess.run([sys.executable, "-c", INDEX_AND_REPORT, *plain], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr  # the default model (ViT-B-32, openai) is not even on this machine
        summary, imported = run.stdout.rsplit("\n", 2)[:2]
        assert {**json.loads(summary), "torch": imported == "True"}.items() >= expected.items()
    named = subprocess.run([sys.executable, "-m", "ts2cli", *plain[:-1], str(tmp_path / "v")], capture_output=True)
    assert named.returncode == 0, named.stderr  # a folder named, no model option: the library's model too
    with Library.open(library) as lib:
        assert lib.model_config() == record and lib.stats().videos_ok == 2

    cli = [sys.executable, "-m", "ts2cli", "index", "--library"]
    for arguments, message in (
        ([str(library), "--no-hidden"], "--exclude, --no-exclude and --hidden go with the folders they apply to"),
        ([str(library), str(tmp_path / "v"), "--exclude", "x", "--no-exclude"], "contradict each other"),
        ([str(tmp_path / "no library")], "No library at"),
    ):
        refused = subprocess.run([*cli, *arguments], capture_output=True, text=True)
        assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "no library").exists()  # naming no folder never creates a library


def test_a_damaged_database_is_one_line(tmp_path, tiny_files, make_video):
    for i in range(3):
        make_video(f"v/{i}.mp4", seconds=1 + i, fps=5 + i)
    library = tmp_path / "lib"
    assert subprocess.run(ts2_index(tmp_path / "v", library, tiny_files)).returncode == 0
    database = library / "library.sqlite3"
    size = database.stat().st_size
    with open(database, "r+b") as damaged:  # the first pages (schema, meta) stay whole: found mid-command
        damaged.seek(size // 2)
        damaged.write(np.random.default_rng(0).bytes(size - size // 2))
    for command in (["search", "a dog"], ["status"]):
        run = subprocess.run(
            [sys.executable, "-m", "ts2cli", *command, "--library", str(library)], capture_output=True, text=True
        )
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert "may be damaged" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_second_concurrent_index_exits_or_waits(tmp_path, tiny_files, many_videos):
    """While one writer holds the library (here: this test, through the same lock ts2 index takes), another
    `ts2 index` exits with a clear message, or with --wait waits for it and then runs."""
    library = tmp_path / "lib"
    command = ts2_index(many_videos, library, tiny_files)
    holder = Library.open(library, write=True, create=True)
    try:
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "Another ts2 index is running" in refused.stderr and "Traceback" not in refused.stderr
        stopped = subprocess.Popen([*command, "--wait", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        assert "waiting up to 120 s" in stopped.stderr.readline()  # said before the wait, not after it
        stopped.send_signal(signal.SIGINT)
        assert stopped.wait(timeout=60) == 130
        assert "Interrupted while waiting for the other ts2 command; nothing was changed." in stopped.stderr.read()
        waiting = subprocess.Popen([*command, "--wait", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(2.0)
        assert waiting.poll() is None, "the second run did not wait for the lock"
    finally:
        holder.close()
    assert waiting.wait(timeout=300) == 0
    assert count_ok(library) == 24
    env = {**os.environ, "TS2_HOME": str(library)}
    status = subprocess.run(
        [sys.executable, "-m", "ts2cli", "status", "--json"], capture_output=True, text=True, env=env
    )
    report = json.loads(status.stdout)
    assert report["videos"] == 24 and report["model"]["mode"] == "zero-shot" and report["bytes"] > 0
    assert report["duration"] == pytest.approx(24 * 6.0, abs=24 * 0.5)  # 24 videos of 6 s
    assert abs(datetime.fromisoformat(report["last_indexed"]).timestamp() - time.time()) < 600


def test_forget_waits_for_another_writer_when_told(tmp_path):
    library = tmp_path / "lib"
    command = [sys.executable, "-m", "ts2cli", "forget", str(tmp_path / "old"), "--library", str(library)]
    holder = Library.open(library, write=True, create=True)
    try:
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "Another ts2 index is running" in refused.stderr, refused.stderr
        waiting = subprocess.Popen([*command, "--wait", "120"], stderr=subprocess.PIPE, text=True)
        assert "waiting up to 120 s" in waiting.stderr.readline()
        time.sleep(1.0)
        assert waiting.poll() is None, "forget did not wait for the lock"
    finally:
        holder.close()
    assert waiting.wait(timeout=120) == 0


def _odd_names_run(tmp_path: Path, tiny_files: Path, folder: Path, video_name: str, broken_name: str):
    """Index ``folder`` holding a video and a broken file of these names, then ask `ts2 status` and `ts2 search`:
    (video, broken, library, ts2, (indexed, status, found)), ``ts2`` running the CLI as those runs did."""
    from conftest import write_video

    folder.mkdir(parents=True)
    video, broken = folder / video_name, folder / broken_name
    write_video(video, seconds=2, fps=8, width=64, height=48, texture=True)
    broken.write_bytes(b"not a video")
    library = tmp_path / "lib"
    environment = {**os.environ, "COLUMNS": "400"}  # one line per row, whatever the path's length

    def ts2(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ts2cli", *args], capture_output=True, text=True, env=environment)

    indexed = subprocess.run(ts2_index(folder, library, tiny_files), capture_output=True, text=True, env=environment)
    found = ts2("search", "a clip", "--library", str(library), "--device", "cpu")
    return video, broken, library, ts2, (indexed, ts2("status", "--library", str(library)), found)


def test_names_that_look_like_markup_are_shown_as_they_are(tmp_path, tiny_files):
    """rich reads ``[bold]`` or ``[/red]`` in a string as markup: a path must not be taken for it (nor crash)."""
    folder = tmp_path / "videos [bold]" / "d["  # the files below read as ".../d[/red].mp4", a closing tag
    video, broken, library, ts2, runs = _odd_names_run(tmp_path, tiny_files, folder, "red].mp4", "yellow].mp4")
    indexed, status, found = runs
    for run in runs:
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    # failures are reported as they happen (stderr) and in the summary; tables are the answer (stdout)
    assert str(broken) in indexed.stderr and str(broken) in indexed.stdout and str(broken) in status.stdout
    assert indexed.stdout.splitlines()[0].split() == ["library", str(library)]  # not folded at a title's width
    status_lines = [line.strip() for line in status.stdout.splitlines()]
    failed_at = next(i for i, line in enumerate(status_lines) if line.startswith("failed"))
    assert status_lines[failed_at + 1].startswith(str(broken))  # each failure under the count it belongs to
    assert str(video) in found.stdout
    # --json: a count, and the failures as `ts2 status --json` lists them (docs/cli.md), also for unchanged ones
    rerun = subprocess.run([*ts2_index(folder, library, tiny_files), "--json"], capture_output=True)
    again = json.loads(rerun.stdout)
    reason = {"path": str(broken), "reason": "not a video file or unsupported format (or the file is damaged)"}
    assert again["failed"] == 1 and again["failures"] == [reason] and again["failed_unchanged"] == 1
    assert b"1 of the failures is a file that failed before" in rerun.stderr and b"--retry-failed" in rerun.stderr
    retried = subprocess.run([*ts2_index(folder, library, tiny_files), "--json", "--retry-failed"], capture_output=True)
    assert json.loads(retried.stdout)["failed_unchanged"] == 0 and b"failed before" not in retried.stderr
    assert json.loads(ts2("status", "--json", "--library", str(library)).stdout)["failed"] == [reason]
    missing = ts2("status", "--library", str(tmp_path / "x[/red]"))
    assert missing.returncode == 1 and f"No library at {tmp_path / 'x[/red]'}" in missing.stderr, missing.stderr


def test_control_characters_in_file_names_are_shown_escaped(tmp_path, tiny_files):
    """A newline in a file name must not split a table row, nor a terminal escape in one colour the screen."""
    folder = tmp_path / "odd"
    names = ("two\nlines.mp4", "bell\a and \x1b[31mred.mp4")
    video, _, library, ts2, runs = _odd_names_run(tmp_path, tiny_files, folder, *names)
    indexed, status, found = runs
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "\x1b" not in run.stdout + run.stderr and "\a" not in run.stdout + run.stderr
    shown_video, shown_broken = str(folder / "two\\nlines.mp4"), str(folder / "bell\\x07 and \\x1b[31mred.mp4")
    assert shown_video in found.stdout and not any(line.startswith("lines.mp4") for line in found.stdout.splitlines())
    for run in (indexed, status):
        assert shown_broken in run.stdout and "[31m" in run.stdout  # the rest of the name is kept as it is
    assert shown_broken in indexed.stderr
    for run in (indexed, status, found):  # rich pads table rows to the table's width: not in a file or a pipe
        assert all(line == line.rstrip() for line in run.stdout.splitlines()) and run.stdout.endswith("\n")
    # --json keeps the real name
    listed = json.loads(ts2("search", "a clip", "--library", str(library), "--device", "cpu", "--json").stdout)
    assert [item["path"] for item in listed["results"]] == [str(video)]


def test_searching_in_a_folder_follows_the_links_under_it(tmp_path, make_video, library, model):
    names = ("root/own/a.mp4", "root/b.mp4", "phone/c.mp4", "card/d.mp4", "card/e.mp4")
    for seed, name in enumerate(names):
        make_video(name, seconds=1, texture=True, seed=seed)
    root = tmp_path / "root"
    (root / "phone").symlink_to(tmp_path / "phone", target_is_directory=True)
    (tmp_path / "phone" / "card").symlink_to(tmp_path / "card", target_is_directory=True)  # a link behind a link
    (root / "own" / "e.mp4").symlink_to(tmp_path / "card" / "e.mp4")  # a link to a single file
    index(library, model, root)
    library.commit()
    ids = {Path(path).relative_to(tmp_path).as_posix(): row for path in library.paths()
           if (row := library.get_by_path(path).id)}  # fmt: skip

    def under(folder: Path) -> list[str]:
        return sorted(name for name, row in ids.items() if row in library.ids_under(folder))

    assert under(root) == sorted(names)
    assert under(root / "phone") == under(tmp_path / "phone") == ["card/d.mp4", "card/e.mp4", "phone/c.mp4"]
    assert under(root / "phone" / "card") == under(tmp_path / "card") == ["card/d.mp4", "card/e.mp4"]
    assert under(root / "own") == ["card/e.mp4", "root/own/a.mp4"]
    assert under(root / "ph") == []  # a name that only starts like a link's


def test_a_link_to_a_name_that_is_not_utf8_does_not_break_the_library(tmp_path, make_video, library, model):
    make_video("root/own.mp4", seconds=1)
    elsewhere = os.path.join(os.fsencode(tmp_path), b"elsewhere-\xff")
    os.mkdir(elsewhere)
    os.symlink(elsewhere, os.path.join(os.fsencode(tmp_path / "root"), b"link"))
    for _ in range(2):  # the second run reads what the first recorded
        assert index(library, model, tmp_path / "root").failed == []
    library.commit()
    stored = json.loads(library._conn.execute("SELECT value FROM meta WHERE key = 'linked_folders'").fetchone()[0])
    assert stored == {str(tmp_path / "root"): []}
    # a library in which an older ts2 recorded such a place
    stored[str(tmp_path / "root")] = [os.fsdecode(elsewhere)]
    with library._conn:
        library._conn.execute("UPDATE meta SET value = ? WHERE key = 'linked_folders'", (json.dumps(stored),))
    assert index(library, model, tmp_path / "root").unchanged == 1
    assert forget(library, [tmp_path / "root"]) == [str(tmp_path / "root" / "own.mp4")]


def test_videos_found_through_a_link_go_when_the_link_or_the_file_goes(tmp_path, make_video, library, model):
    for seed, name in enumerate(("root/own.mp4", "elsewhere/e1.mp4", "elsewhere/e2.mp4", "other/o.mp4")):
        make_video(name, seconds=1, texture=True, seed=seed)  # different content: none is taken for a move
    link = tmp_path / "root" / "linked"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert index(library, model, tmp_path / "root").indexed == 3
    (tmp_path / "elsewhere" / "e1.mp4").unlink()
    assert index(library, model, tmp_path / "root").removed == 1  # a file behind the link
    link.unlink()
    assert index(library, model, tmp_path / "root").removed == 1  # the link itself
    assert names_under(library, tmp_path) == ["own.mp4"]
    file_link = tmp_path / "root" / "linked-file.mp4"  # a link to a single file outside the root, the same
    file_link.symlink_to(tmp_path / "elsewhere" / "e2.mp4")
    assert index(library, model, tmp_path / "root").indexed == 1
    file_link.unlink()
    assert index(library, model, tmp_path / "root").removed == 1
    assert names_under(library, tmp_path) == ["own.mp4"]

    # a linked folder that another root covers is that root's business
    link.symlink_to(tmp_path / "other", target_is_directory=True)
    assert index(library, model, tmp_path / "other").indexed == 1
    assert index(library, model, tmp_path / "root").unchanged == 2
    link.unlink()
    assert index(library, model, tmp_path / "root").removed == 0
    assert names_under(library, tmp_path) == ["o.mp4", "own.mp4"]


def names_under(library, folder) -> list[str]:
    return sorted(Path(row.path).name for row in library.videos(library.ids_under(folder)).values())


def test_a_folder_indexed_by_name_inside_another_keeps_what_the_outer_rules_skip(tmp_path, make_video, library, model):
    for seed, name in enumerate(("v/a.mp4", "v/.private/p1.mp4", "v/.private/p2.mp4", "v/drafts/d.mp4")):
        make_video(name, seconds=1, texture=True, seed=seed)
    index(library, model, tmp_path / "v" / ".private")
    index(library, model, tmp_path / "v" / "drafts")
    outer = index(library, model, tmp_path / "v", exclude=("drafts",))  # hidden files skipped, drafts excluded
    assert (outer.indexed, outer.unchanged, outer.removed) == (1, 0, 0)
    assert names_under(library, tmp_path) == ["a.mp4", "d.mp4", "p1.mp4", "p2.mp4"]
    (tmp_path / "v" / ".private" / "p2.mp4").unlink()
    assert index(library, model, tmp_path / "v", exclude=("drafts",)).removed == 1  # a file that is gone still goes
    folders = dict(library.stats().folders)
    assert [folders[str((tmp_path / "v" / name).resolve())] for name in (".private", "drafts", "")] == [1, 1, 3]

    assert forget(library, [tmp_path / "v"]) == sorted(
        str((tmp_path / "v" / name).resolve()) for name in ("a.mp4", ".private/p1.mp4", "drafts/d.mp4")
    )
    assert library.stats().folders == []  # the folders inside it are off the list too


def test_forgetting_a_folder_forgets_what_its_links_brought_in(tmp_path, make_video, library, model):
    for seed, name in enumerate(("elsewhere/e1.mp4", "elsewhere/e2.mp4", "other/o.mp4", "root/own.mp4")):
        make_video(name, seconds=1, texture=True, seed=seed)
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "root" / "other").symlink_to(tmp_path / "other", target_is_directory=True)
    index(library, model, tmp_path / "other")
    index(library, model, tmp_path / "root")
    root = str((tmp_path / "root").resolve())
    assert dict(library.stats().folders)[root] == 4  # its own video, and the three its links lead to
    removed = forget(library, [tmp_path / "root"])
    assert [Path(path).name for path in removed] == ["e1.mp4", "e2.mp4", "own.mp4"]
    assert names_under(library, tmp_path) == ["o.mp4"]  # another root covers it


def test_a_checkpoint_with_broken_weights_stops_the_run_in_one_line(tmp_path, make_video, library):
    from ts2cli.model import save_checkpoint

    make_video("v/a.mp4", seconds=1)
    net = tiny_net()
    with torch.no_grad():
        net.temporal.position.weight.fill_(float("nan"))  # what a diverged training run leaves behind
    path = tmp_path / "diverged.safetensors"
    save_checkpoint(net, path, net.config)
    broken = load_model(ModelOptions(checkpoint=path, device="cpu", frames=4, precision="float32"))
    with pytest.raises(Ts2Error, match=r"features for .*a\.mp4 are not finite numbers: its weights look damaged"):
        index(library, broken, tmp_path / "v")
    assert library.stats().videos_ok == 0


def test_official_mode_stores_each_real_frame_of_a_short_video(tmp_path, make_video, library):
    """Official mode's own mask is the tiled one (spec §10.1, quirk 1): for 7 real frames of 12 it marks 8 slots,
    padding among them. The library keeps the 7 real frames, each with its time."""
    from ts2cli.decode import sample_frames
    from ts2cli.model import save_checkpoint

    short = make_video("v/short.mp4", seconds=1, fps=7)
    net = tiny_net(compat="official")
    path = tmp_path / "official.safetensors"
    save_checkpoint(net, path, net.config)
    options = ModelOptions(checkpoint=path, device="cpu", precision="float32")
    summary = index(library, load_model(options), tmp_path / "v")
    assert summary.indexed == 1 and not summary.failed
    row = library.get_by_path(str(short.path.resolve()))
    fresh = load_model(options)  # its seeded top-k noise starts where the indexer's did
    assert fresh.config.compat == "official"
    sampled = sample_frames(short.path, 12, fresh.image_size, keyframe_snap=KEYFRAME_SNAP)
    assert len(sampled.times) == 7 and row.frame_times == pytest.approx(sampled.times)
    direct = fresh.encode_frames([sampled.frames])[0]
    np.testing.assert_allclose(library.frame_features([row.id])[row.id], direct, rtol=2e-3, atol=2e-3)
    _, tiled = fresh.encode_videos([sampled.frames])
    assert tiled[0].sum() == 8  # the model's own mask: not the real frames


class StopAfterPlanning(Progress):
    def planned(self, total: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C once the scan is done, before anything is embedded or swept


class RenameAfterPlanning(Progress):
    def __init__(self, folder: Path, new_name: Path) -> None:
        self.folder, self.new_name = folder, new_name

    def planned(self, total: int) -> None:
        self.folder.rename(self.new_name)  # the user renames the folder while the run decodes


def test_files_that_vanish_during_a_run_are_not_recorded_as_failures(tmp_path, make_video, library, model):
    make_video("v/a.mp4", seconds=1)
    make_video("v/b.mp4", seconds=1, texture=True, seed=1)  # not a copy of a.mp4
    summary = index_folders(
        library, model, IndexOptions(roots=[tmp_path / "v"]), RenameAfterPlanning(tmp_path / "v", tmp_path / "w")
    )
    assert (summary.indexed, summary.failed) == (0, [])
    assert library.stats().videos_ok == 0 and not library.stats().failures
    assert index(library, model, tmp_path / "w").indexed == 2


def test_sweeping_what_links_led_to_spares_what_other_roots_cover(tmp_path, make_video, library, model):
    names = ("ext/sub/a.mp4", "ext/b.mp4", "r1/c.mp4", "r2/d.mp4", "single/e.mp4", "nested/A/f.mp4", "nested/B/g.mp4")
    for seed, name in enumerate(names):
        make_video(name, seconds=1, texture=True, seed=seed)
    root1, root2 = tmp_path / "r1", tmp_path / "r2"

    # a link to a folder holding another root: only what no other root covers goes with the link
    index(library, model, tmp_path / "ext" / "sub")
    (root1 / "ext").symlink_to(tmp_path / "ext", target_is_directory=True)
    index(library, model, root1)
    (root1 / "ext").unlink()
    assert index(library, model, root1).removed == 1 and "a.mp4" in names_under(library, tmp_path)

    # a single file indexed as a root of its own is spared too
    index(library, model, tmp_path / "single" / "e.mp4")
    (root1 / "e.mp4").symlink_to(tmp_path / "single" / "e.mp4")
    index(library, model, root1)
    (root1 / "e.mp4").unlink()
    assert index(library, model, root1).removed == 0 and "e.mp4" in names_under(library, tmp_path)

    # two roots scanned together both learn where a link inside a folder they share leads
    (tmp_path / "nested" / "A" / "to-B").symlink_to(tmp_path / "nested" / "B", target_is_directory=True)
    for root in (root1, root2):
        (root / "A").symlink_to(tmp_path / "nested" / "A", target_is_directory=True)
    index(library, model, root1, root2)
    (root1 / "A").unlink()
    assert index(library, model, root1).removed == 0  # g.mp4 is still reached through r2/A/to-B

    # a run stopped after its scan forgets no place it has yet to sweep
    (root2 / "A").unlink()
    with pytest.raises(KeyboardInterrupt):
        index_folders(library, model, IndexOptions(roots=[root2]), StopAfterPlanning())
    assert index(library, model, root2).removed == 2  # f.mp4 and g.mp4
    assert names_under(library, tmp_path) == ["a.mp4", "c.mp4", "d.mp4", "e.mp4"]


def test_an_empty_name_is_neither_a_folder_to_index_nor_a_library(tmp_path):
    for args in (("index", "", "--library", str(tmp_path / "lib")), ("status", "--library", "")):
        refused = subprocess.run([sys.executable, "-m", "ts2cli", *args], capture_output=True, text=True, cwd=tmp_path)
        assert refused.returncode == 1 and "An empty name was given" in refused.stderr, refused.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written in the current folder
