"""The progress pane: the gain over the baseline in noise margins, the kept changes, and the plot of val_bpb of
every experiment (the keeps highlighted, the running best as a line)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from agent.report import Kept, kept_changes, margin_words, times_margin
from tui import format as fmt
from tui.state import KEPT, CockpitState
from tui.widgets.live import TitledPlot


def gains_text(state: CockpitState) -> Text:
    """The gain over the baseline with its noise margin, then each kept change in order with its own gain."""
    header = state.header
    chain = [
        Kept(row.exp_id, row.status, row.val_bpb, row.description, row.decided_by == "user")
        for row in (state.rows[key] for key in sorted(state.rows))
        if row.status in KEPT and row.val_bpb is not None
    ]
    baseline, improvements = kept_changes(chain)
    if baseline is None:
        return Text("gain: no baseline yet", style="grey62")
    best = header.best_bpb
    text = Text()
    if best is None or not improvements:
        text.append(f"baseline {fmt.bpb(baseline)} · no change kept yet", style="grey62")
        if header.margin is not None:
            text.append(f" · margin {header.margin:.4f}", style="grey62")
        return text
    change = best - baseline
    text.append(f"{change:+.4f} bpb", style="bold green" if change < 0 else "bold")
    text.append(" vs baseline", style="grey62")
    text.append(margin_words(change, header.margin, header.margin_measured, digits=4), style="bold")
    for imp in improvements:
        text.append(f"\n  #{imp.exp_id:<4d}", style="bold")
        text.append(f"{fmt.bpb(imp.val_bpb)} ")
        text.append_text(fmt.delta(-imp.delta))
        ratio = times_margin(imp.delta, header.margin)
        text.append(f" {ratio:5.1f}×" if ratio is not None else "", style="grey62")
        text.append(f"  {imp.description}")
        if imp.by_user:
            text.append(" (kept by you)", style="grey62")
    return text


class ProgressGains(Static):
    """The gain in noise margins and the kept changes, above the progress plot."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._shown: Text | None = None

    def on_mount(self) -> None:
        self.show_state(None)

    def show_state(self, state: CockpitState | None) -> None:
        text = gains_text(state) if state is not None else Text("gain: no baseline yet", style="grey62")
        if self._shown is not None and text.plain == self._shown.plain and text.spans == self._shown.spans:
            return
        self._shown = text
        self.update(text)
        # The newest keep is the last line: keep it in view when the list is longer than the room.
        self.call_after_refresh(self.scroll_end, animate=False)


class ProgressPlot(TitledPlot):
    """val_bpb per experiment."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._points: tuple[object, ...] = ()

    def on_mount(self) -> None:
        self.show_state(None)

    def show_state(self, state: CockpitState | None) -> None:
        ids, values, keep_ids, keep_values, best_line = (
            state.progress_points() if state is not None else ([], [], [], [], [])
        )
        points = (tuple(ids), tuple(values), tuple(keep_ids))
        if points == self._points and state is not None:
            return
        self._points = points
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        # No legend (plotext draws it over the data): the title says what is what.
        self.title_text = "val_bpb · ◆ kept · • tried · ─ best so far"
        plt.xlabel("experiment")
        if ids:
            plt.plot(ids, best_line, color="green", marker="braille")
            plt.scatter(ids, values, color="gray", marker="•")
            if len(ids) <= 12:
                plt.xticks([float(i) for i in ids], [str(i) for i in ids])
        if keep_ids:
            plt.scatter(keep_ids, keep_values, color="green", marker="◆")
        self.changed()
