"""How statuses, numbers and states read on screen: symbols and colours that survive a 256-colour terminal."""

from __future__ import annotations

from rich.text import Text

from agent.events import EngineState
from tui.state import STARTING

STATUS_STYLE: dict[str, tuple[str, str]] = {
    "baseline": ("◆", "bold blue"),
    "keep": ("✔", "bold green"),
    "discard": ("✘", "yellow"),
    "crash": ("✖", "bold red"),
    "oom": ("✖", "bold red"),
    "nan": ("✖", "bold red"),
    "invalid": ("✖", "red"),
    "timeout": ("◷", "dark_orange"),
    "interrupted": ("■", "grey62"),
    "rejected": ("⊘", "magenta"),
    "vetoed": ("⊘", "magenta"),
    "noop": ("=", "grey62"),
    "pending": ("…", "grey62"),
    "review": ("?", "bold cyan"),
    "running": ("▶", "bold cyan"),
}
"""Symbol and Rich style of each experiment status; named colours map cleanly onto 256 colours."""

STATE_WORDS: dict[str, tuple[str, str]] = {
    STARTING: ("starting", "grey62"),
    EngineState.IDLE: ("idle", "grey62"),
    EngineState.BASELINE: ("running · baseline", "bold green"),
    EngineState.PROPOSING: ("running · proposing", "bold green"),
    EngineState.RUNNING: ("running", "bold green"),
    EngineState.WAITING_REVIEW: ("waiting for review", "bold cyan"),
    EngineState.PAUSED: ("paused", "bold yellow"),
    EngineState.STOPPED: ("stopped", "bold red"),
}
"""How each engine state (and the cockpit's own 'starting') reads in the header; another reads as itself."""


def status_text(status: str, decided_by: str = "engine") -> Text:
    """The coloured symbol and word of a status; a user override is marked 'override'."""
    symbol, style = STATUS_STYLE.get(status, ("·", ""))
    text = Text(f"{symbol} {status}", style=style)
    if decided_by == "user" and status in ("keep", "discard"):
        text.append(" override", style="italic magenta")
    return text


def state_text(state: str, pause_requested: bool = False) -> Text:
    """The engine state in words."""
    words, style = STATE_WORDS.get(state, (state, ""))
    text = Text(words, style=style)
    if pause_requested and state != EngineState.PAUSED:
        text.append(" (pausing after this run)", style="yellow")
    return text


def bpb(value: float | None) -> str:
    """A val_bpb with the harness's precision, or a dash."""
    return "—" if value is None else f"{value:.4f}"


def delta(value: float | None) -> Text:
    """A difference of val_bpb: negative (better) in green, positive in red."""
    if value is None:
        return Text("—", style="grey62")
    if abs(value) < 5e-5:
        return Text("±0", style="grey62")
    return Text(f"{value:+.4f}", style="green" if value < 0 else "red")


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 100:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(round(value)), 60)
    return f"{minutes}m{secs:02d}s"


def size(num_bytes: int | float | None) -> str:
    """A file size in binary units."""
    if num_bytes is None:
        return "—"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def tokens_per_s(value: float | None) -> str:
    if value is None:
        return "— tok/s"
    if value >= 1000:
        return f"{value / 1000:.1f}k tok/s"
    return f"{value:.0f} tok/s"


def short_path(path: str, limit: int = 40) -> str:
    """A path shortened from the left to `limit` characters, with ~ for the home folder."""
    import os

    home = os.path.expanduser("~")
    if home and home != "/" and path.startswith(home):
        path = "~" + path[len(home) :]
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]
