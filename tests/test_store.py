"""The on-disk library: real SQLite, real hnswlib, real processes for locking and kill -9."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ts2cli import ann_index, store
from ts2cli.ann_index import ANN_FILE, ANN_META_FILE
from ts2cli.errors import LibraryError
from ts2cli.store import DB_FILE, SCHEMA_VERSION, Library, default_library_dir

DIM = 16
MODEL = {"name": "ViT-B-32/test", "frames": 4}
REPO = Path(__file__).resolve().parents[1]


def _features(rng: np.random.Generator, n_frames: int = 4) -> tuple[np.ndarray, np.ndarray]:
    frames = rng.standard_normal((n_frames, DIM)).astype(np.float32)
    return frames, frames.mean(axis=0)


def _put(lib: Library, path: str, rng: np.random.Generator, n_frames: int = 4) -> tuple[int, np.ndarray]:
    frames, vector = _features(rng, n_frames)
    video_id = lib.put_video(
        path,
        size=100,
        mtime=1.5,
        fingerprint=f"fp:{path}",
        duration=2.0,
        width=64,
        height=48,
        frame_times=[0.5 * i for i in range(n_frames)],
        frames=frames,
        global_vector=vector,
    )
    return video_id, frames


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _all_ann_ids(lib: Library) -> set[int]:
    ids, _ = lib.knn(np.ones(DIM, np.float32), 10**6)
    return {int(i) for i in ids}


@pytest.fixture
def libdir(tmp_path: Path) -> Path:
    return tmp_path / "my library é"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _run_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


# ---------------------------------------------------------------- opening


def test_missing_library_is_a_clear_error(libdir: Path) -> None:
    with pytest.raises(LibraryError, match=r"No library at .*ts2 index"):
        Library.open(libdir)
    assert not libdir.exists()


def test_create_open_reopen(libdir: Path) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        assert lib.directory == libdir
        assert lib.model_config() is None
        assert lib.ann() is None
        assert lib.knn(np.ones(DIM), 5)[0].size == 0
    assert (libdir / DB_FILE).is_file()
    with Library.open(libdir) as lib:
        stats = lib.stats()
    assert (stats.videos_ok, stats.videos_failed, stats.schema_version) == (0, 0, SCHEMA_VERSION)
    assert stats.bytes_on_disk > 0


def test_default_library_dir_honours_ts2_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TS2_HOME", str(tmp_path / "home"))
    assert default_library_dir() == tmp_path / "home"
    monkeypatch.delenv("TS2_HOME")
    assert default_library_dir().name == "library"


def test_newer_schema_is_refused(libdir: Path) -> None:
    Library.open(libdir, write=True, create=True).close()
    with sqlite3.connect(libdir / DB_FILE) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(LibraryError, match=r"newer ts2.*upgrade ts2"):
        Library.open(libdir)


def test_not_a_database_is_a_library_error(libdir: Path) -> None:
    libdir.mkdir()
    (libdir / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LibraryError, match="Cannot read the library"):
        Library.open(libdir)


# ---------------------------------------------------------------- model configuration


def test_model_config_check(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        lib.check_model(MODEL)  # adopted by a new library
        _put(lib, "/videos/a.mp4", rng)
    with Library.open(libdir, write=True) as lib:
        assert lib.model_config() == MODEL
        lib.check_model(dict(reversed(MODEL.items())))  # same config, other key order
        other = {"name": "ViT-L-14/other", "frames": 4}
        with pytest.raises(LibraryError, match=r"ViT-B-32/test.*ViT-L-14/other.*--rebuild.*--library"):
            lib.check_model(other)
        lib.clear(other)
        assert lib.get_by_path("/videos/a.mp4") is None
        assert lib.ann() is None
        # A rebuilt library may hold vectors of another size.
        frames = rng.standard_normal((2, 8))
        lib.put_video(
            "/videos/b.mp4", size=1, mtime=1, fingerprint="x", duration=1, width=1, height=1,
            frame_times=[0, 1], frames=frames, global_vector=frames[0],
        )  # fmt: skip
    with Library.open(libdir) as lib:
        assert lib.model_config() == other
        assert lib.stats().videos_ok == 1
        assert lib.stats().dim == 8


def test_the_request_a_model_was_loaded_from_holds_while_the_record_does(libdir: Path) -> None:
    request = {"model": "ViT-B-32", "pretrained": "openai", "checkpoint": None, "compat": None}
    with Library.open(libdir, write=True, create=True) as lib:
        assert lib.loaded_from() is None
        lib.check_model(MODEL)
        lib.remember_loaded_from(request)
    with Library.open(libdir, write=True) as lib:
        assert lib.loaded_from() == request
        lib.check_model({**MODEL, "source": {"weights_file": "/moved/here"}})  # same model, record rewritten
        assert lib.loaded_from() is None
        lib.remember_loaded_from(request)
        lib.clear({"name": "other"})
        assert lib.loaded_from() is None
        lib._set_meta("model_request", "{damaged")
        assert lib.loaded_from() is None


# ---------------------------------------------------------------- writes and reads


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """``read_only(folder)``: the folder as a reader on read-only storage sees it (a read-only bind mount for
    root, which no permission bit stops; else the folder itself, its write bit removed)."""
    undo: list[Callable[[], object]] = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            undo.append(lambda: folder.chmod(0o755))
            return folder
        view = tmp_path / f"{folder.name}-read-only"
        view.mkdir()
        mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("root without a read-only place: mount --bind is not allowed here")
        undo.append(lambda: subprocess.run(["umount", str(view)], check=True))
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        return view

    yield make
    for step in reversed(undo):
        step()


def test_library_on_read_only_storage_can_be_read(libdir: Path, rng: np.random.Generator, read_only) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        video_id, frames = _put(lib, "/videos/a.mp4", rng)
    view = read_only(libdir)
    assert not os.access(view, os.W_OK)
    with Library.open(view) as lib:
        assert lib.stats().videos_ok == 1
        assert lib.knn(_unit(frames.mean(axis=0)), 1)[0].tolist() == [video_id]
    with pytest.raises(LibraryError):
        Library.open(view, write=True)


def test_put_get_round_trip(libdir: Path, rng: np.random.Generator) -> None:
    path = str(Path("/videos/dir with spaces/été 日本.mp4"))
    with Library.open(libdir, write=True, create=True) as lib:
        video_id, frames = _put(lib, path, rng, n_frames=5)
        global_in = frames.mean(axis=0)
    with Library.open(libdir) as lib:
        row = lib.get_by_path(path)
        assert row is not None and row.id == video_id
        assert (row.status, row.error, row.size, row.width, row.height) == ("ok", None, 100, 64, 48)
        assert row.frame_times == [0.0, 0.5, 1.0, 1.5, 2.0]
        got = lib.frame_features([video_id])[video_id]
        assert got.dtype == np.float32 and got.shape == (5, DIM)
        np.testing.assert_allclose(got, frames, rtol=1e-3, atol=1e-3)  # float16 storage
        raw = lib.frame_features([video_id], dtype=np.float16)[video_id]
        assert raw.dtype == np.float16 and np.array_equal(raw.astype(np.float32), got)
        ids, vectors = lib.global_vectors()
        assert ids.tolist() == [video_id]
        np.testing.assert_allclose(np.linalg.norm(vectors[0]), 1.0, rtol=1e-6)
        np.testing.assert_allclose(vectors[0], _unit(global_in), rtol=1e-5, atol=1e-6)
        assert lib.videos([video_id, 999])[video_id].path == path
        assert lib.find_by_fingerprint(f"fp:{path}", 100)[0].id == video_id
        assert lib.find_by_fingerprint(f"fp:{path}", 101) == []


def test_streamed_features_come_in_batches_and_skip_missing_ids(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        ids = [_put(lib, f"/v/{i}.mp4", rng, n_frames=2 + i % 3)[0] for i in range(7)]
    with Library.open(libdir) as lib:
        wanted = [*ids[::-1], 999]
        batches = list(lib.stream_frame_features(wanted, 3))
        expected = lib.frame_features(ids, dtype=np.float16)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    streamed = {video_id: frames for batch in batches for video_id, frames in batch}
    assert streamed.keys() == set(ids)
    assert all(np.array_equal(streamed[i], expected[i]) and streamed[i].dtype == np.float16 for i in ids)


def test_bad_features_write_nothing(libdir: Path, rng: np.random.Generator) -> None:
    frames, vector = _features(rng)
    common = {"size": 1, "mtime": 1.0, "fingerprint": "f", "duration": 1.0, "width": 1, "height": 1}
    with Library.open(libdir, write=True, create=True) as lib:
        bad_inputs = [
            ([0, 1, 2, 3], frames, np.zeros(DIM)),  # zero global vector
            ([0, 1, 2, 3], frames[:, :8], vector),  # dims disagree
            ([0, 1], frames, vector),  # one time per frame row
            ([0, 1, 2, 3], frames * np.inf, vector),
        ]
        for times, f, g in bad_inputs:
            with pytest.raises(ValueError):
                lib.put_video("/v.mp4", frame_times=times, frames=f, global_vector=g, **common)
        _put(lib, "/ok.mp4", rng)
        with pytest.raises(ValueError, match="16-d"):
            lib.put_video("/v.mp4", frame_times=[0], frames=np.ones((1, 8)), global_vector=np.ones(8), **common)
    with Library.open(libdir) as lib:
        assert lib.get_by_path("/v.mp4") is None
        assert lib.stats().videos_ok == 1


def test_knn_returns_exact_nearest_neighbours(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        ids = [_put(lib, f"/v/{i}.mp4", rng)[0] for i in range(300)]
    with Library.open(libdir) as lib:
        all_ids, vectors = lib.global_vectors()
        assert sorted(all_ids.tolist()) == sorted(ids)
        for q in rng.standard_normal((20, DIM)):
            exact = vectors @ _unit(q)
            order = np.argsort(-exact)[:10]
            got_ids, sims = lib.knn(q * 3.0, 10)  # the query need not be unit length
            assert got_ids.tolist() == all_ids[order].tolist()
            np.testing.assert_allclose(sims, exact[order], atol=1e-5)
        got_ids, _ = lib.knn(vectors[0], 10_000)  # k is clipped to the library size
        assert len(got_ids) == 300


def test_update_keeps_id_and_updates_ann(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(20):
            _put(lib, f"/v/{i}.mp4", rng)
    with Library.open(libdir, write=True) as lib:
        old = lib.get_by_path("/v/7.mp4")
        assert old is not None
        assert lib.ann() is not None and lib.last_ann_load == "disk"
        new_id, frames = _put(lib, "/v/7.mp4", rng, n_frames=6)
        assert new_id == old.id
        got_ids, sims = lib.knn(frames.mean(axis=0), 1)
        assert got_ids.tolist() == [old.id] and sims[0] == pytest.approx(1.0, abs=1e-5)
        assert len(_all_ann_ids(lib)) == 20
        assert lib.last_ann_load == "disk"  # updated in place, not rebuilt
    with Library.open(libdir) as lib:
        assert lib.frame_features([old.id])[old.id].shape == (6, DIM)
        assert lib.knn(frames.mean(axis=0), 1)[0].tolist() == [old.id]
        assert lib.last_ann_load == "disk"
        assert lib.stats().videos_ok == 20


def test_failures(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        good_id, _ = _put(lib, "/v/good.mp4", rng)
        was_ok, _ = _put(lib, "/v/broken later.mp4", rng)
        lib.commit()
        assert _all_ann_ids(lib) == {good_id, was_ok}
        failed_id = lib.put_failure("/v/never.mp4", size=5, mtime=2.0, fingerprint=None, error="moov atom\nnot found  ")
        assert lib.put_failure("/v/broken later.mp4", size=5, mtime=3.0, fingerprint="x", error="bad") == was_ok
        lib.commit()
        assert _all_ann_ids(lib) == {good_id}
    with Library.open(libdir, write=True) as lib:  # a deleted label comes back, in an index loaded from disk
        assert lib.put_failure("/v/broken later.mp4", size=5, mtime=3.0, fingerprint="x", error="bad") == was_ok
        assert _put(lib, "/v/broken later.mp4", rng)[0] == was_ok
        lib.commit()
        assert lib.last_ann_load == "disk"
        assert _all_ann_ids(lib) == {good_id, was_ok}
        assert lib.put_failure("/v/broken later.mp4", size=5, mtime=3.0, fingerprint="x", error="bad") == was_ok
    with Library.open(libdir) as lib:
        row = lib.get_by_path("/v/never.mp4")
        assert row is not None and row.id == failed_id
        assert (row.status, row.error, row.frame_times) == ("failed", "moov atom not found", [])
        assert lib.frame_features([failed_id, was_ok, good_id]).keys() == {good_id}
        stats = lib.stats()
        assert (stats.videos_ok, stats.videos_failed) == (1, 2)
        assert stats.video_seconds == 2.0  # the ok video's length; failures have none
        assert stats.last_indexed is not None and abs(stats.last_indexed - time.time()) < 600
        assert stats.failures == [("/v/broken later.mp4", "bad"), ("/v/never.mp4", "moov atom not found")]
        assert _all_ann_ids(lib) == {good_id}


def test_mark_and_sweep_only_touches_unseen_under_roots(libdir: Path, rng: np.random.Generator) -> None:
    paths = [
        "/lib/a/x.mp4",
        "/lib/a/sub/y.mp4",
        "/lib/a/100%_done.mp4",
        "/lib/ab/z.mp4",  # shares a prefix with /lib/a but is not under it
        "/lib/A/upper.mp4",  # LIKE would match this case-insensitively
        "/lib/a_b/w.mp4",  # LIKE would treat '_' as a wildcard
        "/other/q.mp4",
    ]
    with Library.open(libdir, write=True, create=True) as lib:
        ids = {p: _put(lib, p, rng)[0] for p in paths}
        lib.put_failure("/lib/a/failed.mp4", size=1, mtime=1, fingerprint=None, error="x")
        lib.commit()
        lib.begin_scan(["/lib/a/"])
        lib.mark_seen(ids["/lib/a/x.mp4"])
        removed = lib.sweep_unseen(["/lib/a"])
        assert removed == ["/lib/a/100%_done.mp4", "/lib/a/failed.mp4", "/lib/a/sub/y.mp4"]
        lib.commit()
        kept = set(paths) - {"/lib/a/sub/y.mp4", "/lib/a/100%_done.mp4"}
        assert _all_ann_ids(lib) == {ids[p] for p in kept}
    with Library.open(libdir) as lib:
        assert {p for p in paths if lib.get_by_path(p) is not None} == kept
        assert lib.frame_features([ids["/lib/a/sub/y.mp4"]]) == {}
        assert _all_ann_ids(lib) == {ids[p] for p in kept}


def test_move_keeps_features(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        video_id, frames = _put(lib, "/v/old name.mp4", rng)
        squatter, _ = _put(lib, "/v/taken.mp4", rng)
        lib.commit()
        (match,) = lib.find_by_fingerprint("fp:/v/old name.mp4", 100)
        lib.move(match.id, "/v/new/nom été.mp4", mtime=9.0)
        lib.move(video_id, "/v/taken.mp4", mtime=10.0)  # replaces what was there
        with pytest.raises(KeyError):
            lib.move(12345, "/v/nowhere.mp4", mtime=1.0)
    with Library.open(libdir) as lib:
        assert lib.get_by_path("/v/old name.mp4") is None
        assert lib.get_by_path("/v/new/nom été.mp4") is None
        row = lib.get_by_path("/v/taken.mp4")
        assert row is not None and (row.id, row.mtime) == (video_id, 10.0)
        np.testing.assert_allclose(lib.frame_features([video_id])[video_id], frames, atol=1e-3)
        assert _all_ann_ids(lib) == {video_id}
        assert squatter not in lib.videos([squatter])


def test_frame_features_many_ids_and_all(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        ids = [_put(lib, f"/v/{i}.mp4", rng, n_frames=1 + i % 3)[0] for i in range(1000)]
    with Library.open(libdir) as lib:
        got = lib.frame_features([*ids, -1])  # more ids than one SQL statement takes
        assert got.keys() == set(ids)
        assert [got[i].shape[0] for i in ids[:6]] == [1, 2, 3, 1, 2, 3]
        all_ids, arrays = lib.all_frame_features()
        assert all_ids == sorted(ids)
        np.testing.assert_array_equal(arrays[5], got[all_ids[5]])
        assert len(lib.videos(ids)) == 1000


# ---------------------------------------------------------------- the ANN cache


def test_saved_ann_is_loaded_not_rebuilt(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(30):
            _put(lib, f"/v/{i}.mp4", rng)
    sidecar = json.loads((libdir / ANN_META_FILE).read_text())
    assert sidecar["count"] == 30 and sidecar["dim"] == DIM
    with Library.open(libdir) as lib:
        assert lib.ann() is not None
        assert lib.last_ann_load == "disk"


def test_no_sidecar_vouches_for_an_index_file_it_does_not_describe(
    libdir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped between replacing the index file and writing its sidecar, a save leaves no sidecar: the old one would
    describe the previous file, and match the database again should a power cut take its last commit back."""
    with Library.open(libdir, write=True, create=True) as lib:
        _put(lib, "/v/0.mp4", rng)
    assert (libdir / ANN_META_FILE).exists()

    def cut_off(*args: object) -> None:
        raise OSError(errno.EIO, "cut off")

    monkeypatch.setattr(ann_index, "write_text_atomically", cut_off)
    with pytest.raises(LibraryError), Library.open(libdir, write=True) as lib:
        _put(lib, "/v/1.mp4", rng)
    monkeypatch.undo()
    assert not (libdir / ANN_META_FILE).exists()
    with Library.open(libdir) as lib:
        assert _all_ann_ids(lib) == {1, 2} and lib.last_ann_load == "rebuilt"


