"""The progress plot: val_bpb of every experiment, the keeps highlighted, the running best as a line."""

from __future__ import annotations

from tui.state import CockpitState
from tui.widgets.live import TitledPlot


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
