"""The progress plot: val_bpb of every experiment, the keeps highlighted, the running best as a line."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from tui.state import CockpitState


class ProgressPlot(PlotextPlot):
    """val_bpb per experiment."""

    def on_mount(self) -> None:
        self._points: tuple[object, ...] = ()
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
        plt.title("val_bpb per experiment (lower is better)")
        plt.xlabel("experiment")
        if ids:
            plt.scatter(ids, values, label="tried", color="grey", marker="•")
            plt.plot(ids, best_line, label="best so far", color="green")
        if keep_ids:
            plt.scatter(keep_ids, keep_values, label="kept", color="green", marker="◆")
        self.refresh()
