"""The ``ts2`` command line. Commands parse options, call library functions and render; nothing else lives here."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

# numpy's OpenBLAS spreads even small products (the re-rank's) over every core, and on a busy machine its threads
# wait on each other: on the 2-core test machine a query encoded with numpy products (before text_encoder.py moved
# to ONNX Runtime) took about 1 s with two OpenBLAS threads and 75 ms with one (docs/benchmarks.md, Search).
# Set before numpy is first imported; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import typer
from rich.console import Console

from . import __version__
from .cli_options import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    Checkpoint,
    Compat,
    Device,
    InferencePrecision,
    JsonFlag,
    ModelName,
    Pretrained,
    TopK,
)
from .cli_research import eval_app, train_app
from .errors import Ts2Error
from .markup import TrimmedStdout, counted, shown
from .stopping import replace_stop_handlers, restore_handlers

app = typer.Typer(
    name="ts2",
    help="Search your videos by describing what happens in them (TS2-Net on CLIP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help and usage errors: a mistyped option is one "Error: …" line under the usage, not a boxed panel.
    rich_markup_mode=None,
)
UNFOLDED_WIDTH = 4096
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else UNFOLDED_WIDTH)
"""Progress, notes and errors: what is said to the person, apart from the command's answer. Written to a log file
or a pipe, a line is not folded (a path cut in two cannot be found with grep)."""
# The answer (results, status, summaries) goes to stdout, so that `ts2 search … | less` and `> file` work. Piped
# or redirected, rows are not folded to a terminal's width (rich's default 80, or an exported COLUMNS).
output = (
    Console(highlight=False)
    if sys.stdout.isatty()
    else Console(file=TrimmedStdout(), highlight=False, width=UNFOLDED_WIDTH)
)
_state: dict[str, Any] = {"debug": False, "fast_exit": False, "interrupted": "Interrupted.", "stopped_by": 0}
"""``interrupted``: what Ctrl-C leaves behind, said by the command that knows (index, eval, train);
``stopped_by``: the signal that is stopping the command, 0 while none is."""
_signals_before: dict[int, Any] = {}
"""The stop signals' handlers before ``main`` put its own in place."""

# str, not Path: typer would turn "" (an unset variable in a script) into Path("."), the current folder
LibraryDir = Annotated[
    str | None,
    typer.Option(
        "--library",
        metavar="DIR",
        help="Library folder (default: $TS2_HOME, else the user data folder).",
        show_default=False,
    ),
]

WaitSeconds = Annotated[
    float,
    typer.Option(
        "--wait",
        metavar="SECONDS",
        min=0.0,  # refuses nan too, which would never time out
        help="Seconds to wait for another ts2 index or forget to finish (inf: as long as it takes).",
    ),
]


def model_options(
    model: str | None,
    pretrained: str | None,
    checkpoint: Path | None,
    device: str,
    compat: str | None,
    precision: str = "auto",
    topk: str | None = None,
):
    """The model the options name; ``model`` and ``pretrained`` are None when not given."""
    from .model import ModelOptions

    model, pretrained = model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED
    backbone_cfg = None
    if model.endswith(".json"):
        from .model.backbone import read_model_config

        backbone_cfg = read_model_config(Path(model))
        model = Path(model).stem
    return ModelOptions(
        model=model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        compat=compat,  # type: ignore[arg-type]
        topk=topk,  # type: ignore[arg-type]
        backbone_cfg=backbone_cfg,
        precision=precision,  # type: ignore[arg-type]
    )


def unused_beside_checkpoint(
    model: str | None, pretrained: str | None, checkpoint: Path | None
) -> tuple[str | None, str | None]:
    """``model`` and ``pretrained``, or None for both when a checkpoint is given, since it brings its own backbone
    and CLIP weights; the user is told that the ones they named play no part."""
    if checkpoint is None or not (model or pretrained):
        return model, pretrained
    note_unused(
        {"--model": model, "--pretrained": pretrained},
        "not used with --checkpoint: a checkpoint brings its own backbone and CLIP weights",
    )
    return None, None


def note_unused(options: dict[str, object], why: str) -> None:
    """A note naming the options among ``options`` (name: value) that were given, which play no part, and ``why``."""
    given = [name for name, value in options.items() if value]
    if given:
        verb = "is" if len(given) == 1 else "are"
        console.print(f"[yellow]note:[/yellow] {' and '.join(given)} {verb} {why}.", soft_wrap=True)


