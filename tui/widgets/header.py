"""The cockpit header: workspace, branch, model, device, budget, state, experiments done and the best."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from tui import format as fmt
from tui.state import HeaderInfo


def header_lines(header: HeaderInfo, n_done: int, gain: float | None) -> tuple[Text, Text]:
    """The two header lines, as Rich text."""
    top = Text()
    top.append(" autoresearch ", style="bold reverse")
    top.append("  ")
    top.append(fmt.short_path(header.workspace or "—", 32), style="bold")
    if header.branch:
        top.append("  ⎇ ", style="grey62")
        top.append(header.branch)
    top.append("  model ", style="grey62")
    if header.loading_model:
        progress = header.loading_progress
        pct = f" {progress * 100:.0f}%" if progress is not None else ""
        top.append(f"loading {header.loading_model}{pct}", style="bold yellow")
    else:
        top.append(header.model or "—", style="bold")
    top.append("  budget ", style="grey62")
    top.append(header.budget or "—")
    top.append("  on ", style="grey62")
    top.append(header.device or "—")

    bottom = Text(" ")
    bottom.append("● ", style=fmt.STATE_WORDS.get(header.state, ("", "grey62"))[1] or "grey62")
    bottom.append_text(fmt.state_text(header.state, header.pause_requested))
    bottom.append("  ·  ", style="grey62")
    bottom.append(f"{n_done} done")
    bottom.append("  ·  best ", style="grey62")
    bottom.append(fmt.bpb(header.best_bpb), style="bold")
    if header.best_exp_id is not None:
        bottom.append(f" (#{header.best_exp_id})", style="grey62")
    if gain is not None:
        bottom.append("  gain ", style="grey62")
        bottom.append(f"{gain:+.4f}", style="green" if gain > 0 else "grey62")
        bottom.append(f" vs baseline {fmt.bpb(header.baseline_bpb)}", style="grey62")
    bottom.append("  ·  review gate ", style="grey62")
    bottom.append("on" if header.review_gate else "off", style="bold cyan" if header.review_gate else "")
    return top, bottom


class CockpitHeader(Vertical):
    """Two lines of status, plus a progress bar while a model loads."""

    def compose(self) -> ComposeResult:
        yield Static(id="header-top")
        yield Static(id="header-bottom")
        yield ProgressBar(total=100, show_eta=False, id="model-progress")

    def show(self, header: HeaderInfo, n_done: int, gain: float | None) -> None:
        top, bottom = header_lines(header, n_done, gain)
        self.query_one("#header-top", Static).update(top)
        self.query_one("#header-bottom", Static).update(bottom)
        bar = self.query_one("#model-progress", ProgressBar)
        bar.display = header.loading_model is not None
        if header.loading_model is not None:
            if header.loading_progress is None:
                bar.update(total=None)
            else:
                bar.update(total=100, progress=header.loading_progress * 100)
