"""The cockpit header: workspace, branch, model, device, budget, state, experiments done and the best."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from tui import format as fmt
from tui.state import QUEUED, HeaderInfo

GAP = "  "


CONTAINMENT_WORDS = {
    "full": ("contained", ""),
    "network": ("network-isolated only", "bold yellow"),
    "none": ("NOT contained", "bold red"),
}
"""How the header names the runs' containment (agent.sandbox.containment levels)."""


def _piece(label: str, value: str, style: str = "bold") -> Text:
    text = Text(label, style="grey62") if label else Text()
    text.append(value, style=style)
    return text


def header_groups(header: HeaderInfo, n_done: int, gain: float | None) -> tuple[list[Text], list[Text]]:
    """The header's pieces: where and with what (first group), how it is going (second group)."""
    where: list[Text] = [_piece(" ", fmt.short_path(header.workspace or "—", 32))]
    if header.branch:
        where.append(_piece("⎇ ", header.branch, ""))
    if header.loading_model and header.loading_message == QUEUED:
        where.append(_piece("model ", f"{header.model or '—'} → {header.loading_model} next", "bold yellow"))
    elif header.loading_model:
        progress = header.loading_progress
        pct = f" {progress * 100:.0f}%" if progress is not None else ""
        where.append(_piece("model ", f"loading {header.loading_model}{pct}", "bold yellow"))
    else:
        where.append(_piece("model ", header.model or "—"))
    where.append(_piece("budget ", header.budget or "—", ""))
    where.append(_piece("on ", header.device or "—", ""))
    if header.containment:
        words, style = CONTAINMENT_WORDS.get(header.containment, (header.containment, "bold red"))
        where.append(_piece("runs ", words, style))

    state = Text(" ")
    state.append("● ", style=fmt.STATE_WORDS.get(header.state, ("", "grey62"))[1] or "grey62")
    state.append_text(fmt.state_text(header.state, header.pause_requested))
    if header.detail:
        detail = header.detail if len(header.detail) <= 60 else header.detail[:59] + "…"
        state.append(f" ({detail})", style="grey62")
    how: list[Text] = [state, _piece("", f"{n_done} done", "")]
    how.extend(trainer_pieces(header))
    best = _piece("best ", fmt.bpb(header.best_bpb))
    if header.best_exp_id is not None:
        best.append(f" (#{header.best_exp_id})", style="grey62")
    how.append(best)
    if gain is not None:
        piece = _piece("gain ", f"{gain:+.4f}", "green" if gain > 0 else "grey62")
        piece.append(f" vs baseline {fmt.bpb(header.baseline_bpb)}", style="grey62")
        how.append(piece)
    how.append(
        _piece(
            "review gate ", "on" if header.review_gate else "off", "bold cyan" if header.review_gate else ""
        )
    )
    return where, how


def trainer_pieces(header: HeaderInfo) -> list[Text]:
    """How busy the trainers are and how many experiments an hour they decide (once the engine says)."""
    pieces: list[Text] = []
    busy = header.busy_share
    if header.trainers > 1 or busy is not None:
        label = f"{header.trainers} trainers" if header.trainers > 1 else "trainer"
        piece = _piece("", label, "bold" if header.trainers > 1 else "")
        if busy is not None:
            piece.append(" busy ", style="grey62")
            piece.append(f"{busy * 100:.0f}%", style="bold" if busy >= 0.85 else "bold yellow")
        pieces.append(piece)
    if header.experiments_per_hour is not None:
        pieces.append(
            _piece("", f"{header.experiments_per_hour:.1f}", "bold") + Text(" exp/h", style="grey62")
        )
    return pieces


def wrap_pieces(pieces: list[Text], width: int) -> list[Text]:
    """Lay pieces out on lines of at most `width` cells, breaking only between pieces."""
    lines: list[Text] = []
    line = Text()
    for piece in pieces:
        if line.cell_len and line.cell_len + cell_len(GAP) + piece.cell_len > width:
            lines.append(line)
            line = Text(" ")
        elif line.cell_len:
            line.append(GAP)
        line.append_text(piece)
    if line.cell_len:
        lines.append(line)
    return lines


def header_text(header: HeaderInfo, n_done: int, gain: float | None, width: int) -> Text:
    """The whole header for a terminal `width` cells wide (two lines when there is room, more when not)."""
    where, how = header_groups(header, n_done, gain)
    lines = wrap_pieces(where, width) + wrap_pieces(how, width)
    return Text("\n").join(lines)


class CockpitHeader(Vertical):
    """Status lines that rewrap to the terminal's width, plus a progress bar while a model loads."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._shown: tuple[HeaderInfo, int, float | None] | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="header-text")
        yield ProgressBar(total=100, show_eta=False, id="model-progress")

    @property
    def text(self) -> str:
        """What the header says, as plain text."""
        return str(self.query_one("#header-text", Static).render())

    def show(self, header: HeaderInfo, n_done: int, gain: float | None) -> None:
        self._shown = (header, n_done, gain)
        self._draw()
        bar = self.query_one("#model-progress", ProgressBar)
        loading = header.loading_model is not None and header.loading_message != QUEUED
        bar.display = loading
        if loading:
            if header.loading_progress is None:
                bar.update(total=None)
            else:
                bar.update(total=100, progress=header.loading_progress * 100)

    def on_resize(self, event: events.Resize) -> None:
        self._draw()

    def _draw(self) -> None:
        if self._shown is None:
            return
        width = self.size.width or self.app.size.width
        self.query_one("#header-text", Static).update(header_text(*self._shown, width=max(20, width - 1)))
