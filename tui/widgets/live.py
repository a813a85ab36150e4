"""The live run: the training log, tailed in a bounded view, and the loss curve against the best run's."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from rich.ansi import AnsiDecoder
from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.strip import Strip
from textual_plotext import PlotextPlot

from tui import format as fmt
from tui.internals import ReplaceableLog, plotext_theme_name
from tui.state import CockpitState, Curve, LiveRun
from tui.widgets.trainers import TrainerList

MAX_PLOT_POINTS = 120
"""A curve is thinned to about this many points before plotting (braille gives two per column)."""


def thin(
    xs: Sequence[int], ys: Sequence[float], limit: int = MAX_PLOT_POINTS
) -> tuple[list[int], list[float]]:
    """Every k-th point (and always the last) so that at most about `limit` remain."""
    if len(xs) <= limit:
        return list(xs), list(ys)
    step = -(-len(xs) // limit)
    idx = list(range(0, len(xs), step))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)
    return [xs[i] for i in idx], [ys[i] for i in idx]


class RunLog(ReplaceableLog):
    """The run's log: bounded, its last line replaceable (a `\\r` progress line); see `tui.internals`."""


def fit_title(title: str, width: int) -> str:
    """A title that plotext will show: it silently drops one wider than the plot."""
    room = max(8, width - 4)
    return title if len(title) <= room else title[: room - 1] + "…"


SGR = re.compile(r"\x1b\[([0-9;]*)m")
"""An ANSI select-graphic-rendition sequence: all that plotext writes besides text."""


@lru_cache(maxsize=1024)
def after_sgr(style: Style, codes: str) -> Style:
    """The style after one SGR sequence, as rich reads it (plotext writes a handful, so each is decoded once)."""
    decoder = AnsiDecoder()
    decoder.style = style
    decoder.decode_line(f"\x1b[{codes}m")
    return decoder.style


def ansi_strips(ansi: str, base: Style) -> list[Strip]:
    """Plotext's ANSI output as one strip per line, each style drawn over `base`.

    What `Text.from_ansi` and Textual's text rendering make of it, at a fraction of the cost: a plot is
    rebuilt up to four times a second while a training floods the log, and that conversion was a third
    of every rebuild.
    """
    strips: list[Strip] = []
    style = Style.null()  # as in Text.from_ansi, a style runs on across lines until reset
    for line in ansi.split("\n"):
        segments: list[Segment] = []
        position = 0
        for match in SGR.finditer(line):
            if match.start() > position:
                segments.append(Segment(line[position : match.start()], base + style))
            style = after_sgr(style, match.group(1))
            position = match.end()
        if position < len(line):
            segments.append(Segment(line[position:], base + style))
        strips.append(Strip(segments))
    return strips


