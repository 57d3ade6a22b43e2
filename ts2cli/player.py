"""``ts2 search --open``: show a video at a given moment in whatever player the system has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import Ts2Error, one_line

VLC_APP_PATHS = {
    # Installers put VLC here without adding it to PATH.
    "darwin": ("/Applications/VLC.app/Contents/MacOS/VLC",),
    "win32": (r"C:\Program Files\VideoLAN\VLC\vlc.exe", r"C:\Program Files (x86)\VideoLAN\VLC\vlc.exe"),
}
DEFAULT_OPENERS = {"darwin": "open", "linux": "xdg-open"}


def player_command(path: Path, start: float, *, platform: str = sys.platform) -> list[str] | None:
    """The first available player, with a start time where the player takes one; None on Windows without one,
    where the file's default application opens it (``os.startfile``)."""
    seconds = f"{max(start, 0.0):.2f}"
    if shutil.which("mpv"):
        return ["mpv", f"--start={seconds}", str(path)]
    if vlc := _vlc(platform):
        return [vlc, f"--start-time={seconds}", str(path)]
    if shutil.which("ffplay"):
        return ["ffplay", "-ss", seconds, "-autoexit", str(path)]
    if platform == "win32":
        return None
    opener = DEFAULT_OPENERS.get(platform, "xdg-open")
    if shutil.which(opener):
        return [opener, str(path)]  # the desktop's default player cannot be told where to start
    raise Ts2Error(f"No video player found (tried mpv, vlc, ffplay, {opener}); install one to use --open.")


def _vlc(platform: str) -> str | None:
    return shutil.which("vlc") or next((p for p in VLC_APP_PATHS.get(platform, ()) if os.path.isfile(p)), None)


def open_at(path: Path, start: float) -> None:
    """Start the player and return at once; a player that cannot be started is a ``Ts2Error``."""
    command = player_command(path, start)
    try:
        if command is None:
            os.startfile(path)  # type: ignore[attr-defined]  # Windows only
        else:
            # Detached from the terminal: ts2 exits at once, and the player must neither read its keystrokes
            # nor close with it.
            quiet = subprocess.DEVNULL
            subprocess.Popen(command, stdin=quiet, stdout=quiet, stderr=quiet, start_new_session=True)
    except OSError as exc:
        raise Ts2Error(f"Could not open {path}: {one_line(exc)}") from exc
