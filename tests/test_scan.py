from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ts2cli.errors import Ts2Error
from ts2cli.scan import (
    VIDEO_EXTENSIONS,
    ScanRules,
    check_globs,
    check_roots,
    file_digest,
    fingerprint,
    is_video_file,
    scan_videos,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def names(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root.resolve()).as_posix() for p in paths]


def test_extensions_are_case_insensitive_and_non_videos_ignored(tmp_path: Path) -> None:
    for name in ("a.mp4", "b.MOV", "c.Mkv", "d.webm", "e.txt", "f.jpg", "g.mp4.part", "noext"):
        touch(tmp_path / name)
    assert names(list(scan_videos([tmp_path])), tmp_path) == ["a.mp4", "b.MOV", "c.Mkv", "d.webm"]
    assert is_video_file("X.M2TS") and not is_video_file("notes.md")
    assert all(ext.startswith(".") and ext == ext.lower() for ext in VIDEO_EXTENSIONS)


def test_source_files_that_share_a_video_extension_are_not_videos(tmp_path: Path) -> None:
    from conftest import write_video

    write_video(tmp_path / "broadcast.ts", seconds=1, fps=5, width=64, height=48)  # a real MPEG-TS file
    (tmp_path / "app.ts").write_text("// " + "x" * 508 + "é\n")  # TypeScript; the first 512 bytes end mid-character
    (tmp_path / "go.mod").write_text("module example.com/videos\n\ngo 1.22\n")
    (tmp_path / "lib.mts").write_text("export default {};\n")
    (tmp_path / "camera.MTS").write_bytes(bytes([0, 0, 0, 0, 0x47, 0x40, 0x00, 0x10]) * 64)  # AVCHD, 192-byte packets
    (tmp_path / "damaged.mod").write_bytes(b"\xff\xfe not text")
    assert names(list(scan_videos([tmp_path])), tmp_path) == ["broadcast.ts", "camera.MTS", "damaged.mod"]
    assert list(scan_videos([tmp_path / "app.ts"])) == [(tmp_path / "app.ts").resolve()]  # named: tried anyway


def test_recursive_sorted_and_absolute(tmp_path: Path) -> None:
    for name in ("z.mp4", "a.mp4", "sub/b.mp4", "sub/deeper/c.mp4", "other/d.mp4"):
        touch(tmp_path / name)
    found = list(scan_videos([tmp_path]))
    assert all(p.is_absolute() for p in found)
    # Files of a folder first (sorted), then its subfolders in sorted order, depth first.
    assert names(found, tmp_path) == ["a.mp4", "z.mp4", "other/d.mp4", "sub/b.mp4", "sub/deeper/c.mp4"]


def test_hidden_files_and_folders(tmp_path: Path) -> None:
    touch(tmp_path / "seen.mp4")
    touch(tmp_path / ".hidden.mp4")
    touch(tmp_path / ".cache" / "thumb.mp4")
    assert names(list(scan_videos([tmp_path])), tmp_path) == ["seen.mp4"]
    everything = names(list(scan_videos([tmp_path], include_hidden=True)), tmp_path)
    assert everything == [".hidden.mp4", "seen.mp4", ".cache/thumb.mp4"]


def test_hidden_root_is_still_walked(tmp_path: Path) -> None:
    touch(tmp_path / ".videos" / "a.mp4")
    assert len(list(scan_videos([tmp_path / ".videos"]))) == 1


def test_exclude_by_name_and_relative_path(tmp_path: Path) -> None:
    for name in ("keep.mp4", "render.tmp.mp4", "drafts/x.mp4", "drafts/sub/y.mp4", "final/drafts.mp4"):
        touch(tmp_path / name)
    found = names(list(scan_videos([tmp_path], exclude=["*.tmp.mp4", "drafts/*"])), tmp_path)
    assert found == ["keep.mp4", "final/drafts.mp4"]
    # A bare folder name excludes the folder wherever it is.
    assert names(list(scan_videos([tmp_path], exclude=["drafts"])), tmp_path) == [
        "keep.mp4",
        "render.tmp.mp4",
        "final/drafts.mp4",
    ]