def print_json(data: Any) -> None:
    """Strict JSON: a NaN or infinite number (a diverged loss, a metric of nothing) is written as null."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ts2 {__version__}\n")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command("model", short_help="Load the model and describe it.")
def model_command(
    model: ModelName = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = None,
    topk: TopK = None,
    precision: InferencePrecision = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Load the model and describe it: backbone, weights, zero-shot or trained, compat mode, device."""
    from .model import load_model
    from .report import describe_model, model_table

    model, pretrained = unused_beside_checkpoint(model, pretrained, checkpoint)
    loaded = load_model(model_options(model, pretrained, checkpoint, device, compat, precision, topk))
    report = describe_model(loaded)
    if as_json:
        print_json(report)
    else:
        output.print(model_table(report))


@app.command("index", short_help="Index videos, or update the library's folders.")
def index_command(
    folders: Annotated[  # str, not Path, for the same reason as LibraryDir
        list[str] | None,
        typer.Argument(
            metavar="FOLDERS",
            help="Folders (or files) to index, searched recursively. None: update every folder the library "
            "covers, each with the --exclude and --hidden it was last indexed with.",
        ),
    ] = None,
    library: LibraryDir = None,
    exclude: Annotated[
        list[str],
        typer.Option(
            "--exclude",
            metavar="GLOB",
            help="Skip files or folders matching this glob (default: the globs a folder was last indexed with).",
        ),
    ] = [],  # noqa: B006
    no_exclude: Annotated[
        bool, typer.Option("--no-exclude", help="Drop the --exclude globs the folders were last indexed with.")
    ] = False,
    hidden: Annotated[
        bool | None,
        typer.Option(
            "--hidden/--no-hidden",
            help="Also index hidden files and folders, or not (default: as a folder was last indexed).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", metavar="N", min=1, help="Videos per model batch (default: auto).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", metavar="N", min=1, help="Decoding threads (default: auto).")
    ] = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Re-index into a new library that replaces this one when done.")
    ] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Try unchanged failed files again.")] = False,
    wait: WaitSeconds = 0.0,
    commit_every: Annotated[int, typer.Option("--commit-every", min=1, hidden=True)] = 16,
    model: ModelName = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    compat: Compat = None,
    topk: TopK = None,
    precision: InferencePrecision = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Index the videos under FOLDERS, or update every folder the library covers: new and changed files are
    embedded, deleted ones removed."""
    from .indexer import (
        IndexOptions,
        ModelOnDemand,
        index_folders,
        library_model,
        model_request,
        require_folders,
    )
    from .progress import IndexProgressBar
    from .report import summary_table
    from .scan import check_globs, check_roots
    from .store import Library

    model, pretrained = unused_beside_checkpoint(model, pretrained, checkpoint)  # now: it may never be loaded
    folders = folders or []
    if not folders and (exclude or no_exclude or hidden is not None):
        raise Ts2Error(
            "--exclude, --no-exclude and --hidden go with the folders they apply to: name them (without folders, "
            "each of the library's folders keeps the ones it was indexed with)."
        )
    if exclude and no_exclude:
        raise Ts2Error("--exclude and --no-exclude contradict each other: give one of them.")
    try:
        roots = check_roots(folders)
    except Ts2Error as error:
        raise Ts2Error(f"{error}{gone_root_hint(library, folders)}") from None
    check_globs(exclude, roots)
    options = IndexOptions(
        roots=roots,
        exclude=tuple(exclude) if exclude or no_exclude else None,
        include_hidden=hidden,
        batch_size=batch_size,
        workers=workers,
        rebuild=rebuild,
        retry_failed=retry_failed,
        commit_every=commit_every,
    )

    def load_named() -> Any:  # the model the options name, with defaults for the rest
        from .model import load_model

        return load_model(model_options(model, pretrained, checkpoint, device, compat, precision, topk))

    # A new library is made once its model has loaded: missing weights must not leave an empty one behind.
    first = load_named() if roots and not Library.exists(library) else None
    # Naming no folder updates an existing library: it does not create one.
    with Library.open(library, write=True, create=bool(roots), wait=wait, on_wait=waiting_note(wait)) as lib:
        on_interrupt(
            "Interrupted; the library is as it was, and the rebuild so far is kept: run the same command again to go "
            "on."
            if rebuild
            else "Interrupted; the videos indexed so far are kept: run the command again to go on."
        )
        named = model or pretrained or checkpoint or compat or topk
        request = model_request(model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED, checkpoint, compat, topk)
        if first is not None:
            source = ModelOnDemand(lambda: first, request)
        else:
            source = (None if named else library_model(lib, device, precision)) or ModelOnDemand(load_named, request)
        if not roots:
            require_folders(lib)  # before the model loads
        if rebuild or not source.recorded_in(lib):
            # Loaded before the bar starts: a first use downloads the weights, and the download shows its own
            # progress. Otherwise the model is loaded only if a video needs it.
            source.get()
        with IndexProgressBar(console, enabled=not as_json) as bar:
            summary = index_folders(lib, source, options, bar)
    if earlier := summary.failed_unchanged:
        console.print(
            f"[yellow]note:[/yellow] {earlier} of the failures {'is a file' if earlier == 1 else 'are files'} that "
            "failed before and did not change since, not tried again: --retry-failed tries again (e.g. after fixing "
            "permissions).",
            soft_wrap=True,
        )
    for folder, why in summary.skipped_folders:
        console.print(f"[yellow]note:[/yellow] Skipped {shown(folder)}: {shown(why)}.", soft_wrap=True)
    for folder in summary.vacated_folders:
        console.print(
            f"[yellow]note:[/yellow] {shown(folder)} is not there now and its videos moved (a renamed folder?): it is "
            "no longer one of the library's folders.",
            soft_wrap=True,
        )
    if not (summary.indexed or summary.unchanged or summary.moved or summary.failed or summary.removed):
        console.print(
            f"[yellow]note:[/yellow] No video files under {shown(', '.join(summary.folders))} (hidden files and "
            "--exclude matches are skipped; ts2 looks for common video extensions such as .mp4, .mkv, .mov).",
            soft_wrap=True,
        )
    if as_json:
        print_json(summary.to_json())
    else:
        output.print(summary_table(summary, lib.directory))
    if summary.indexed == 0 and summary.failed and summary.unchanged == 0 and summary.moved == 0:
        raise typer.Exit(1)


def gone_root_hint(library: str | None, folders: list[str]) -> str:
    """What to do about a folder to index that is gone but still has videos in the library."""
    from .errors import LibraryError
    from .indexer import stored_form
    from .store import Library

    gone = [folder for folder in folders if folder and not Path(folder).expanduser().exists()]
    try:
        with Library.open(library) as lib:
            counts = {folder: lib.count_under(stored_form(folder), indexed_only=True) for folder in gone}
    except LibraryError:
        return ""
    held = [folder for folder, count in counts.items() if count]
    if not held:
        return ""
    total = sum(counts.values())
    command, them = f"ts2 forget {' '.join(held)}", "it" if total == 1 else "them"
    return f"; the library still holds {counted(total, 'video')} from there: `{command}` removes {them}"


@app.command("forget", short_help="Remove a gone folder's videos from the library.")
def forget_command(
    paths: Annotated[
        list[str], typer.Argument(metavar="PATHS", help="Folders or files whose videos to remove, present or gone.")
    ],
    library: LibraryDir = None,
    wait: WaitSeconds = 0.0,
    as_json: JsonFlag = False,
) -> None:
    """Remove the videos under PATHS from the library (a deleted or renamed folder, say); no file is touched."""
    from .indexer import forget
    from .store import Library

    if not all(paths):
        raise typer.BadParameter("an empty name is not a path; name a folder or a file.", param_hint="PATHS")
    with Library.open(library, write=True, wait=wait, on_wait=waiting_note(wait)) as lib:
        removed = forget(lib, paths)
    if as_json:
        print_json({"removed": len(removed), "paths": removed})
        return
    if not removed:
        console.print(f"[yellow]note:[/yellow] The library holds no video under {shown(', '.join(paths))}.")
    output.print(f"Removed {counted(len(removed), 'video')} from the library.")


@app.command("status", short_help="The library: model, folders, videos, failures.")
def status_command(library: LibraryDir = None, as_json: JsonFlag = False) -> None:
    """Where the library is, which model built it, how many videos, size on disk, failures."""
    from .report import status_json, status_table
    from .store import Library

    with Library.open(library) as lib:
        status = status_json(lib.stats())
    if as_json:
        print_json(status)
    else:
        output.print(status_table(status))


app.command("info", help="Alias of status.")(status_command)


@app.command("search", short_help="Find videos by description (or --like VIDEO).")
def search_command(
    words: Annotated[
        list[str] | None,
        typer.Argument(metavar="QUERY", help="What happens in the video you are looking for (quotes optional)."),
    ] = None,
    like: Annotated[
        str | None, typer.Option("--like", metavar="VIDEO", help="Find videos similar to this video file.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, help="Number of results.")] = 10,
    candidates: Annotated[
        int, typer.Option("--candidates", metavar="N", min=1, help="ANN candidates re-ranked exactly.")
    ] = 300,
    within: Annotated[str | None, typer.Option("--in", metavar="DIR", help="Only videos under this folder.")] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", metavar="X", help="Drop results scoring below this.")
    ] = None,
    paths: Annotated[bool, typer.Option("--paths", help="Print bare paths, one a line.")] = False,
    print0: Annotated[
        bool, typer.Option("--print0", "-0", help="Print bare paths, each ended by a NUL (for xargs -0).")
    ] = False,
    open_top: Annotated[bool, typer.Option("--open", help="Open the top result at its moment.")] = False,
    library: LibraryDir = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", metavar="NAME|CONFIG.json", help="Default: the library's model.", rich_help_panel="Model"
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option("--pretrained", metavar="TAG|FILE", help="Default: the library's.", rich_help_panel="Model"),
    ] = None,
    checkpoint: Checkpoint = None,
    device: Device = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Find the videos that best match QUERY (or --like VIDEO), with the moment that matched."""
    from .report import results_table, search_json
    from .search import SearchOptions, gone_note, library_eps, rank, require_searchable, why_nothing_matched
    from .store import Library

    query = " ".join(words) if words else None  # `ts2 search dog catching frisbee` needs no quotes
    if (query is None) == (like is None):
        both = ", not both" if query is not None else ""
        raise typer.BadParameter(f'give a query or --like VIDEO{both}, e.g. ts2 search "dog catching a frisbee"')
    if as_json + paths + print0 > 1:
        raise typer.BadParameter("give one of --json, --paths and --print0", param_hint="'--paths'")
    if min_score is not None and math.isnan(min_score):
        raise typer.BadParameter("must be a number", param_hint="'--min-score'")
    like_file, folder = _named_path(like, "--like"), _named_path(within, "--in")
    options = SearchOptions(limit=limit, candidates=candidates, within=folder, min_score=min_score)
    with Library.open(library) as lib:
        require_searchable(lib)
        chosen = None
        if model or pretrained or checkpoint:
            from .query import search_model_options

            model, pretrained = unused_beside_checkpoint(model, pretrained, checkpoint)
            named = model_options(model, None, None, device, "fixed") if model else None
            chosen = search_model_options(lib, device, model=named, pretrained=pretrained, checkpoint=checkpoint)
        query_text, vector, exclude, notes, identity = _query_vector(lib, query, like_file, chosen, device)
        hits = rank(lib, vector, options, eps=library_eps(lib), exclude=exclude)
        if not hits and (reason := why_nothing_matched(lib, options)):
            notes.append(reason)
        if gone := gone_note(hits):
            notes.append(gone)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {shown(note)}", soft_wrap=True)
    if as_json:
        print_json(search_json(query_text, identity, hits))
    elif paths or print0:
        end = "\0" if print0 else "\n"
        sys.stdout.write("".join(f"{hit.path}{end}" for hit in hits))
    else:
        output.print(results_table(hits, output.width) if hits else "No matching videos.")
    if open_top and hits:
        from .player import open_at

        top = Path(hits[0].path)
        if not top.exists():
            raise Ts2Error(f"Cannot open {top}: it is no longer there (moved or deleted).")
        open_at(top, hits[0].moment.start)
    _state["fast_exit"] = True  # read-only and done: nothing is left for the interpreter's teardown to finish


