"""`ts2 search --open` picks a player that can start at the matching moment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ts2cli.errors import Ts2Error
from ts2cli.player import player_command


def fake_programs(folder: Path, *names: str) -> str:
    for name in names:
        program = folder / name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return str(folder)


def test_prefers_players_that_take_a_start_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_programs(tmp_path, "mpv", "vlc", "xdg-open"))
    assert player_command(Path("/v/a b.mp4"), 12.5) == ["mpv", "--start=12.50", "/v/a b.mp4"]
    os.remove(tmp_path / "mpv")
    assert player_command(Path("/v/a.mp4"), 3) == ["vlc", "--start-time=3.00", "/v/a.mp4"]


def test_no_player_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Ts2Error, match="No video player found"):
        player_command(Path("/v/a.mp4"), 0)
