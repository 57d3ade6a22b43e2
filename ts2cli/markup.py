"""Text from outside ts2 (file names, error messages) made safe to print through rich."""

from __future__ import annotations

import unicodedata

from rich.markup import escape

# Control characters and the Unicode line and paragraph separators would break a table row or a one-line message.
_UNSEEN = {"Cc", "Zl", "Zp"}


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