def _named_path(value: str | None, option: str) -> Path | None:
    """A path option as given (``~`` expanded, also when quoted); an empty one (an unset variable) is a usage
    error, not the current folder."""
    if value is None:
        return None
    if not value:
        raise typer.BadParameter("an empty name was given", param_hint=f"'{option}'")
    return Path(value).expanduser()


def _query_vector(lib, query, like, chosen, device):
    from .query import like_query, text_query_vector

    if query is not None:
        vector, notes, identity = text_query_vector(lib, query, chosen, device=device)
        return query, vector, None, notes, identity
    vector, exclude, identity = like_query(lib, like, chosen, device=device)
    return f"like:{like.resolve()}", vector, exclude, [], identity


app.add_typer(eval_app, name="eval", short_help="Retrieval metrics on MSR-VTT or your own captions.")
app.add_typer(train_app, name="train", short_help="Fine-tune TS2-Net from CLIP.")


def main() -> None:
    _stop_tidily_on_signals()
    try:
        _run()
    finally:
        # The command is over: a signal during the interpreter's teardown (about a second once torch is imported)
        # ends it as the signal would, not with a traceback from whatever atexit function it lands in.
        _restore_signals()


def _run() -> None:
    try:
        app()
    except SystemExit as done:
        if done.code not in (None, 0) and _caused_by_interrupt(done):
            _interrupted()
        if _state["fast_exit"] and done.code in (None, 0):
            _exit_now()
        raise
    except Ts2Error as error:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {shown(str(error))}", soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except OSError as error:
        if _caused_by_interrupt(error):  # writing "Aborted!" to a terminal that SIGHUP says is gone
            _interrupted()
        if _state["debug"]:
            raise
        # What the library code did not already put in words; most often the answer could not be written (stdout
        # to a full disk). The command's work itself is committed as it goes.
        if error.filename:
            where = f" ({error.filename})"
        else:
            where = " (writing the output)" if error.errno in (errno.ENOSPC, errno.EIO) else ""
        console.print(f"[red]error:[/red] {shown(error.strerror or str(error))}{shown(where)}.", soft_wrap=True)
        sys.exit(1)
    except sqlite3.DatabaseError as error:  # found mid-command: opening a library checks only what it reads
        if _state["debug"]:
            raise
        console.print(
            f"[red]error:[/red] The library's database cannot be read ({shown(str(error))}); it may be damaged: "
            "index into a new --library, or restore the folder from a backup.",
            soft_wrap=True,
        )
        sys.exit(1)


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether Ctrl-C is behind ``error``: typer turns KeyboardInterrupt into an exit (130; older click versions:
    1 after "Aborted!") before ``main`` sees it."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def waiting_note(wait: float) -> Callable[[], None]:
    """What to say when another writer holds the library and ``--wait`` lets this command wait for it."""

    how_long = "as long as it takes" if math.isinf(wait) else f"up to {wait:g} s"

    def waiting() -> None:
        # The message first: a Ctrl-C right after the line below must already get it.
        on_interrupt("Interrupted while waiting for the other ts2 command; nothing was changed.")
        console.print(
            f"Another ts2 index is running on this library; waiting {how_long} for it to finish.", soft_wrap=True
        )

    return waiting