def test_an_absolute_exclude_glob_is_refused_with_the_glob_it_stands_for(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    check_globs(["drafts/*", "*.tmp.mp4"], [root])
    with pytest.raises(Ts2Error, match=r"--exclude .*/drafts/2.mp4: globs are matched inside .*'drafts/2.mp4'"):
        check_globs([str(root / "drafts" / "2.mp4")], [root])
    with pytest.raises(Ts2Error, match=r"such as 'drafts/\*'\.$"):  # outside every folder: no glob to suggest
        check_globs(["/elsewhere/x.mp4"], [root])


def test_each_root_may_have_rules_of_its_own(tmp_path: Path) -> None:
    for name in ("a/keep.mp4", "a/drafts/d.mp4", "a/.h/h.mp4", "b/keep.mp4", "b/drafts/d.mp4", "b/.h/h.mp4"):
        touch(tmp_path / name)
    (tmp_path / "b link").symlink_to(tmp_path / "b")  # a root recorded by a name that resolves elsewhere
    rules = {(tmp_path / "a").resolve(): ScanRules(("drafts/*",), True), tmp_path / "b link": ScanRules((), True)}
    found = scan_videos([tmp_path / "a", tmp_path / "b link"], exclude=("h.mp4",), rules=rules)
    assert names(list(found), tmp_path) == ["a/keep.mp4", "a/.h/h.mp4", "b/keep.mp4", "b/.h/h.mp4", "b/drafts/d.mp4"]
    (tmp_path / "c").mkdir()
    touch(tmp_path / "c" / "h.mp4")
    touch(tmp_path / "c" / "other.mp4")
    unruled = scan_videos([tmp_path / "c"], exclude=("h.mp4",), rules=rules)  # the run's own rules
    assert names(list(unruled), tmp_path) == ["c/other.mp4"]


def test_root_may_be_a_single_file(tmp_path: Path) -> None:
    video = touch(tmp_path / "one.mp4")
    touch(tmp_path / "notes.txt")
    assert list(scan_videos([video])) == [video.resolve()]
    # named on its own, a file is tried whatever its extension (decoding says whether it is a video)
    assert list(scan_videos([tmp_path / "notes.txt"])) == [(tmp_path / "notes.txt").resolve()]
    assert list(scan_videos([tmp_path / "notes.txt"], exclude=("*.txt",))) == []


def test_dedupe_across_roots_and_symlinks(tmp_path: Path) -> None:
    video = touch(tmp_path / "lib" / "a.mp4")
    (tmp_path / "lib" / "alias.mp4").symlink_to(video)
    (tmp_path / "link_to_lib").symlink_to(tmp_path / "lib", target_is_directory=True)
    found = list(scan_videos([tmp_path, tmp_path / "lib", video, tmp_path / "link_to_lib"]))
    assert found == [video.resolve()]


def test_symlink_loop_terminates(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "v.mp4")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "dangling.mp4").symlink_to(tmp_path / "missing.mp4")
    assert names(list(scan_videos([tmp_path])), tmp_path) == ["a/v.mp4"]


def test_spaces_and_non_ascii_names(tmp_path: Path) -> None:
    touch(tmp_path / "été vidéo.mp4")
    touch(tmp_path / "mes films" / "日本 語.mkv")
    found = list(scan_videos([tmp_path / "mes films", tmp_path]))
    assert names(found, tmp_path) == ["mes films/日本 語.mkv", "été vidéo.mp4"]
    assert all(p.exists() for p in found)


def test_missing_root_raises_before_yielding(tmp_path: Path) -> None:
    touch(tmp_path / "a.mp4")
    missing = tmp_path / "nope"
    with pytest.raises(Ts2Error, match=r"No such file or folder: .*nope"):
        scan_videos([tmp_path, missing])  # raised at the call, not on first iteration
    with pytest.raises(Ts2Error):
        check_roots([missing])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any folder")
def test_unreadable_folder_is_skipped(tmp_path: Path) -> None:
    touch(tmp_path / "ok.mp4")
    locked = tmp_path / "locked"
    touch(locked / "secret.mp4")
    locked.chmod(0)
    try:
        assert names(list(scan_videos([tmp_path])), tmp_path) == ["ok.mp4"]
    finally:
        locked.chmod(0o755)


def test_special_files_are_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.mp4")
    assert list(scan_videos([tmp_path])) == []


def test_fingerprint_follows_content_not_name(tmp_path: Path) -> None:
    data = os.urandom(500_000)
    a = touch(tmp_path / "a.mp4", data)
    moved = touch(tmp_path / "sub" / "renamed.mkv", data)
    assert fingerprint(a) == fingerprint(moved)
    assert len(fingerprint(a)) == 32 and int(fingerprint(a), 16) >= 0

    changed_end = touch(tmp_path / "c.mp4", data[:-1] + bytes([data[-1] ^ 1]))
    changed_middle = bytearray(data)
    changed_middle[len(data) // 2] ^= 1
    longer = touch(tmp_path / "d.mp4", data + b"\0")
    assert fingerprint(changed_end) != fingerprint(a)
    assert fingerprint(touch(tmp_path / "e.mp4", bytes(changed_middle))) != fingerprint(a)
    assert fingerprint(longer) != fingerprint(a)


def test_file_digest_sees_every_byte_and_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    import hashlib
    import os
    import time

    content = bytearray(np.random.default_rng(0).integers(0, 256, 1_000_000, dtype=np.uint8).tobytes())
    weights = touch(tmp_path / "weights.bin", bytes(content))
    assert file_digest(weights) == hashlib.sha256(content).hexdigest()
    assert file_digest(weights) == hashlib.sha256(content).hexdigest()  # the remembered one
    # a byte outside the three chunks that fingerprint() samples: same size, same fingerprint, another digest
    content[300_000] ^= 1
    before = weights.stat()
    sampled = fingerprint(weights)
    time.sleep(0.05)  # past the file system clock's tick (a few ms), so that the write moves the change time
    weights.write_bytes(bytes(content))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old modification time
    assert fingerprint(weights) == sampled
    assert file_digest(weights) == hashlib.sha256(content).hexdigest()


def test_fingerprint_small_and_empty_files(tmp_path: Path) -> None:
    assert fingerprint(touch(tmp_path / "a", b"abc")) != fingerprint(touch(tmp_path / "b", b"abd"))
    assert fingerprint(touch(tmp_path / "empty", b"")) == fingerprint(touch(tmp_path / "empty2", b""))
