"""Smoke test of the real `autoresearch` command in a real terminal (tmux): welcome, start, quit cleanly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One private tmux server (its own socket) running one command in a fixed-size window."""

    def __init__(self, command: str, env: dict[str, str], width: int = 100, height: int = 30) -> None:
        self.socket = f"ar-{uuid.uuid4().hex[:8]}"
        self.env = env
        self._tmux("new-session", "-d", "-s", "main", "-x", str(width), "-y", str(height), command)

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, env=self.env, check=True
        )
        return result.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "main")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "main", *keys)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """Wait until the regular expression `pattern` matches the screen."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} did not appear within {timeout:.0f} s; the screen was:\n{screen}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, env=self.env)


def test_the_cockpit_welcomes_starts_and_quits_cleanly(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    status_file = tmp_path / "exit-status"
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), TERM="xterm-256color", AUTORESEARCH_BUDGET="8")
    command = (
        f"cd {ROOT} && {sys.executable} -m agent.cli --workspace {workspace} --model smollm2-135m; "
        f"echo $? > {status_file}; sleep 30"
    )
    tmux = Tmux(command, env, width=120, height=40)
    try:
        started = time.monotonic()
        tmux.wait_for("Welcome to autoresearch", 30)
        first_frame = time.monotonic() - started
        tmux.keys("Enter")
        screen = tmux.wait_for("running · baseline", 60)
        assert "smollm2-135m" in screen and "budget 8 s" in screen
        tmux.wait_for(r"step\s+\d+ \| loss", 120)  # the baseline's training log is live
        tmux.keys("q")
        tmux.wait_for(r"Quit autoresearch\?", 15)
        tmux.keys("y")
        deadline = time.monotonic() + 60
        while not status_file.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert status_file.exists(), "the cockpit did not exit within 60 s of quitting:\n" + tmux.screen()
        assert status_file.read_text().strip() == "0"
        assert "Traceback" not in tmux.screen()
    finally:
        tmux.close()
    # Quitting stopped the run and recorded it: the baseline run in flight is interrupted, nothing runs on.
    from agent.ledger import Ledger
    from agent.workspace import Workspace

    ledger = Ledger(Workspace.open(workspace).ledger_path)
    try:
        runs = ledger.runs(0)
        assert runs and runs[-1].outcome == "interrupted"
    finally:
        ledger.close()
    assert first_frame < 30