def on_interrupt(message: str | Callable[[], str]) -> None:
    """What Ctrl-C during the running command leaves behind, in words (default: "Interrupted."), or a function
    that says it when it happens."""
    _state["interrupted"] = message


def _stop_tidily_on_signals() -> None:
    """Turn the first stop signal into KeyboardInterrupt, so that SIGTERM and SIGHUP, like Ctrl-C, let an index run
    commit what it stored (without this they end the process on the spot, like ``kill -9``)."""
    _state["stopped_by"] = 0
    _signals_before.update(replace_stop_handlers(_on_stop_signal))


def _restore_signals() -> None:
    restore_handlers(_signals_before)
    _signals_before.clear()


def _on_stop_signal(number: int, frame: object) -> None:
    if _state["stopped_by"]:
        # A second signal while the command tidies up: stop at once. Raising again would cut the tidy-up short
        # halfway (and, while a model thread is mid-batch, interpreter shutdown can abort the process); ending
        # here is what SIGKILL does, which SQLite's journal and the write-then-rename of every other file survive.
        _say("Stopped at once; what was already saved is intact: run the command again to go on.")
        os._exit(128 + number)
    _state["stopped_by"] = number
    raise KeyboardInterrupt


def _interrupted() -> NoReturn:
    message = _state["interrupted"]
    _say(message() if callable(message) else message)
    sys.exit(128 + (_state["stopped_by"] or signal.SIGINT))


def _say(message: str) -> None:
    """Say a last word on stderr, which a closed terminal (SIGHUP) may have taken away."""
    try:
        console.print(message)
        sys.stderr.flush()
    except OSError:
        pass


def _exit_now() -> None:
    """End the process without the interpreter's teardown, which takes about a second once torch is imported
    (finalising its modules); only for a command that has closed its files and printed everything."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