def test_damaged_folder_records_read_as_empty(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        _put(lib, "/v/a.mp4", rng)
        for key, value in (("linked_folders", '{"/v": 5, "/w": ["/elsewhere"]}'), ("link_paths", '{"/v": [1]}')):
            lib._set_meta(key, value)
        lib._set_meta("folder_rules", "[not an object]")
        assert lib.folder_rules() == {Path("/w"): None} and lib.places_linked_under(Path("/v")) == []
        assert lib.ids_under("/v") == [1] and lib.count_under("/v", also=["/elsewhere"]) == 1
        lib.forget_roots([Path("/w")])
        assert lib.folder_rules() == {}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB file system of its own (tmpfs), to run out of room on for real; root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    place = tmp_path / "small"
    place.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(place)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    yield place
    subprocess.run(["umount", "-l", str(place)], check=True)


def test_a_full_disk_keeps_the_last_whole_search_index(small_disk: Path, rng: np.random.Generator) -> None:
    """hnswlib's save does not report a failed write: a cut-off file must not replace the good one."""
    libdir = small_disk / "lib"
    wide = np.random.default_rng(0).standard_normal((202, 512)).astype(np.float32)

    def put(lib: Library, i: int) -> None:
        lib.put_video(
            f"/v/{i}.mp4", size=1, mtime=1, fingerprint=f"{i}", duration=1, width=1, height=1,
            frame_times=[0], frames=wide[i : i + 1], global_vector=wide[i],
        )  # fmt: skip

    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(200):
            put(lib, i)
    saved = (libdir / ANN_FILE).stat().st_size
    room = os.statvfs(small_disk)
    filler = small_disk / "filler"
    with open(filler, "wb") as out:  # leave half of what another copy of the index needs
        os.posix_fallocate(out.fileno(), 0, room.f_bavail * room.f_frsize - saved // 2)
    full = r"Could not save the search index .*disk full.*videos are kept"
    with pytest.raises(LibraryError, match=full), Library.open(libdir, write=True) as lib:
        put(lib, 200)
    assert (libdir / ANN_FILE).stat().st_size == saved and not list(libdir.glob(".*.tmp"))
    # the error that stopped the run is told, not the failed save after it
    with pytest.raises(KeyboardInterrupt), Library.open(libdir, write=True) as lib:
        put(lib, 201)
        raise KeyboardInterrupt
    filler.unlink()
    with Library.open(libdir) as lib:
        assert lib.stats().videos_ok == 202
        assert lib.ann() is not None and lib.last_ann_load == "rebuilt"  # the old index was stale, not broken


def test_stale_ann_is_rebuilt(
    libdir: Path, rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_REBUILD_CHUNK", 7)  # rebuild in several chunks, growing the index
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(30):
            _put(lib, f"/v/{i}.mp4", rng)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in (ANN_FILE, ANN_META_FILE):
        shutil.copy(libdir / name, saved / name)
    with Library.open(libdir, write=True) as lib:
        new_id, frames = _put(lib, "/v/new.mp4", rng)
        lib.sweep_unseen([])  # no-op
        lib.begin_scan(["/v"])
        lib.sweep_unseen(["/v/0.mp4"])
    # As if the writer was killed after its last commit but before save_ann: old files, newer SQLite.
    for name in (ANN_FILE, ANN_META_FILE):
        shutil.copy(saved / name, libdir / name)
    with Library.open(libdir) as lib:
        got_ids, _ = lib.knn(frames.mean(axis=0), 1)
        assert lib.last_ann_load == "rebuilt"
        assert got_ids.tolist() == [new_id]
        assert _all_ann_ids(lib) == set(lib.global_vectors()[0].tolist())
        assert len(_all_ann_ids(lib)) == 30
    with Library.open(libdir) as lib:  # the rebuilt index was saved
        lib.ann()
        assert lib.last_ann_load == "disk"


def _killed_before_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make writers stop as a killed ts2 index does: after their last commit, before the ANN files are saved."""
    monkeypatch.setattr(Library, "save_ann", lambda self: None)


def _log(libdir: Path) -> tuple[list[int], list[int]]:
    with sqlite3.connect(libdir / DB_FILE) as conn:
        generations = [row[0] for row in conn.execute("SELECT number FROM generations ORDER BY number")]
        changed = [row[0] for row in conn.execute("SELECT video_id FROM vector_changes ORDER BY video_id")]
    return generations, changed


def test_a_killed_writers_changes_are_caught_up_not_rebuilt(
    libdir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Searches during (or after a kill of) a long ts2 index bring the last saved index up to date from the change
    log: a rebuild takes a minute at 100,000 videos."""
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(30):
            _put(lib, f"/v/{i}.mp4", rng)
    saved = json.loads((libdir / ANN_META_FILE).read_text())
    assert _log(libdir) == ([saved["generation"]], [])  # a save forgets the changes it holds
    _killed_before_saving(monkeypatch)
    with Library.open(libdir, write=True) as lib:
        removed = {lib.get_by_path(f"/v/{i}.mp4").id for i in (0, 5)}  # type: ignore[union-attr]
        new_id, new_frames = _put(lib, "/v/new.mp4", rng)
        lib.commit()
        replaced_id, replaced_frames = _put(lib, "/v/3.mp4", rng)
        lib.put_failure("/v/5.mp4", size=1, mtime=1, fingerprint=None, error="now broken")
        lib.begin_scan(["/v/0.mp4"])
        lib.sweep_unseen(["/v/0.mp4"])
    assert json.loads((libdir / ANN_META_FILE).read_text()) == saved  # the files are the old ones
    with Library.open(libdir) as lib:
        found, sims = lib.knn(new_frames.mean(axis=0), 1)
        assert lib.last_ann_load == "caught up"
        assert found.tolist() == [new_id] and sims[0] == pytest.approx(1.0, abs=1e-5)
        assert lib.knn(replaced_frames.mean(axis=0), 1)[0].tolist() == [replaced_id]
        ids, vectors = lib.global_vectors()
        assert _all_ann_ids(lib) == set(ids.tolist()) and len(ids) == 29 and not removed & set(ids.tolist())
        for i in range(len(ids)):
            assert lib.knn(vectors[i], 1)[0].tolist() == [ids[i]]
    assert json.loads((libdir / ANN_META_FILE).read_text()) == saved  # readers leave saving to the writer
    monkeypatch.undo()
    with Library.open(libdir, write=True) as lib:  # the next writer saves what it caught up to
        assert lib.ann() is not None and lib.last_ann_load == "caught up"
    with Library.open(libdir) as lib:
        assert _all_ann_ids(lib) == set(ids.tolist()) and lib.last_ann_load == "disk"
    assert _log(libdir) == ([json.loads((libdir / ANN_META_FILE).read_text())["generation"]], [])


def test_a_reader_whose_index_the_log_has_forgotten_reads_the_files(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as writer:
        _put(writer, "/v/1.mp4", rng)
    with Library.open(libdir) as reader:
        assert len(_all_ann_ids(reader)) == 1 and reader.last_ann_load == "disk"
        with Library.open(libdir, write=True) as writer:
            _put(writer, "/v/2.mp4", rng)
            writer.commit()
            _put(writer, "/v/3.mp4", rng)  # saved at the end, forgetting the generation the reader is at
        assert len(_all_ann_ids(reader)) == 3 and reader.last_ann_load == "disk"


@pytest.mark.parametrize("history", ["written by a ts2 without the log", "emptied", "log damaged", "power cut"])
def test_an_index_the_log_cannot_vouch_for_is_rebuilt(
    libdir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, history: str
) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(10):
            _put(lib, f"/v/{i}.mp4", rng)
    _killed_before_saving(monkeypatch)
    with Library.open(libdir, write=True) as lib:
        if history == "emptied":
            lib.clear(MODEL)
        _put(lib, "/v/new.mp4", rng)
    if history == "written by a ts2 without the log":  # it bumps the generation and logs nothing
        with sqlite3.connect(libdir / DB_FILE) as conn:
            conn.execute("DELETE FROM videos WHERE path = '/v/1.mp4'")
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            conn.execute("UPDATE meta SET value = 'not logged' WHERE key = 'generation_id'")
    elif history == "log damaged":  # the one vector that changed is missing from it: the counts disagree
        with sqlite3.connect(libdir / DB_FILE) as conn:
            conn.execute("DELETE FROM vector_changes")
    elif history == "power cut":  # SQLite lost the saved generation (and reached its number again)
        with sqlite3.connect(libdir / DB_FILE) as conn:
            saved = json.loads((libdir / ANN_META_FILE).read_text())["generation"]
            conn.execute("UPDATE generations SET token = 'another' WHERE number = ?", (saved,))
    with Library.open(libdir) as lib:
        ids, vectors = lib.global_vectors()
        assert _all_ann_ids(lib) == set(ids.tolist()) and lib.last_ann_load == "rebuilt"
        assert lib.knn(vectors[-1], 1)[0].tolist() == [ids[-1]]


def test_a_library_from_before_the_log_gets_one(
    libdir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        _put(lib, "/v/1.mp4", rng)
    with sqlite3.connect(libdir / DB_FILE) as conn:
        conn.execute("DROP TABLE generations")
        conn.execute("DROP TABLE vector_changes")
    with Library.open(libdir) as lib:  # readers work without it (and do not write)
        assert len(_all_ann_ids(lib)) == 1 and lib.last_ann_load == "disk"
    assert not _table_names(libdir) & {"generations", "vector_changes"}
    _killed_before_saving(monkeypatch)
    with Library.open(libdir, write=True) as lib:  # a writer starts the log at the saved generation
        _put(lib, "/v/2.mp4", rng)
    with Library.open(libdir) as lib:
        assert len(_all_ann_ids(lib)) == 2 and lib.last_ann_load == "caught up"


def _table_names(libdir: Path) -> set[str]:
    with sqlite3.connect(libdir / DB_FILE) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.parametrize("damage", ["garbage index", "truncated index", "missing index", "garbage sidecar"])
def test_damaged_ann_is_rebuilt(libdir: Path, rng: np.random.Generator, damage: str) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(40):
            _put(lib, f"/v/{i}.mp4", rng)
    index_file, sidecar = libdir / ANN_FILE, libdir / ANN_META_FILE
    if damage == "garbage index":
        index_file.write_bytes(os.urandom(index_file.stat().st_size))
    elif damage == "truncated index":
        index_file.write_bytes(index_file.read_bytes()[:1000])
    elif damage == "missing index":
        index_file.unlink()
    else:
        sidecar.write_text("{not json")
    with Library.open(libdir) as lib:
        assert len(_all_ann_ids(lib)) == 40
        assert lib.last_ann_load in ("rebuilt", "disk")  # same-size garbage passes the size check...
        ids, vectors = lib.global_vectors()
        if damage != "garbage index":
            assert lib.last_ann_load == "rebuilt"
        assert lib.knn(vectors[3], 1)[0].tolist() == [ids[3]]


def test_reader_follows_a_writer(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as writer:
        _put(writer, "/v/1.mp4", rng)
        writer.commit()
        with Library.open(libdir) as reader:
            assert len(_all_ann_ids(reader)) == 1
            _put(writer, "/v/2.mp4", rng)
            assert len(_all_ann_ids(reader)) == 1  # not committed yet
            writer.commit()
            assert len(_all_ann_ids(reader)) == 2
            assert reader.last_ann_load == "caught up"  # the index it held, brought up to date in memory


def test_deleted_slots_are_reused(libdir: Path, rng: np.random.Generator) -> None:
    with Library.open(libdir, write=True, create=True) as lib:
        for i in range(100):
            _put(lib, f"/v/{i}.mp4", rng)
        lib.commit()
        for round_ in range(5):  # churn: fail half, bring them back, add new ones
            for i in range(0, 100, 2):
                lib.put_failure(f"/v/{i}.mp4", size=1, mtime=1, fingerprint=None, error="gone")
            lib.commit()
            assert len(_all_ann_ids(lib)) == 50 + round_
            for i in range(0, 100, 2):
                _put(lib, f"/v/{i}.mp4", rng)
            _put(lib, f"/v/new{round_}.mp4", rng)
            lib.commit()
        ann = lib.ann()
        assert ann is not None and ann.get_current_count() <= 110
        ids, vectors = lib.global_vectors()
        assert _all_ann_ids(lib) == set(ids.tolist())
        for i in range(0, len(ids), 7):
            assert lib.knn(vectors[i], 1)[0].tolist() == [ids[i]]


# ---------------------------------------------------------------- locking and crashes

_HOLD_LOCK = """
    import sys
    from ts2cli.store import Library
    lib = Library.open(sys.argv[1], write=True, create=True)
    print("locked", flush=True)
    sys.stdin.read()
    lib.close()
"""


def test_second_writer_is_refused_then_admitted(libdir: Path) -> None:
    child = _run_child(_HOLD_LOCK, str(libdir))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(LibraryError, match=r"Another ts2 index is running on this library \(.*my library"):
            Library.open(libdir, write=True)
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        with pytest.raises(LibraryError, match="Another ts2 index"):
            Library.open(libdir, write=True, wait=0.3)
        assert time.monotonic() - start >= 0.3
        with Library.open(libdir) as reader:  # readers never wait for the lock
            assert reader.stats().videos_ok == 0
    finally:
        child.communicate("", timeout=10)  # closing stdin lets it finish and release
    with Library.open(libdir, write=True, wait=0.0) as lib:
        assert lib.write


def test_ctrl_c_during_a_commit_waits_until_the_ann_index_follows(libdir, rng, monkeypatch) -> None:
    lib = Library.open(libdir, write=True, create=True)
    lib.check_model(MODEL)
    _put(lib, "/v/a.mp4", rng)
    apply = Library._apply_pending

    def interrupted(self: Library, gen) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after SQLite's COMMIT, before the ANN index caught up
        apply(self, gen)

    monkeypatch.setattr(Library, "_apply_pending", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lib.commit()
    assert lib._ann_gen == lib._generation() and lib._ann_count == 1  # delivered once both had changed
    monkeypatch.undo()
    lib.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deleting_the_lock_file_mid_run_does_not_let_a_second_writer_in(libdir: Path) -> None:
    child = _run_child(_HOLD_LOCK, str(libdir))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        (libdir / "lock").unlink()  # "cleaning up a stale lock file"
        with pytest.raises(LibraryError, match="Another ts2 index"):
            Library.open(libdir, write=True)
    finally:
        child.communicate("", timeout=10)
    with Library.open(libdir, write=True) as lib:  # and the holder's end lets the next one in
        assert lib.write


def test_writer_waits_for_the_lock(libdir: Path) -> None:
    child = _run_child(_HOLD_LOCK, str(libdir))
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    assert child.stdin is not None
    child.stdin.close()  # the child now exits and releases the lock, a moment later
    with Library.open(libdir, write=True, wait=10.0) as lib:
        assert lib.write
    child.wait(timeout=10)


_WRITE_FOREVER = """
    import sys
    import numpy as np
    from ts2cli.store import Library
    directory, start = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(start)
    lib = Library.open(directory, write=True, create=True)
    lib.check_model({"name": "crash-test"})
    i = start
    while True:
        for _ in range(3):
            n = 1 + i % 4
            frames = rng.standard_normal((n, 16))
            path = f"/crash/d{i % 5}/vidéo {i % 97}.mp4"  # paths repeat: updates as well as inserts
            if i % 7 == 0:
                lib.put_failure(path, size=i, mtime=float(i), fingerprint=None, error="broken")
            else:
                lib.put_video(
                    path, size=i, mtime=float(i), fingerprint=str(i), duration=1.0, width=2, height=2,
                    frame_times=[float(t) for t in range(n)], frames=frames, global_vector=frames[0],
                )
            i += 1
        if i % 11 == 0:
            lib.begin_scan([f"/crash/d{i % 5}"])
            lib.sweep_unseen([f"/crash/d{i % 5}"])
        lib.commit()
        if i % 4 == 0:
            lib.save_ann()
        print(i, flush=True)
"""


def test_kill_9_while_writing_leaves_a_consistent_library(libdir: Path) -> None:
    start = 0
    for round_ in range(4):
        child = _run_child(_WRITE_FOREVER, str(libdir), str(start))
        assert child.stdout is not None
        for commits, line in enumerate(child.stdout, start=1):
            start = int(line) + 1000
            if commits >= 15 + 5 * round_:
                break
        time.sleep(0.002 * round_)  # land somewhere else in the write cycle each round
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()
        _assert_consistent(libdir)


def _assert_consistent(libdir: Path) -> None:
    with Library.open(libdir) as lib:  # opening replays the WAL
        lib.stats()
    conn = sqlite3.connect(libdir / DB_FILE)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        ok_without = conn.execute(
            "SELECT count(*) FROM videos WHERE status = 'ok' AND id NOT IN (SELECT video_id FROM features)"
        ).fetchone()[0]
        failed_with = conn.execute(
            "SELECT count(*) FROM videos WHERE status = 'failed' AND id IN (SELECT video_id FROM features)"
        ).fetchone()[0]
        duplicates = conn.execute("SELECT count(*) - count(DISTINCT path) FROM videos").fetchone()[0]
        bad_blobs = conn.execute(
            "SELECT count(*) FROM features JOIN videos ON videos.id = video_id "
            "WHERE length(global) != 64 OR length(frames) != 32 * json_array_length(frame_times)"
        ).fetchone()[0]
        ok_ids = {r[0] for r in conn.execute("SELECT id FROM videos WHERE status = 'ok'")}
    finally:
        conn.close()
    assert (ok_without, failed_with, duplicates, bad_blobs) == (0, 0, 0, 0)
    assert ok_ids
    with Library.open(libdir) as lib:
        assert _all_ann_ids(lib) == ok_ids
        ids, vectors = lib.global_vectors()
        for i in range(0, len(ids), 5):
            assert lib.knn(vectors[i], 1)[0].tolist() == [ids[i]]


def test_a_library_folder_must_be_named_and_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(LibraryError, match="empty name"):
        Library.open("", write=True, create=True)
    (tmp_path / "file").write_text("x")
    for create in (False, True):
        with pytest.raises(LibraryError, match="must be a folder"):
            Library.open(tmp_path / "file", create=create)
