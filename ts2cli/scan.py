"""Find the video files under the folders (or files) a user names, and fingerprint them.

Walking is by file extension (and, for extensions that source files share, a look at the first bytes); whether
a file really decodes is ts2cli.decode's business. Symlinked folders are followed, but every real folder is
entered at most once per root, so symlink loops terminate.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ts2cli.durable import write_text_atomically
from ts2cli.errors import Ts2Error

# Lower-case, with the leading dot, so ``path.suffix.lower() in VIDEO_EXTENSIONS`` works directly.
VIDEO_EXTENSIONS = frozenset(
    {
        ".3g2",
        ".3gp",
        ".asf",
        ".avi",
        ".divx",
        ".dv",
        ".f4v",
        ".flv",
        ".m1v",
        ".m2t",
        ".m2ts",
        ".m2v",
        ".m4v",
        ".mkv",
        ".mod",
        ".mov",
        ".mp4",
        ".mpe",
        ".mpeg",
        ".mpg",
        ".mts",
        ".mxf",
        ".nut",
        ".ogm",
        ".ogv",
        ".qt",
        ".rm",
        ".rmvb",
        ".tod",
        ".ts",
        ".vob",
        ".webm",
        ".wmv",
        ".wtv",
    }
)

FINGERPRINT_CHUNK = 64 * 1024

SHARED_EXTENSIONS = frozenset({".ts", ".mts", ".mod"})
"""Video extensions that source files use too (TypeScript, Go modules): in a folder, such a file counts as a
video only if it does not start like text, so that indexing a home folder does not fail on every .ts file."""
_SNIFF_BYTES = 512


@dataclass(frozen=True)
class ScanRules:
    """Which files under a root count: ``ts2 index``'s ``--exclude`` globs and ``--hidden``."""

    exclude: tuple[str, ...] = ()
    include_hidden: bool = False


def is_video_file(path: Path | str) -> bool:
    """True when the name has a video extension (case-insensitive); the content is not checked."""
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def check_roots(roots: Sequence[Path | str]) -> list[Path]:
    """Absolute, resolved roots; raises Ts2Error naming the first one that does not exist."""
    checked = []
    for root in roots:
        if not os.fspath(root):  # Path("") is the current folder: an unset variable in `ts2 index "$DIR"`
            raise Ts2Error("An empty name was given as a folder to index; name one, e.g. ts2 index ~/Videos.")
        path = Path(root).expanduser()
        if not path.exists():  # also catches a symlink whose target is gone
            raise Ts2Error(f"No such file or folder: {root}")
        if not (path.is_dir() or path.is_file()):  # reading a FIFO or a device would wait forever
            raise Ts2Error(f"{root} is neither a folder nor a file.")
        checked.append(path.resolve())
    return checked


def check_globs(globs: Sequence[str], roots: Sequence[Path]) -> None:
    """Refuse an ``--exclude`` glob that is an absolute path: globs are matched inside each root, so it would
    silently match nothing. The message gives the glob it stands for when it lies in one of ``roots``."""
    for glob in globs:
        if not os.path.isabs(glob):
            continue
        place = Path(os.path.abspath(glob))
        inside = [root for root in roots if place.is_relative_to(root) and place != root]
        instead = f" (here: --exclude '{place.relative_to(inside[0])}')" if inside else ""
        raise Ts2Error(
            f"--exclude {glob}: globs are matched inside the folders to index, by name or by path from the folder, "
            f"such as 'drafts/*'{instead}."
        )


def scan_videos(
    roots: Sequence[Path | str],
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    linked: dict[Path, dict[Path, Path]] | None = None,
    *,
    rules: Mapping[Path, ScanRules] | None = None,
) -> Iterator[Path]:
    """Video files under ``roots``, each once, as absolute resolved paths, in sorted order per root.

    A root may be a folder (walked recursively) or a single file (yielded whatever its extension).
    ``exclude`` holds glob patterns matched against each file or folder name and against its path relative
    to the root, so both ``'*.tmp.mp4'`` and ``'drafts/*'`` work; an excluded folder is not entered.
    Hidden names (leading '.') are skipped unless ``include_hidden``. ``rules`` gives a (resolved) root rules of
    its own instead of ``exclude`` and ``include_hidden``. Unreadable folders are skipped.
    ``linked``, when given, receives per (resolved) root its symlinks that lead outside it, each with the real
    folder or file it leads to.
    Missing roots raise Ts2Error at the call, before anything is yielded.
    """
    default, rules = ScanRules(tuple(exclude), include_hidden), rules or {}
    checked = check_roots(roots)
    # A root's rules are looked up by the name given too: a recorded root that is a symlink now resolves elsewhere.
    pairs = zip(roots, checked, strict=True)
    ruled = [(root, rules.get(Path(given), rules.get(root, default))) for given, root in pairs]
    return _walk_roots(ruled, linked)


def _walk_roots(roots: list[tuple[Path, ScanRules]], linked: dict[Path, dict[Path, Path]] | None) -> Iterator[Path]:
    seen_files: set[Path] = set()
    for root, rules in roots:
        outside = linked.setdefault(root, {}) if linked is not None else None
        if root.is_dir():
            # (st_dev, st_ino) of the real folders walked, per root: a folder two roots reach is walked for both,
            # so that each root learns where the links inside it lead (files are yielded once all the same).
            seen_dirs: set[tuple[int, int]] = set()
            candidates: Iterator[Path] = _walk_dir(root, rules.exclude, rules.include_hidden, seen_dirs, outside)
        elif not _excluded(root.name, root.name, rules.exclude):
            candidates = iter([root])  # named on its own, a file is tried whatever its extension
        else:
            continue
        for path in candidates:
            real = path.resolve()
            if real not in seen_files:
                seen_files.add(real)
                yield real


