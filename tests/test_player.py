"""`ts2 search --open` picks a player that can start at the matching moment."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ts2cli import player
from ts2cli.errors import Ts2Error
from ts2cli.player import open_at, player_command


def fake_programs(folder: Path, *names: str, body: str = "#!/bin/sh\nexit 0\n") -> str:
    for name in names:
        program = folder / name
        program.write_text(body)
        program.chmod(0o755)
    return str(folder)


def test_prefers_players_that_take_a_start_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_programs(tmp_path, "mpv", "vlc", "xdg-open"))
    assert player_command(Path("/v/a b.mp4"), 12.5) == ["mpv", "--start=12.50", "/v/a b.mp4"]
    os.remove(tmp_path / "mpv")
    assert player_command(Path("/v/a.mp4"), 3) == [str(tmp_path / "vlc"), "--start-time=3.00", "/v/a.mp4"]


def test_finds_vlc_where_its_installer_put_it(tmp_path, monkeypatch):
    app = tmp_path / "VLC.app" / "VLC"
    app.parent.mkdir()
    app.write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(player.VLC_APP_PATHS, "darwin", (str(tmp_path / "missing"), str(app)))
    assert player_command(Path("/v/a.mp4"), 4, platform="darwin") == [str(app), "--start-time=4.00", "/v/a.mp4"]


def test_desktop_default_when_no_player_takes_a_start_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_programs(tmp_path, "open", "xdg-open"))
    monkeypatch.setitem(player.VLC_APP_PATHS, "darwin", ())
    assert player_command(Path("/v/a.mp4"), 4, platform="darwin") == ["open", "/v/a.mp4"]
    assert player_command(Path("/v/a.mp4"), 4, platform="linux") == ["xdg-open", "/v/a.mp4"]
    monkeypatch.setitem(player.VLC_APP_PATHS, "win32", ())
    assert player_command(Path("/v/a.mp4"), 4, platform="win32") is None  # os.startfile


def test_no_player_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Ts2Error, match="No video player found"):
        player_command(Path("/v/a.mp4"), 0, platform="linux")


def test_a_player_that_cannot_start_is_a_clear_error(tmp_path, monkeypatch):
    # executable, but its interpreter does not exist: exec fails in the child and Popen raises in ts2
    monkeypatch.setenv("PATH", fake_programs(tmp_path, "mpv", body="#!/nonexistent/interpreter\n"))
    with pytest.raises(Ts2Error, match=r"Could not open /v/a\.mp4"):
        open_at(Path("/v/a.mp4"), 1.0)


def test_opens_the_video_in_the_player_and_returns(tmp_path, monkeypatch):
    log = tmp_path / "args.txt"
    monkeypatch.setenv("PATH", fake_programs(tmp_path, "mpv", body=f'#!/bin/sh\necho "$@" > {log}\n'))
    open_at(tmp_path / "clip.mp4", 2.5)
    for _ in range(200):
        if log.exists() and log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text().split() == ["--start=2.50", str(tmp_path / "clip.mp4")]
