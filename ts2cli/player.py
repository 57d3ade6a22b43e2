"""``ts2 search --open``: show a video at a given moment in whatever player the system has."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .errors import Ts2Error


def player_command(path: Path, start: float) -> list[str]:
    """The first available player, with a start time where the player takes one."""
    seconds = f"{max(start, 0.0):.2f}"
    if shutil.which("mpv"):
        return ["mpv", f"--start={seconds}", str(path)]
    if shutil.which("vlc"):
        return ["vlc", f"--start-time={seconds}", str(path)]
    if shutil.which("ffplay"):
        return ["ffplay", "-ss", seconds, "-autoexit", str(path)]
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(opener):
        return [opener, str(path)]  # the desktop's default player cannot be told where to start
    raise Ts2Error("No video player found (tried mpv, vlc, ffplay, xdg-open); install one to use --open.")


def open_at(path: Path, start: float) -> None:
    subprocess.Popen(player_command(path, start), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