def _walk_dir(
    root: Path,
    exclude: tuple[str, ...],
    include_hidden: bool,
    seen_dirs: set[tuple[int, int]],
    outside: dict[Path, Path] | None = None,
) -> Iterator[Path]:
    # Explicit stack instead of recursion: deep trees must not hit Python's recursion limit.
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            info = folder.stat()
        except OSError:
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen_dirs:
            continue  # a symlink loop, or a folder reachable twice
        seen_dirs.add(key)
        entries = _list_dir(folder)
        subfolders = []
        for name, is_dir, is_link in entries:
            if not include_hidden and name.startswith("."):
                continue
            rel = f"{rel_folder}{name}"
            if is_dir:
                if not _excluded(name, rel, exclude, folder=True):
                    subfolders.append((folder / name, rel + "/"))
                    if is_link:
                        _note_outside(folder / name, root, outside)
            elif is_video_file(name) and not _excluded(name, rel, exclude) and not _source_file(folder / name):
                if is_link:
                    _note_outside(folder / name, root, outside)
                yield folder / name
        # Reversed so the stack pops them in sorted order; files of a folder come before its subfolders.
        stack.extend(reversed(subfolders))


def _source_file(path: Path) -> bool:
    """Whether a file with an extension in ``SHARED_EXTENSIONS`` is text (no NUL byte, valid UTF-8): video
    containers are binary from their first bytes (MPEG-TS's 0x47 sync byte, MPEG-PS's 00 00 01 BA)."""
    if path.suffix.lower() not in SHARED_EXTENSIONS:
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(_SNIFF_BYTES)
    except OSError:
        return False  # decoding will say what is wrong with it
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is no error
    except UnicodeDecodeError:
        return False
    return True


def _note_outside(link: Path, root: Path, outside: dict[Path, Path] | None) -> None:
    """Note in ``outside`` where ``link`` (a folder or a file) really is, when that is not under ``root``."""
    if outside is not None:
        real = Path(os.path.realpath(link))
        if not real.is_relative_to(root):
            outside[link] = real


def _list_dir(folder: Path) -> list[tuple[str, bool, bool]]:
    """Sorted (name, is_folder, is_symlink) of regular files and folders, following symlinks; [] if unreadable."""
    entries = []
    try:
        with os.scandir(folder) as iterator:
            for entry in iterator:
                try:
                    if entry.is_dir():
                        entries.append((entry.name, True, entry.is_symlink()))
                    elif entry.is_file():  # skips FIFOs, sockets and broken links, which would hang or fail
                        entries.append((entry.name, False, entry.is_symlink()))
                except OSError:
                    continue
    except OSError:
        return []  # permission denied, vanished while walking, ...: not worth aborting a scan for
    return sorted(entries)


def _excluded(name: str, rel: str, patterns: tuple[str, ...], folder: bool = False) -> bool:
    candidates = [name, rel]
    if folder:
        candidates.append(rel + "/")  # lets 'drafts/*' and 'drafts/' prune the whole folder
    return any(fnmatch.fnmatch(c, p) for p in patterns for c in candidates)


def fingerprint(path: Path | str) -> str:
    """Content fingerprint that survives moves and renames, reading at most three 64 KiB chunks.

    blake2b over the file size and the chunks at the start, middle and end. Files that differ only
    outside those chunks (and have the same size) collide; for video files that does not happen in practice
    because containers rewrite headers and indexes whenever content changes.
    """
    return fingerprint_and_stat(path)[0]


def fingerprint_and_stat(path: Path | str) -> tuple[str, os.stat_result]:
    """``fingerprint`` with the file's stat as it was read: a file still being written has the size it was
    fingerprinted at, not the one a stat a moment earlier saw."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
        if size <= 3 * FINGERPRINT_CHUNK:
            digest.update(f.read(size))
        else:
            for offset in (0, (size - FINGERPRINT_CHUNK) // 2, size - FINGERPRINT_CHUNK):
                f.seek(offset)
                digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest(), stat


def file_digest(path: Path | str) -> str:
    """SHA-256 (hex) of a whole file, for files in which every byte matters (model weights), where a sampled
    ``fingerprint`` could take a fine-tuned copy for the original.

    Hashing ViT-B-32's 600 MB takes about a second, so a digest is remembered in the user cache folder under the
    file's path, device, inode, size, modification and change times (a write changes the change time, which no
    program can set back) and read again while none of them changes.
    """
    path = Path(path).expanduser().resolve()
    before = path.stat()
    entry = _digest_cache_folder() / _stat_key(path, before)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        known = entry.read_text().strip()
        if len(known) == 64:
            return known
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if _stat_key(path, path.stat()) == entry.name:  # not changed while it was read
        with contextlib.suppress(OSError):
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(entry, digest)
    return digest


def _digest_cache_folder() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("ts2") / "digests"


def _stat_key(path: Path, info: os.stat_result) -> str:
    fields = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return hashlib.blake2b("\0".join(map(str, fields)).encode(), digest_size=16).hexdigest()
