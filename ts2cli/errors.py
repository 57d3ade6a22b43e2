"""Errors that reach the user as one plain sentence (the CLI prints them without a traceback)."""


class Ts2Error(Exception):
    """A problem the user can act on. ``str(error)`` is shown as a single line; the exit code is ``exit_code``."""

    exit_code = 1


class WeightsNotFoundError(Ts2Error):
    """Model weights could not be found locally or downloaded."""


class CheckpointError(Ts2Error):
    """A checkpoint file is unreadable, or its keys/shapes do not match the model."""


class VideoDecodeError(Ts2Error):
    """One video could not be decoded. Indexing reports it and moves on."""


class LibraryError(Ts2Error):
    """The library directory is missing, locked, from another model, or from a newer ts2."""


def one_line(error: BaseException | str, limit: int = 200) -> str:
    """An exception's (or any) text on one line, whitespace collapsed, at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