class TitledPlot(PlotextPlot):
    """A plotext plot that builds only when its data or size changed, its title cut to fit.

    PlotextPlot builds the whole figure on every render and hands Textual a Text parsed from the ANSI that
    plotext writes (10-15 ms together); a render also happens when nothing but the surroundings changed
    (the log beside it scrolling, focus moving between panes). So the built figure is kept as strips,
    drawn line by line, and built again only when the data, the size or the theme changed.
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title_text = ""
        self._version = 0
        self._built_key: tuple[object, ...] | None = None
        self._strips: list[Strip] = []

    def changed(self) -> None:
        """The plotted data changed: build again at the next render."""
        self._version += 1
        self.refresh()

    def _figure_ansi(self) -> str:
        """The figure as plotext writes it, sized and themed as PlotextPlot.render does.

        textual-plotext names the theme only privately (`tui.internals.plotext_theme_name`);
        tests/test_tui_internals.py fails if these strips stop matching PlotextPlot's render.
        """
        width, height = self.size
        self.plt.plotsize(width, height)
        self.plt.theme(plotext_theme_name(self))
        self.plt.title(fit_title(self.title_text, width))
        return self.plt.build()

    def render_line(self, y: int) -> Strip:
        base = self.rich_style
        key = (self._version, self.size, self.app.theme, self.theme, base)
        if key != self._built_key:
            self._strips = ansi_strips(self._figure_ansi(), base) if self.size.area else []
            self._built_key = key
        if y >= len(self._strips):
            return Strip.blank(self.size.width, base)
        return self._strips[y]


class LossPlot(TitledPlot):
    """The running candidate's loss against the best run's loss at the same step."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._pending: tuple[Curve, Curve, str] | None = None
        self._drawn_lengths: tuple[int, int, int | None, int | None] = (-1, -1, None, None)
        self._title: str | None = None

    def on_mount(self) -> None:
        # Redraws are throttled: a plotext build costs milliseconds, a flood brings hundreds of points.
        self.set_interval(0.25, self._redraw)
        self._draw(Curve(), Curve(), "loss")

    def show(self, run: Curve, best: Curve, title: str) -> None:
        self._pending = (run, best, title)

    def flush(self) -> None:
        """Draw what is pending now rather than at the next tick."""
        self._redraw()

    def _redraw(self) -> None:
        if self._pending is None:
            return
        run, best, title = self._pending
        self._pending = None
        key = (len(run.steps), len(best.steps), run.exp_id, best.exp_id)
        if key == self._drawn_lengths and title == self._title:
            return
        self._drawn_lengths = key
        self._title = title
        self._draw(run, best, title)

    def _draw(self, run: Curve, best: Curve, title: str) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        self.title_text = title
        plt.xlabel("step")
        if best.steps and best.exp_id != run.exp_id:
            last = run.steps[-1] if run.steps else best.steps[-1]
            # The best run up to the candidate's current step, so both are compared at the same step.
            upto = [i for i, s in enumerate(best.steps) if s <= max(last, best.steps[0])]
            xs, ys = thin([best.steps[i] for i in upto], [best.losses[i] for i in upto])
            plt.plot(xs, ys, label=f"best #{best.exp_id}", color="green", marker="braille")
        if run.steps:
            xs, ys = thin(run.steps, run.losses)
            plt.plot(xs, ys, label=f"#{run.exp_id}", color="cyan", marker="braille")
        self.changed()


def run_title(run: LiveRun, best: Curve, trainers: int = 1) -> str:
    """The plot's title: which run (on which trainer when there are several), its latest loss, the best's
    loss at that step, throughput."""
    if run.exp_id is None:
        return "loss (no run yet)"
    at = f" at {run.promotion}" if run.promotion else ""
    parts = [f"#{run.exp_id}{at}" + (f" on trainer {run.slot + 1}" if trainers > 1 else "")]
    if run.curve.losses:
        step = run.curve.steps[-1]
        parts.append(f"step {step} loss {run.curve.losses[-1]:.3f}")
        # A promotion run trains to another budget: its loss at a step is not comparable to the best's.
        comparable = not run.promotion and best.exp_id not in (None, run.exp_id)
        best_loss = best.loss_at(step) if comparable else None
        if best_loss is not None:
            parts.append(f"best {best_loss:.3f}")
    parts.append(fmt.tokens_per_s(run.tokens_per_s))
    if run.finished:
        parts.append("finished")
    return " · ".join(parts)


class LivePane(Vertical):
    """The trainers (when there are several), the shown run's log above its loss plot."""

    def compose(self) -> ComposeResult:
        yield TrainerList(id="trainers")
        yield RunLog(max_lines=1000, id="run-log")
        yield LossPlot(id="loss-plot")

    @property
    def trainer_list(self) -> TrainerList:
        return self.query_one(TrainerList)

    @property
    def log_view(self) -> RunLog:
        return self.query_one(RunLog)

    @property
    def plot(self) -> LossPlot:
        return self.query_one(LossPlot)

    def write_lines(self, lines: list[str], replace_last: str | None, reset: bool = False) -> None:
        log = self.log_view
        follow = log.is_vertical_scroll_end or log.line_count == 0
        if reset:
            log.clear()
            follow = True
        if replace_last is not None:
            log.replace_last_line(replace_last)
        if lines:
            log.write_lines(lines)
        if follow:
            # The tail stays in view even when the write changed the layout (a scrollbar appearing).
            log.call_after_refresh(log.scroll_end, animate=False, x_axis=False)

    def show_run(self, run: LiveRun, best: Curve, trainers: int = 1) -> None:
        self.plot.show(run.curve, best, run_title(run, best, trainers))

    def show_trainers(self, state: CockpitState) -> None:
        self.trainer_list.show_state(state)
