"""Text from outside ts2 (file names, error messages) made safe to print through rich, and stdout without the
blanks rich pads table rows with."""

from __future__ import annotations

import re
import sys
import unicodedata

from rich.markup import escape

# Control characters and the Unicode line and paragraph separators would break a table row or a one-line message.
_UNSEEN = {"Cc", "Zl", "Zp"}
_SPACES_BEFORE_NEWLINE = re.compile(r" +\n")


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``number`` and ``noun`` in words: "1 video", "1,204 videos"."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def shown(text: str) -> str:
    """``text`` with rich markup escaped ("[bold]" in a file name is not markup) and each control character written
    as its escape ("\\n", "\\x1b"), as a file name that holds a newline or a terminal escape is printed."""
    if any(unicodedata.category(char) in _UNSEEN for char in text):
        text = "".join(_visible(char) for char in text)
    return escape(text)


def _visible(char: str) -> str:
    if unicodedata.category(char) not in _UNSEEN:
        return char
    return char.encode("unicode_escape").decode("ascii")


class TrimmedStdout:
    """``sys.stdout`` (whichever it is at the time), without the spaces at the ends of lines: rich pads every row of
    a table to the table's width, which a file or a pipe then holds as trailing blanks."""

    def __init__(self) -> None:
        self._spaces = ""  # held back until the rest of their line shows whether they end it

    def write(self, text: str) -> int:
        text, written = self._spaces + text, len(text)
        body = text.rstrip(" ")
        self._spaces = text[len(body) :]
        sys.stdout.write(_SPACES_BEFORE_NEWLINE.sub("\n", body))
        return written

    def flush(self) -> None:
        sys.stdout.write(self._spaces)  # spaces that no newline followed are content
        self._spaces = ""
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"
