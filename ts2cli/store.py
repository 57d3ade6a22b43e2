"""The on-disk video library.

A library is one directory. ``library.sqlite3`` is the source of truth (videos, their per-frame and global
features, the model they were computed with). ``ann.hnsw`` + ``ann.json`` hold an hnswlib index over the
global vectors; it is only a cache, tagged with the SQLite *generation* it was built from. When the tag is older
than SQLite's, the vectors the change log names are applied to it; when the log cannot vouch for the tag (or the
files are damaged) it is rebuilt from SQLite. A kill at any moment therefore costs at most a rebuild.
The format is described for humans in ``docs/library-format.md``.

Locking: one writer at a time (``flock`` on ``DIR/lock`` and on ``DIR``, held for the writer's whole life);
readers take no lock and rely on SQLite WAL snapshots. ``ann.lock`` is held only for the instant the two ANN
files are read or replaced, so a reader never pairs an index file with another save's sidecar.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import hnswlib
import numpy as np
import numpy.typing as npt
import platformdirs

from ts2cli import ann_index
from ts2cli.ann_index import Generation
from ts2cli.errors import LibraryError, one_line
from ts2cli.model_record import canonical_json, model_summary, same_model
from ts2cli.scan import ScanRules
from ts2cli.stopping import stop_signals_held

SCHEMA_VERSION = 1

DB_FILE = "library.sqlite3"
LOCK_FILE = "lock"
REBUILD_DIR = "rebuild"
"""Inside a library: the library a ``ts2 index --rebuild`` builds, until it takes the old one's place."""

_SQL_CHUNK = 900  # stays under SQLite's historic 999 bound-parameter limit
_REBUILD_CHUNK = 8192
_MMAP_BYTES = 1 << 30
_CACHE_KIB = 64 * 1024
_ERROR_MAX_CHARS = 500

AnnSource = Literal["disk", "caught up", "rebuilt", "empty"]


def default_library_dir() -> Path:
    """``$TS2_HOME`` when set, else the per-user data directory (e.g. ``~/.local/share/ts2/library``)."""
    env = os.environ.get("TS2_HOME")
    if env:
        return Path(env).expanduser()
    return platformdirs.user_data_path("ts2") / "library"


@dataclass(frozen=True, slots=True)
class VideoRow:
    id: int
    path: str
    size: int | None
    mtime: float | None
    fingerprint: str | None
    duration: float | None
    width: int | None
    height: int | None
    frame_times: list[float]
    status: Literal["ok", "failed"]
    error: str | None
    indexed_at: float | None
    seen: bool


@dataclass(frozen=True, slots=True)
class LibraryStats:
    directory: Path
    videos_ok: int
    videos_failed: int
    failures: list[tuple[str, str]]  # (path, one-line reason), sorted by path
    bytes_on_disk: int
    model: dict[str, Any] | None
    dim: int | None
    schema_version: int
    generation: int
    video_seconds: float = 0.0
    """Total length of the indexed (``ok``) videos."""
    last_indexed: float | None = None
    """When a video row was last written (seconds since the epoch); None for an empty library."""
    folders: list[tuple[str, int]] = field(default_factory=list)
    """The roots ``ts2 index`` has scanned (folders or single files), sorted, with their indexed videos."""
    folder_rules: dict[str, ScanRules | None] = field(default_factory=dict)
    """Per root of ``folders``, the rules it was last scanned with (``Library.folder_rules``)."""
    rebuild_unfinished: bool = False
    """Whether a ``ts2 index --rebuild`` stopped before it took the library's place (``REBUILD_DIR``)."""


@dataclass(frozen=True, slots=True)
class _VectorChanges:
    current: Generation
    vectors: dict[int, np.ndarray | None]
    """Per video whose vector changed since the generation asked about: its vector now, or None if it has none."""
    live: int | None
    """How many videos have a vector at ``current`` (None when nothing changed)."""


_VIDEO_COLUMNS = (
    "id, path, size, mtime, fingerprint, duration, width, height, frame_times, status, error, indexed_at, seen"
)

_SCHEMA_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # AUTOINCREMENT: an id is never handed out twice, so an id a reader got from the ANN index just
    # before a writer deleted that video can only go missing, never point at a different video.
    """CREATE TABLE videos (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT UNIQUE NOT NULL,
        size INTEGER,
        mtime REAL,
        fingerprint TEXT,
        duration REAL,
        width INTEGER,
        height INTEGER,
        frame_times TEXT,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error TEXT,
        indexed_at REAL,
        seen INTEGER NOT NULL DEFAULT 1
    )""",
    "CREATE INDEX videos_fingerprint ON videos (fingerprint, size)",
    # `global` comes before `frames`: the small vector then sits at the start of the record and reading
    # it (ANN rebuild) does not walk the overflow pages that hold the frames.
    """CREATE TABLE features (
        video_id INTEGER PRIMARY KEY REFERENCES videos (id) ON DELETE CASCADE,
        global BLOB NOT NULL,
        frames BLOB NOT NULL
    )""",
)

# The change log that lets a saved ANN index be brought up to date instead of rebuilt. Not part of _SCHEMA_V1's
# version: a ts2 that predates it neither writes nor reads it, and the log proves itself complete (one row per
# generation since the one it starts from) before it is used, so such a ts2 writing the library only costs a rebuild.
_CHANGE_LOG = (
    # Every generation since the oldest one an ANN index file may still be at, with its token.
    "CREATE TABLE IF NOT EXISTS generations (number INTEGER PRIMARY KEY, token TEXT NOT NULL)",
    # The last generation at which each video's vector was added, replaced or removed (no foreign key: a
    # removed video's row says that it went away).
    "CREATE TABLE IF NOT EXISTS vector_changes (video_id INTEGER PRIMARY KEY, generation INTEGER NOT NULL)",
)

# What a finished --rebuild brings over besides the videos (``Library.take_over``).
_TAKEN_OVER = ("model", "model_request", "linked_folders", "link_paths", "folder_rules")

# MIGRATIONS[v] upgrades a schema-v database to v+1 inside the open transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}


class Library:
    """An open library. Use :meth:`open`; close with :meth:`close` or a ``with`` block."""

    def __init__(self, directory: Path, conn: sqlite3.Connection, *, write: bool, lock_fds: tuple[int, ...]) -> None:
        self.directory = directory
        self.write = write
        self._conn = conn
        self._lock_fds = lock_fds
        self._closed = False
        # In-memory ANN state. It always mirrors the last *committed* generation; changes made in the open
        # transaction wait in _pending (id -> new unit vector, or None for "remove") until commit().
        self._ann: hnswlib.Index | None = None
        self._ann_gen: Generation | None = None  # None = not loaded
        self._ann_count = 0  # live vectors
        self._ann_dirty = False  # in memory differs from the files
        self._pending: dict[int, np.ndarray | None] = {}
        self._pending_reset = False
        self._has_change_log = False
        self.last_ann_load: AnnSource | None = None  # how ann() last obtained the index (diagnostics)

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str] | None = None,
        *,
        write: bool = False,
        create: bool = False,
        wait: float = 0.0,
        on_wait: Callable[[], None] | None = None,
    ) -> Library:
        """Open the library in ``directory`` (default: :func:`default_library_dir`).

        ``write`` takes the writer lock, waiting up to ``wait`` seconds for another writer to finish (``on_wait`` is
        called once if it has to); ``create`` makes the directory and database when missing.
        """
        if directory is not None and not os.fspath(directory):  # Path("") would be the current folder
            raise LibraryError("An empty name was given as the library folder (--library).")
        directory = _library_path(directory)
        if directory.exists() and not directory.is_dir():
            raise LibraryError(f"The library must be a folder; {directory} is a file.")
        db_path = directory / DB_FILE
        if not create and not db_path.is_file():
            raise LibraryError(f"No library at {directory}; run `ts2 index FOLDER` first.")
        if create:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LibraryError(f"Cannot create the library folder {directory}: {exc.strerror}.") from exc
        lock_fds = _acquire_writer_lock(directory, wait, on_wait) if write else ()
        conn = None
        try:
            conn = _connect(db_path, create=create, write=write)
            library = cls(directory, conn, write=write, lock_fds=lock_fds)
            library._prepare_schema(create=create)
            return library
        except BaseException:
            if conn is not None:
                conn.close()
            _close_all(lock_fds)
            raise

    @staticmethod
    def exists(directory: str | os.PathLike[str] | None = None) -> bool:
        """Whether there is a library in ``directory`` (default: :func:`default_library_dir`)."""
        return bool(directory is None or os.fspath(directory)) and (_library_path(directory) / DB_FILE).is_file()

    def close(self) -> None:
        """Commit what is buffered, save the ANN index if it changed, release the writer lock.

        Committing here is safe even when closing because of an exception: every put_* call is
        all-or-nothing on its own, so only whole videos are ever committed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self.write:
                self.commit()
                if self._ann_dirty:
                    self.save_ann()
        finally:
            self._conn.close()
            _close_all(self._lock_fds)
            self._lock_fds = ()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Closing after an error (a full disk, say) can fail the same way: the first error is the one to tell.
        with contextlib.suppress(OSError, sqlite3.Error, LibraryError):
            self.close()

    # ------------------------------------------------------------------ schema

    def _prepare_schema(self, *, create: bool) -> None:
        version = self._schema_version()
        if version is None:
            if not create:
                raise LibraryError(f"No library at {self.directory}; run `ts2 index FOLDER` first.")
            self._create_schema()
        elif version > SCHEMA_VERSION:
            raise LibraryError(
                f"The library at {self.directory} was written by a newer ts2 (library format {version}, this "
                f"ts2 understands up to {SCHEMA_VERSION}); upgrade ts2 (pip install -U ts2cli) to use it."
            )
        elif version < SCHEMA_VERSION:
            self._migrate()
        if self.write:
            self._start_change_log()
        self._has_change_log = self._table_exists("vector_changes")

    def _schema_version(self) -> int | None:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise _db_error(self.directory, exc) from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database" and friends
            raise _db_error(self.directory, exc) from exc
        if row is None:
            return None
        try:
            return int(row[0])
        except ValueError:
            raise LibraryError(f"The library at {self.directory} is damaged (bad schema_version {row[0]!r}).") from None

    def _create_schema(self) -> None:
        # journal_mode cannot change inside a transaction, and it is a property of the file, set once.
        self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
        with self._immediate_transaction():
            if self._schema_version() is None:  # another process may have won the race
                for statement in _SCHEMA_V1:
                    self._conn.execute(statement)
                created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
                for key, value in (
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created_at", created),
                    ("generation", "0"),
                    ("generation_id", secrets.token_hex(8)),
                ):
                    self._set_meta(key, value)

    def _start_change_log(self) -> None:
        """Create the change log in a library made before it existed; it starts at the current generation."""
        if self._table_exists("vector_changes"):
            return
        with self._immediate_transaction():
            if not self._table_exists("vector_changes"):
                for statement in _CHANGE_LOG:
                    self._conn.execute(statement)
                current = self._generation()
                row = (current.number, current.token)
                self._conn.execute("INSERT INTO generations (number, token) VALUES (?, ?)", row)

    def _table_exists(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._conn.execute(query, (name,)).fetchone() is not None

    def _migrate(self) -> None:
        with self._immediate_transaction():
            version = self._schema_version() or SCHEMA_VERSION
            for from_version in range(version, SCHEMA_VERSION):
                MIGRATIONS[from_version](self._conn)
            self._set_meta("schema_version", str(SCHEMA_VERSION))

    @contextlib.contextmanager
    def _immediate_transaction(self) -> Iterator[None]:
        """Run the block in a write transaction of its own, committed at its end and rolled back on any error; inside
        an open transaction, as part of that one."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: str) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _generation(self) -> Generation:
        rows = dict(self._conn.execute("SELECT key, value FROM meta WHERE key IN ('generation', 'generation_id')"))
        return Generation(int(rows.get("generation", 0)), rows.get("generation_id", ""))

    # ------------------------------------------------------------------ model configuration

    def model_config(self) -> dict[str, Any] | None:
        raw = self._meta("model")
        if raw is None:
            return None
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            config = None
        if not isinstance(config, dict):
            raise LibraryError(
                f"The library at {self.directory} has a damaged model record; re-index it with --rebuild."
            )
        return config

    def set_model_config(self, config: dict[str, Any]) -> None:
        with self._write_step():
            self._set_meta("model", canonical_json(config))

    def loaded_from(self) -> dict[str, Any] | None:
        """The model request (``indexer.model_request``) that the library's model record was last loaded from, or
        None if the record has changed since (a rebuild, a move of its weights file) or none was remembered."""
        try:
            remembered = json.loads(self._meta("model_request") or "null")
        except ValueError:
            return None
        current = self._meta("model")
        if not isinstance(remembered, dict) or current is None or remembered.get("model") != current:
            return None
        return remembered.get("request")

    def remember_loaded_from(self, request: dict[str, Any]) -> None:
        """Remember that the model record as it stands now came from ``request`` (see ``loaded_from``)."""
        with self._write_step():
            self._set_meta("model_request", json.dumps({"request": request, "model": self._meta("model")}))

    def check_model(self, config: dict[str, Any]) -> None:
        """Make sure the library's vectors come from ``config``'s model.

        A new library adopts ``config``. A different stored model is an error (``clear`` empties the library and
        adopts another model).
        """
        stored = self.model_config()
        if stored is not None and same_model(stored, config):
            if self.write and canonical_json(stored) != canonical_json(config):
                self.set_model_config(config)  # same model, loaded from another place: remember the new one
            return
        if stored is None:
            if self.write:
                self.set_model_config(config)
            return
        raise LibraryError(
            f"The library at {self.directory} was built with model {model_summary(stored)}, not "
            f"{model_summary(config)}; run `ts2 index --rebuild` to re-index everything with the new "
            "model, or use another --library."
        )

    def clear(self, config: dict[str, Any]) -> None:
        """Forget every video and vector and adopt ``config`` (a stopped ``--rebuild`` begun with another model)."""
        with self._write_step():
            self._conn.execute("DELETE FROM features")
            self._conn.execute("DELETE FROM videos")
            # no root holds a video now; a scan records its root (and its rules) again
            self._set_meta("linked_folders", "{}")
            self._set_meta("link_paths", "{}")
            self._set_meta("folder_rules", "{}")
            self._set_meta("model", canonical_json(config))
            self._pending.clear()
            self._pending_reset = True

    def take_over(self, staged: Path) -> None:
        """Replace this library's videos, vectors, model and folder records with those of the library at ``staged``
        (a finished ``--rebuild``, closed), in one transaction: a search sees the old library or the new one, never
        a mix of the two models' vectors. The staged ids are shifted past every id this library has handed out, so
        that an id an older search still holds never names another video."""
        self.commit()
        self._conn.execute("ATTACH DATABASE ? AS staged", (f"{(staged / DB_FILE).as_uri()}?mode=ro",))
        try:
            with self._write_step():
                (shift,) = self._conn.execute(
                    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'videos'), 0)"
                ).fetchone()
                self._conn.execute("DELETE FROM features")
                self._conn.execute("DELETE FROM videos")
                columns = _VIDEO_COLUMNS.removeprefix("id, ")
                self._conn.execute(
                    f"INSERT INTO videos (id, {columns}) SELECT id + ?, {columns} FROM staged.videos", (shift,)
                )
                self._conn.execute(
                    "INSERT INTO features (video_id, global, frames) "
                    "SELECT video_id + ?, global, frames FROM staged.features",
                    (shift,),
                )
                self._conn.execute(f"DELETE FROM meta WHERE key IN ({_marks(len(_TAKEN_OVER))})", _TAKEN_OVER)
                self._conn.execute(
                    f"INSERT INTO meta (key, value) SELECT key, value FROM staged.meta "
                    f"WHERE key IN ({_marks(len(_TAKEN_OVER))})",
                    _TAKEN_OVER,
                )
                self._pending.clear()
                self._pending_reset = True  # no saved ANN index can be brought up to date across this
            self.commit()
        finally:
            self.rollback()
            self._conn.execute("DETACH DATABASE staged")
        self._ann, self._ann_gen, self._ann_count = None, None, 0  # built from the new vectors when next needed

    # ------------------------------------------------------------------ scanning (mark and sweep)

    def linked_areas(self, roots: Sequence[Path]) -> tuple[list[Path], list[Path]]:
        """What a scan of ``roots`` answers for besides the roots: the folders (and files) outside them that
        symlinks under them led to last time (``remember_links``), so that a video found through a link that is
        gone now, or whose file is gone, is removed too; and the places that other indexed roots, not scanned now,
        cover (those roots and where their own links led), whose videos such a sweep must leave alone."""
        links = self._links()
        linked = sorted({Path(place) for root in roots for place in links.get(str(root), [])} - set(roots))
        others = [Path(known) for known in links if Path(known) not in roots]
        protected = others + [Path(place) for known in others for place in links.get(str(known), [])]
        return linked, protected

    def remember_links(self, linked: dict[Path, dict[Path, Path]], *, keep_old: bool = False) -> None:
        """Record, per scanned root, its symlinks that lead outside it and where they lead (``{link: place}``):
        the places are what a scan of the root answers for (see ``linked_areas``), the links what ``ids_under``
        follows. ``keep_old`` adds to what was recorded, so that a run stopped before its sweep forgets no place
        it has yet to sweep."""
        links, paths = self._links(), self._link_paths()
        for root, found in linked.items():
            # a name that is not UTF-8 leads to no video the library could hold: nothing to sweep or follow there
            named = {str(link): str(place) for link, place in found.items() if storable_path(f"{link}{place}")}
            kept = set(links.get(str(root), [])) if keep_old else set()
            links[str(root)] = sorted(kept | set(named.values()))
            paths[str(root)] = {**paths.get(str(root), {}), **named} if keep_old else named
        with self._write_step():
            self._set_json_meta("linked_folders", links)
            self._set_json_meta("link_paths", paths)

    def linked_places(self) -> dict[str, list[str]]:
        """Per recorded root, the places outside it that its symlinks led to (``remember_links``)."""
        return self._links()

    def _links(self) -> dict[str, list[str]]:
        # Damaged: nothing outside the roots is swept until each root's next scan records its links again. Names
        # that are not UTF-8 (kept by an earlier ts2) are left out: every query on them would refuse them.
        links = self._json_meta("linked_folders")
        return {
            root: [place for place in places if storable_path(place)]
            for root, places in links.items()
            if isinstance(places, list)
        }

    def _link_paths(self) -> dict[str, dict[str, str]]:
        # Damaged: ``--in`` follows no link until the next scan records them again.
        return {root: found for root, found in self._json_meta("link_paths").items() if isinstance(found, dict)}

    def places_linked_under(self, folder: Path) -> list[Path]:
        """Where the recorded symlinks at or under ``folder`` lead (``remember_links``). ``folder`` is taken as
        given and resolved, and each link by its recorded path and with its folder resolved, so that both the way
        the scan walked and the real place find it."""
        given, real = Path(os.path.abspath(folder)), Path(os.path.realpath(folder))
        places = set()
        for found in self._link_paths().values():
            for link, place in found.items():
                link_path = Path(link)
                seen_as = (link_path, Path(os.path.realpath(link_path.parent)) / link_path.name)
                if any(way.is_relative_to(within) for way in seen_as for within in (given, real)):
                    places.add(Path(place))
        return sorted(places)

    def count_under(
        self, place: str | os.PathLike[str], *, indexed_only: bool = False, also: Sequence[str | os.PathLike[str]] = ()
    ) -> int:
        """How many rows (videos and failed files, or only the indexed videos) lie at or under ``place``, or under
        one of the places ``also`` names (each row counted once)."""
        where, args = _under_any([place, *also])
        status = "status = 'ok' AND " if indexed_only else ""
        return int(self._conn.execute(f"SELECT COUNT(*) FROM videos WHERE {status}({where})", args).fetchone()[0])

    def forget_roots(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        """Take ``roots`` off the folders the library covers: their links (see ``remember_links``) and rules."""
        links, paths, rules = self._links(), self._link_paths(), self._rules()
        for root in roots:
            links.pop(os.fspath(root), None)
            paths.pop(os.fspath(root), None)
            rules.pop(os.fspath(root), None)
        with self._write_step():
            self._set_json_meta("linked_folders", links)
            self._set_json_meta("link_paths", paths)
            self._set_json_meta("folder_rules", rules)

    def remember_rules(self, rules: dict[Path, ScanRules]) -> None:
        """Record which files each scanned root counts, so that a ``ts2 index`` naming no folder scans it alike."""
        recorded = self._rules()
        for root, rule in rules.items():
            recorded[str(root)] = {"exclude": list(rule.exclude), "hidden": rule.include_hidden}
        with self._write_step():
            self._set_json_meta("folder_rules", recorded)

    def folder_rules(self) -> dict[Path, ScanRules | None]:
        """The roots the library covers (as ``stats().folders``), sorted, each with the rules it was last scanned
        with; None for a root scanned by a ts2 that did not record them."""
        recorded = self._rules()
        return {Path(root): _rules_from_json(recorded.get(root)) for root in sorted(self._links())}

    def _rules(self) -> dict[str, Any]:
        return self._json_meta("folder_rules")  # damaged: every root is skipped by a run naming none

    def _json_meta(self, key: str) -> dict[str, Any]:
        """A meta value that holds a JSON object; {} when it is missing or damaged."""
        try:
            value = json.loads(self._meta(key) or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def _set_json_meta(self, key: str, value: dict[str, Any]) -> None:
        self._set_meta(key, json.dumps(value, sort_keys=True))

    def begin_scan(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        """Mark every video under ``roots`` unseen; the scan then marks what it finds (mark_seen/put_*)."""
        with self._write_step():
            for root in roots:
                where, args = _under_root(root)
                self._conn.execute(f"UPDATE videos SET seen = 0 WHERE {where}", args)

    def mark_seen(self, video_id: int) -> None:
        with self._write_step():
            self._conn.execute("UPDATE videos SET seen = 1 WHERE id = ?", (video_id,))

    def keep_present(self, places: Sequence[str | os.PathLike[str]]) -> None:
        """Mark seen the unseen rows under ``places`` whose files are still there, so that a sweep leaves them."""
        present = []
        for place in places:
            where, args = _under_root(place)
            rows = self._conn.execute(f"SELECT id, path FROM videos WHERE seen = 0 AND ({where})", args).fetchall()
            present += [(video_id,) for video_id, path in rows if os.path.lexists(path)]
        with self._write_step():
            self._conn.executemany("UPDATE videos SET seen = 1 WHERE id = ?", present)

    def sweep_unseen(
        self, roots: Sequence[str | os.PathLike[str]], *, spare: Sequence[str | os.PathLike[str]] = ()
    ) -> list[str]:
        """Delete the videos under ``roots`` that the scan did not see, except those under ``spare``; return their
        paths, sorted."""
        doomed: list[tuple[int, str, bool]] = []
        spared = [_under_root(place) for place in spare]
        for root in roots:
            under, args = _under_root(root)
            where = " AND ".join([f"({under})", *(f"NOT ({condition})" for condition, _ in spared)])
            args = [*args, *(arg for _, condition_args in spared for arg in condition_args)]
            doomed += self._conn.execute(
                f"SELECT id, path, EXISTS (SELECT 1 FROM features WHERE video_id = videos.id) "
                f"FROM videos WHERE seen = 0 AND ({where})",
                args,
            ).fetchall()
        if not doomed:
            return []
        unique = {video_id: (path, had) for video_id, path, had in doomed}  # roots may overlap
        if any(had for _, had in unique.values()):
            self._ensure_ann_for_write()
        with self._write_step():
            ids = list(unique)
            for chunk in _chunks(ids):
                self._conn.execute(f"DELETE FROM videos WHERE id IN ({_marks(len(chunk))})", chunk)
            for video_id, (_, had) in unique.items():
                if had:
                    self._pending[video_id] = None
        return sorted(path for path, _ in unique.values())

    # ------------------------------------------------------------------ lookups

    def get_by_path(self, path: str | os.PathLike[str]) -> VideoRow | None:
        row = self._conn.execute(f"SELECT {_VIDEO_COLUMNS} FROM videos WHERE path = ?", (_norm_path(path),)).fetchone()
        return None if row is None else _video_row(row)

    def ids_under(self, folder: str | os.PathLike[str]) -> list[int]:
        """Ids of the indexed (status 'ok') videos inside ``folder``: resolved first, as indexed paths are (a
        symlink to a folder finds what was indexed through it), and inside the places that symlinks under it
        led to when it was scanned."""
        folder = Path(folder).expanduser()
        where, args = _under_any([folder.resolve(), *self.places_linked_under(folder)])
        rows = self._conn.execute(f"SELECT id FROM videos WHERE status = 'ok' AND ({where}) ORDER BY id", args)
        return [row[0] for row in rows]

    def paths(self) -> set[str]:
        """Every stored path, of videos and failed files."""
        return {row[0] for row in self._conn.execute("SELECT path FROM videos")}

    def writer_running(self) -> bool:
        """Whether another process holds the library's writer lock now (a ts2 index or forget is running)."""
        return not self.write and _writer_holds(self.directory)

    def count_ok(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM videos WHERE status = 'ok'").fetchone()[0]

    def find_by_fingerprint(self, fingerprint: str, size: int) -> list[VideoRow]:
        rows = self._conn.execute(
            f"SELECT {_VIDEO_COLUMNS} FROM videos WHERE fingerprint = ? AND size = ? ORDER BY id",
            (fingerprint, size),
        ).fetchall()
        return [_video_row(row) for row in rows]

    def videos(self, ids: Sequence[int]) -> dict[int, VideoRow]:
        """Rows for ``ids``; ids that no longer exist are simply absent from the result."""
        out: dict[int, VideoRow] = {}
        with self._read_snapshot():
            for chunk in _chunks(list(ids)):
                for row in self._conn.execute(
                    f"SELECT {_VIDEO_COLUMNS} FROM videos WHERE id IN ({_marks(len(chunk))})", chunk
                ):
                    out[row[0]] = _video_row(row)
        return out

    # ------------------------------------------------------------------ writes

    def move(self, video_id: int, new_path: str | os.PathLike[str], mtime: float) -> None:
        """A file was renamed or moved: keep its id and features, change its path.

        Whatever the library had at ``new_path`` before is replaced (deleted).
        """
        path = _norm_path(new_path)
        occupant = self._conn.execute(
            "SELECT id, EXISTS (SELECT 1 FROM features WHERE video_id = videos.id) FROM videos WHERE path = ?",
            (path,),
        ).fetchone()
        evict = occupant is not None and occupant[0] != video_id
        if evict and occupant[1]:
            self._ensure_ann_for_write()
        with self._write_step():
            if evict:
                self._conn.execute("DELETE FROM videos WHERE id = ?", (occupant[0],))
            cursor = self._conn.execute(
                "UPDATE videos SET path = ?, mtime = ?, seen = 1 WHERE id = ?", (path, mtime, video_id)
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no video with id {video_id}")
            if evict and occupant[1]:
                self._pending[occupant[0]] = None

    def put_video(
        self,
        path: str | os.PathLike[str],
        *,
        size: int,
        mtime: float,
        fingerprint: str,
        duration: float,
        width: int,
        height: int,
        frame_times: Sequence[float],
        frames: np.ndarray,
        global_vector: np.ndarray,
    ) -> int:
        """Insert or replace the video at ``path`` (same path keeps its id) with status 'ok'; return its id.

        ``frames`` (n_frames, dim) is stored as float16, one row per entry of ``frame_times``;
        ``global_vector`` (dim,) is normalised to unit length and stored as float32.
        """
        frames16, unit = self._check_features(frames, global_vector, len(frame_times))
        self._ensure_ann_for_write()
        with self._write_step():
            video_id = self._upsert_video(
                _norm_path(path),
                size=size,
                mtime=mtime,
                fingerprint=fingerprint,
                duration=duration,
                width=width,
                height=height,
                frame_times=json.dumps([float(t) for t in frame_times]),
                status="ok",
                error=None,
            )
            self._conn.execute(
                "INSERT INTO features (video_id, global, frames) VALUES (?, ?, ?) "
                "ON CONFLICT (video_id) DO UPDATE SET global = excluded.global, frames = excluded.frames",
                (video_id, unit.tobytes(), frames16.tobytes()),
            )
            self._pending[video_id] = unit
        return video_id

    def put_failure(
        self, path: str | os.PathLike[str], *, size: int, mtime: float, fingerprint: str | None, error: str
    ) -> int:
        """Record that ``path`` could not be indexed (one-line ``error``); drops any features it had."""
        norm = _norm_path(path)
        had_features = self._conn.execute(
            "SELECT 1 FROM features JOIN videos ON videos.id = features.video_id WHERE videos.path = ?",
            (norm,),
        ).fetchone()
        if had_features:
            self._ensure_ann_for_write()
        with self._write_step():
            video_id = self._upsert_video(
                norm,
                size=size,
                mtime=mtime,
                fingerprint=fingerprint,
                duration=None,
                width=None,
                height=None,
                frame_times=None,
                status="failed",
                error=one_line(error, _ERROR_MAX_CHARS),
            )
            self._conn.execute("DELETE FROM features WHERE video_id = ?", (video_id,))
            if had_features:
                self._pending[video_id] = None
        return video_id

    def _upsert_video(self, path: str, **values: Any) -> int:
        values.update(path=path, indexed_at=time.time())
        columns = list(values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "path")
        row = self._conn.execute(
            f"INSERT INTO videos ({', '.join(columns)}, seen) VALUES ({_marks(len(columns))}, 1) "
            f"ON CONFLICT (path) DO UPDATE SET {updates}, seen = 1 RETURNING id",
            [values[c] for c in columns],
        ).fetchone()
        return int(row[0])

    def _check_features(
        self, frames: np.ndarray, global_vector: np.ndarray, n_times: int
    ) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        vector = np.asarray(global_vector, dtype=np.float64)
        if frames.ndim != 2 or vector.ndim != 1 or frames.shape[1] != vector.shape[0]:
            raise ValueError(f"frames must be (n, dim) and global_vector (dim,); got {frames.shape}, {vector.shape}")
        if frames.shape[0] != n_times or n_times == 0:
            raise ValueError(f"need one frame_times entry per frame row ({n_times} times, {frames.shape[0]} rows)")
        dim = self._library_dim()
        if dim is not None and dim != vector.shape[0]:
            raise ValueError(f"this library holds {dim}-d features, got {vector.shape[0]}-d")
        norm = float(np.linalg.norm(vector))
        frames16 = np.ascontiguousarray(frames, dtype="<f2")  # the file format is little-endian
        if not np.isfinite(norm) or norm == 0.0 or not np.isfinite(frames16).all():
            raise ValueError("features must be finite (and fit float16) and the global vector non-zero")
        return frames16, (vector / norm).astype("<f4")

    def _library_dim(self) -> int | None:
        row = self._conn.execute("SELECT length(global) FROM features LIMIT 1").fetchone()
        return None if row is None else row[0] // 4

    @contextlib.contextmanager
    def _write_step(self) -> Iterator[None]:
        """One all-or-nothing step inside the batch transaction (a SAVEPOINT)."""
        if not self.write:
            raise RuntimeError("this Library was opened read-only (write=False)")
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN IMMEDIATE")
        self._conn.execute("SAVEPOINT step")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO step")
            self._conn.execute("RELEASE step")
            raise
        self._conn.execute("RELEASE step")

    def commit(self) -> None:
        """Commit buffered writes; if vectors changed, bump the generation and update the in-memory ANN."""
        if not self._conn.in_transaction:
            return
        changed = bool(self._pending) or self._pending_reset
        with stop_signals_held():  # stopped between the two, the ANN index would lag SQLite and cost a rebuild
            try:
                if changed:
                    old = self._generation()
                    new = Generation(old.number + 1, secrets.token_hex(8))
                    self._set_meta("generation", str(new.number))
                    self._set_meta("generation_id", new.token)
                    self._log_changes(new)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self.rollback()
                raise LibraryError(f"Could not save to the library at {self.directory}: {exc}.") from exc
            if changed:
                self._apply_pending(new)

    def _log_changes(self, new: Generation) -> None:
        if self._pending_reset:  # no saved index can be brought up to date across an emptying
            self._conn.execute("DELETE FROM generations")
            self._conn.execute("DELETE FROM vector_changes")
        self._conn.execute("INSERT INTO generations (number, token) VALUES (?, ?)", (new.number, new.token))
        self._conn.executemany(
            "INSERT INTO vector_changes (video_id, generation) VALUES (?, ?) "
            "ON CONFLICT (video_id) DO UPDATE SET generation = excluded.generation",
            [(video_id, new.number) for video_id in self._pending],
        )

    def rollback(self) -> None:
        """Drop buffered writes (the in-memory ANN index still matches the committed state)."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self._pending.clear()
        self._pending_reset = False

    # ------------------------------------------------------------------ the ANN index

    def ann(self) -> hnswlib.Index | None:
        """The ANN index over the committed global vectors (None for an empty library).

        Loads ``ann.hnsw`` when its sidecar matches SQLite's generation, brings it up to date from the change log
        when it is older, and otherwise rebuilds it from the features table and saves it. A writer's buffered
        changes are committed first.
        """
        if self.write:
            self.commit()
            if self._ann_gen is None:
                self._load_ann()
            return self._ann
        # Readers re-check the generation on every call (one tiny query) so a long-lived reader follows
        # a concurrent writer instead of serving a stale index.
        if self._ann_gen is None or self._ann_gen != self._generation():
            self._load_ann()
        return self._ann

    def knn(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` videos whose global vectors are most similar to ``query``.

        Returns (ids int64, cosine similarities float32), best first; fewer than ``k`` when the library
        has fewer videos.
        """
        index = self.ann()
        k = min(int(k), self._ann_count)
        if index is None or k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        q = ann_index.unit_query(np.asarray(query, dtype=np.float32).reshape(-1))
        if q.shape[0] != index.dim:
            raise ValueError(f"query is {q.shape[0]}-d, the library holds {index.dim}-d vectors")
        # ef is the search beam; it must be >= k, and 2k keeps recall high for the few hundred candidates
        # the exact re-ranking needs (about 2-3 ms at 100k videos).
        index.set_ef(max(2 * k, 64))
        try:
            labels, distances = index.knn_query(q, k=k, num_threads=1)
        except RuntimeError:  # hnswlib could not fill k results (heavily deleted graph): be exact instead
            return self._exact_knn(q, k)
        return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)

    def _exact_knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = self.global_vectors()
        sims = vectors @ q
        order = np.argsort(-sims, kind="stable")[:k]
        return ids[order], sims[order].astype(np.float32)

    def save_ann(self) -> None:
        """Write the ANN index and its sidecar for the current generation (atomically, sidecar last)."""
        self.commit()
        if self._ann_gen is None:
            if self._files_generation() == self._generation():
                return
            self._load_ann()  # a rebuilt index is saved as it is made; one brought up to date is saved below
        if self._ann_dirty or self._files_generation() != self._ann_gen:
            try:
                self._write_ann_files(self._ann, self._ann_gen, self._ann_count)
            except OSError as error:
                raise LibraryError(
                    f"Could not save the search index in {self.directory}: {error.strerror or one_line(error)}. "
                    "The videos are kept in the library; the index is rebuilt from them when there is room."
                ) from error

    def _ensure_ann_for_write(self) -> None:
        # Called before a write that touches vectors, so that the index is loaded from the committed
        # state (nothing in the open transaction has touched features yet) and can then follow along.
        if self._ann_gen is None and not self._pending_reset:
            self._load_ann()

    def _load_ann(self) -> None:
        loaded = None
        if self._ann_gen is not None:  # a reader that follows a writer brings what it holds up to date
            loaded = self._caught_up(self._ann, self._ann_gen, self._ann_count, self._changes_since(self._ann_gen))
        source: AnnSource = "caught up"
        if loaded is None:
            self._ann, self._ann_gen, self._ann_count = None, None, 0  # what it held may be half updated
            loaded, source = self._read_ann_files()
        saved = source == "disk"
        if loaded is None:
            loaded = self._rebuild_ann()
            source = "rebuilt" if loaded[2] else "empty"
            saved = self._try_save(*loaded)
        self._ann, self._ann_gen, self._ann_count = loaded
        self._ann_dirty = not saved
        self.last_ann_load = source

    def _changes_since(self, gen: Generation) -> _VectorChanges | None:
        """How the vectors changed after generation ``gen``; None when the change log cannot tell: ``gen`` is not
        in this database's history (a power cut took it back, the library was emptied since) or is older than the
        log, or a ts2 that keeps no log has written since (a generation is missing)."""
        with self._read_snapshot():
            current = self._generation()
            if current == gen:
                return _VectorChanges(current, {}, None)
            if not self._has_change_log or gen.number > current.number:
                return None
            tokens = dict(
                self._conn.execute(
                    "SELECT number, token FROM generations WHERE number IN (?, ?)", (gen.number, current.number)
                )
            )
            (logged,) = self._conn.execute(
                "SELECT COUNT(*) FROM generations WHERE number > ? AND number <= ?", (gen.number, current.number)
            ).fetchone()
            if tokens.get(gen.number) != gen.token or tokens.get(current.number) != current.token:
                return None
            if logged != current.number - gen.number:
                return None
            ids = [row[0] for row in self._conn.execute(
                "SELECT video_id FROM vector_changes WHERE generation > ?", (gen.number,)
            )]  # fmt: skip
            vectors = self._global_vectors_of(ids)
            return _VectorChanges(current, {video_id: vectors.get(video_id) for video_id in ids}, self.count_ok())

    def _caught_up(
        self, index: hnswlib.Index | None, gen: Generation, count: int, changes: _VectorChanges | None
    ) -> tuple[hnswlib.Index | None, Generation, int] | None:
        """``index`` (at ``gen``, ``count`` live vectors) with ``changes`` applied in place; None if they are None
        or the result does not hold one vector per indexed video (then the index is not to be used)."""
        if changes is None:
            return None
        if changes.current == gen:
            return index, gen, count
        index, count = ann_index.apply_changes(index, count, changes.vectors)
        return (index, changes.current, count) if count == changes.live else None

    def _global_vectors_of(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        vectors: dict[int, np.ndarray] = {}
        for chunk in _chunks(list(ids)):
            rows = self._conn.execute(
                f"SELECT video_id, global FROM features WHERE video_id IN ({_marks(len(chunk))})", chunk
            )
            vectors.update((video_id, np.frombuffer(blob, dtype="<f4")) for video_id, blob in rows)
        return vectors

    def _rebuild_ann(self) -> tuple[hnswlib.Index | None, Generation, int]:
        # Streams the vectors in chunks so a big library never sits in memory twice.
        index: hnswlib.Index | None = None
        count = 0
        with self._read_snapshot():
            gen = self._generation()
            for ids, vectors in self._global_chunks(_REBUILD_CHUNK):
                if index is None:
                    index = ann_index.new_index(vectors.shape[1], _REBUILD_CHUNK)
                if count + len(ids) > index.get_max_elements():
                    index.resize_index(2 * index.get_max_elements())
                index.add_items(vectors, ids)
                count += len(ids)
        return index, gen, count

    def _try_save(self, index: hnswlib.Index | None, gen: Generation, count: int) -> bool:
        # A failed save (read-only library, full disk) must not stop a search; a writer retries in save_ann.
        try:
            self._write_ann_files(index, gen, count)
        except OSError:
            return False
        return True

    def _apply_pending(self, gen: Generation) -> None:
        try:
            if self._pending_reset:
                self._ann, self._ann_count = None, 0
                self._ann_gen = gen  # an emptied library is trivially "loaded"
            if self._ann_gen is not None:
                self._apply_to_index(gen)
        except BaseException:
            # SQLite is already committed; forget the half-updated index so that it gets rebuilt.
            self._ann, self._ann_gen, self._ann_count = None, None, 0
            raise
        finally:
            self._pending.clear()
            self._pending_reset = False

    def _apply_to_index(self, gen: Generation) -> None:
        self._ann, self._ann_count = ann_index.apply_changes(self._ann, self._ann_count, self._pending)
        self._ann_gen, self._ann_dirty = gen, True

    def _read_ann_files(self) -> tuple[tuple[hnswlib.Index | None, Generation, int] | None, AnnSource]:
        """The saved index, brought up to date if it is older than SQLite's generation; None if it is missing,
        damaged or cannot be brought up to date. With how it was obtained ("disk" or "caught up")."""
        with ann_index.files_lock(self.directory, shared=True):
            meta = ann_index.read_sidecar(self.directory)
            gen = ann_index.sidecar_generation(meta)
            if meta is None or gen is None:
                return None, "disk"
            # Read under the lock: a writer that saves a newer index forgets the log before it (_forget_changes).
            changes = self._changes_since(gen)
            if changes is None:
                return None, "disk"
            source: AnnSource = "disk" if changes.current == gen else "caught up"
            if meta["count"] == 0:
                return self._caught_up(None, gen, 0, changes), source
            index = ann_index.load_index_file(self.directory, meta)
        if index is None or index.dim != self._library_dim():
            return None, "disk"
        return self._caught_up(index, gen, int(meta["count"]), changes), source

    def _files_generation(self) -> Generation | None:
        return ann_index.sidecar_generation(ann_index.read_sidecar(self.directory))

    def _write_ann_files(self, index: hnswlib.Index | None, gen: Generation, count: int) -> None:
        with ann_index.files_lock(self.directory, shared=False):
            # A reader may have rebuilt from a snapshot that a writer has since moved past; saving that
            # would only force another rebuild later, so skip it.
            if not self.write and self._generation() != gen:
                return
            ann_index.write_files(self.directory, index, gen, count)
            if self.write:
                self._forget_changes(gen)
        if self._ann is index and self._ann_gen == gen:
            self._ann_dirty = False

    def _forget_changes(self, saved: Generation) -> None:
        """Drop the part of the change log that no saved index needs any more: the files are at ``saved`` now."""
        with self._immediate_transaction():  # an index rebuilt for a write: committed with that write
            self._conn.execute("DELETE FROM generations WHERE number < ?", (saved.number,))
            self._conn.execute("DELETE FROM vector_changes WHERE generation <= ?", (saved.number,))

    # ------------------------------------------------------------------ feature reads

    def frame_features(self, ids: Sequence[int], dtype: npt.DTypeLike = np.float32) -> dict[int, np.ndarray]:
        """Per-frame features (n_frames, dim) for ``ids``; missing ids are absent.

        Most of the time for a few hundred ids goes into numpy's float16 -> float32 cast; pass
        ``dtype=np.float16`` to get the stored values as they are (read-only) and cast elsewhere.
        """
        out: dict[int, np.ndarray] = {}
        for batch in self.stream_frame_features(ids, _SQL_CHUNK):
            out.update((video_id, frames.astype(dtype, copy=False)) for video_id, frames in batch)
        return out

    def stream_frame_features(self, ids: Sequence[int], batch: int) -> Iterator[list[tuple[int, np.ndarray]]]:
        """The stored float16 per-frame features (n_frames, dim, read-only) of ``ids``, ``batch`` videos at a time
        as SQLite returns them (in no particular order; missing ids are absent), so that a caller can finish
        with each batch while it is in the cache. Consume it to the end: it holds a read snapshot until then."""
        with self._read_snapshot():
            for chunk in _chunks(list(ids)):
                rows = self._conn.execute(
                    f"SELECT video_id, length(global), frames FROM features WHERE video_id IN ({_marks(len(chunk))})",
                    chunk,
                )
                pending: list[tuple[int, np.ndarray]] = []
                for video_id, global_bytes, blob in rows:
                    pending.append((video_id, _decode_frames(blob, global_bytes // 4, np.float16)))
                    if len(pending) == batch:
                        yield pending
                        pending = []
                if pending:
                    yield pending

    def iter_frame_features(self) -> Iterator[tuple[int, np.ndarray]]:
        """(id, (n_frames, dim) float32) for every indexed video, in id order, without loading all at once."""
        cursor = self._conn.execute("SELECT video_id, length(global), frames FROM features ORDER BY video_id")
        for video_id, global_bytes, blob in cursor:
            yield video_id, _decode_frames(blob, global_bytes // 4)

    def all_frame_features(self) -> tuple[list[int], list[np.ndarray]]:
        """Every indexed video's per-frame features (for exact brute-force search in tests and benchmarks)."""
        ids: list[int] = []
        arrays: list[np.ndarray] = []
        with self._read_snapshot():
            for video_id, frames in self.iter_frame_features():
                ids.append(video_id)
                arrays.append(frames)
        return ids, arrays

    def global_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (n,), unit vectors float32 (n, dim)) of every indexed video, in id order."""
        with self._read_snapshot():
            chunks = list(self._global_chunks(_REBUILD_CHUNK))
        if not chunks:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    def _global_chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cursor = self._conn.execute("SELECT video_id, global FROM features ORDER BY video_id")
        while rows := cursor.fetchmany(size):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
            yield ids, vectors

    @contextlib.contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        """Make several SELECTs see one consistent state (a WAL read transaction)."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------------ status

    def stats(self) -> LibraryStats:
        with self._read_snapshot():
            counts = dict(self._conn.execute("SELECT status, COUNT(*) FROM videos GROUP BY status").fetchall())
            video_seconds, last_indexed = self._conn.execute(
                "SELECT coalesce(sum(CASE WHEN status = 'ok' THEN duration END), 0), max(indexed_at) FROM videos"
            ).fetchone()
            failures = self._conn.execute(
                "SELECT path, coalesce(error, '') FROM videos WHERE status = 'failed' ORDER BY path"
            ).fetchall()
            model = self.model_config()
            dim = self._library_dim()
            generation = self._generation().number
            version = self._schema_version() or SCHEMA_VERSION
            rules, links = {str(root): rule for root, rule in self.folder_rules().items()}, self._links()
            folders = [(root, self.count_under(root, indexed_only=True, also=links.get(root, []))) for root in rules]
        return LibraryStats(
            directory=self.directory,
            videos_ok=counts.get("ok", 0),
            videos_failed=counts.get("failed", 0),
            failures=[(p, e) for p, e in failures],
            bytes_on_disk=_tree_size(self.directory),
            model=model,
            dim=dim,
            schema_version=version,
            generation=generation,
            video_seconds=float(video_seconds),
            last_indexed=last_indexed,
            folders=folders,
            folder_rules=rules,
            rebuild_unfinished=(self.directory / REBUILD_DIR / DB_FILE).is_file(),
        )


# ---------------------------------------------------------------------- helpers: SQLite


def _library_path(directory: str | os.PathLike[str] | None) -> Path:
    return Path(directory if directory is not None else default_library_dir()).expanduser().absolute()


def _rules_from_json(value: Any) -> ScanRules | None:
    """A root's recorded rules; None when missing or not in the form ``remember_rules`` writes."""
    if not isinstance(value, dict):
        return None
    exclude, hidden = value.get("exclude"), value.get("hidden")
    if not (isinstance(exclude, list) and all(isinstance(glob, str) for glob in exclude) and isinstance(hidden, bool)):
        return None
    return ScanRules(tuple(exclude), hidden)


def _connect(db_path: Path, *, create: bool, write: bool) -> sqlite3.Connection:
    # mode=rw: opening a library must never create an empty database by accident.
    try:
        return _configured(db_path, f"mode={'rwc' if create else 'rw'}")
    except LibraryError:
        if write or os.access(db_path.parent, os.W_OK):
            raise
    # A reader of a library on read-only storage (a mounted backup, another user's folder): SQLite cannot create
    # the WAL's shared-memory file there, so the file is read as it is, without WAL (immutable: nobody can be
    # writing it; a WAL left by a crashed writer is not seen).
    return _configured(db_path, "mode=ro&immutable=1")


def _configured(db_path: Path, mode: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(f"{db_path.as_uri()}?{mode}", uri=True, isolation_level=None, timeout=30.0)
    except sqlite3.Error as exc:
        raise _db_error(db_path.parent, exc) from exc
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opening is lazy: read now, fail here
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}").fetchall()
        conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        # Cap the WAL left behind after a checkpoint; a big index run can otherwise leave it at GBs.
        conn.execute(f"PRAGMA journal_size_limit = {64 << 20}").fetchall()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _db_error(db_path.parent, exc) from exc
    return conn


def _db_error(directory: Path, exc: sqlite3.Error) -> LibraryError:
    return LibraryError(f"Cannot read the library at {directory} ({exc}); it may be damaged or not a ts2 library.")


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), _SQL_CHUNK):
        yield [int(i) for i in ids[start : start + _SQL_CHUNK]]


def storable_path(path: str | os.PathLike[str]) -> bool:
    """Whether the library can hold this path: os.fsdecode() of a file name that is not valid UTF-8 yields lone
    surrogates, which SQLite TEXT cannot hold."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str | os.PathLike[str]) -> str:
    """The path with each byte that is not UTF-8 shown as U+FFFD, for messages and JSON."""
    return os.fsencode(path).decode("utf-8", "replace")


def _norm_path(path: str | os.PathLike[str]) -> str:
    text = os.path.abspath(os.fspath(path))
    if not storable_path(text):
        raise LibraryError(f"{printable_path(text)}: the file name is not valid UTF-8, which the library cannot hold.")
    return text


def _under_root(root: str | os.PathLike[str]) -> tuple[str, list[str]]:
    """SQL condition + arguments for 'path is root or lies inside root'.

    A range on the indexed path column rather than LIKE: LIKE is case-insensitive for ASCII and treats
    '%' and '_' in folder names as wildcards. Every string starting with ``root/`` sorts in
    [``root/``, ``root0``) because '0' is the character right after '/' (UTF-8 keeps code point order).
    """
    base = _norm_path(root).rstrip(os.sep)
    low, high = base + os.sep, base + chr(ord(os.sep) + 1)
    return "(path >= ? AND path < ?) OR path = ?", [low, high, base or os.sep]


def _under_any(places: Sequence[str | os.PathLike[str]]) -> tuple[str, list[str]]:
    """SQL condition + arguments for 'path is or lies inside one of ``places``' (``_under_root`` for each)."""
    conditions = [_under_root(place) for place in places]
    where = " OR ".join(f"({condition})" for condition, _ in conditions)
    return where, [arg for _, condition_args in conditions for arg in condition_args]


def _video_row(row: Sequence[Any]) -> VideoRow:
    return VideoRow(
        id=row[0],
        path=row[1],
        size=row[2],
        mtime=row[3],
        fingerprint=row[4],
        duration=row[5],
        width=row[6],
        height=row[7],
        frame_times=json.loads(row[8]) if row[8] else [],
        status=row[9],
        error=row[10],
        indexed_at=row[11],
        seen=bool(row[12]),
    )


def _decode_frames(blob: bytes, dim: int, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    frames = np.frombuffer(blob, dtype="<f2").reshape(-1, dim)
    return frames if np.dtype(dtype) == frames.dtype else frames.astype(dtype)


def _tree_size(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith("-shm"):  # SQLite's shared-memory index of its log: made by readers, then removed
                continue
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# ---------------------------------------------------------------------- helpers: files and locks


def _acquire_writer_lock(directory: Path, wait: float, on_wait: Callable[[], None] | None = None) -> tuple[int, ...]:
    """Lock ``DIR/lock`` and the folder itself, the same way every time. The folder's lock is what keeps a second
    writer out if someone deletes the lock file while a run holds it (the second run would lock a new file)."""
    fds: list[int] = []
    try:
        fds.append(os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644))
        fds.append(os.open(directory, os.O_RDONLY))
    except OSError as exc:
        _close_all(fds)
        raise LibraryError(f"Cannot write to the library at {directory}: {exc.strerror}.") from exc
    deadline = time.monotonic() + max(0.0, wait)
    try:
        for fd in fds:
            while not _try_flock(fd):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LibraryError(
                        f"Another ts2 index is running on this library ({directory}); wait for it to finish "
                        "or use another --library."
                    )
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                time.sleep(min(0.1, remaining))
        return tuple(fds)
    except BaseException:  # also Ctrl-C while waiting
        _close_all(fds)
        raise


def _writer_holds(directory: Path) -> bool:
    """Whether a writer holds ``DIR/lock``: a shared lock is refused while it does. (Taken and let go at once; a
    writer starting in that instant would be refused as if another one ran, so this is for rare answers only.)"""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False  # never written to, or not ours to read
    try:
        return not _try_flock(fd, fcntl.LOCK_SH)
    except OSError:
        return False
    finally:
        os.close(fd)


def _try_flock(fd: int, kind: int = fcntl.LOCK_EX) -> bool:
    """Take a lock of ``kind`` (exclusive or shared) without waiting; False if another process's lock stands in
    the way."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)  # closing a descriptor releases its flock
