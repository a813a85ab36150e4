"""Every place the cockpit relies on a private part of Textual or textual-plotext, each with its reason.

Written against textual 8.2.8 and textual-plotext 1.0.1; pyproject.toml keeps both below their next major
(`textual>=8.2.8,<9`, `textual-plotext>=1.0.1,<2`). The widgets import these and touch no other private
part. tests/test_tui_internals.py has one test per override, each failing when what it relies on changes.

On an upgrade, run `pytest tests/test_tui_internals.py tests/test_tui_app.py tests/test_tui_snapshots.py`,
then for each override check what its test names:

1. `FocusCachedTable` (the timeline keeps its rendered rows across focus moves): `DataTable.
   notify_style_update` still clears exactly the caches listed in `DATATABLE_RESTYLE_CLEARS`, nothing
   between DataTable and Widget restyles, and the render caches kept here (`DATATABLE_KEPT_CACHES`) are
   still keyed by the base style and `_pseudo_class_state`. A new cache must be cleared here, or kept only
   if it is keyed by both.
2. `ReplaceableLog` (a `\\r` progress line replaces the last line): `Log._lines` is still the list behind
   `Log.lines`, and `Log.refresh_lines` still drops the render cache of those lines. If `Log.write_lines`
   stops repainting stale lines once `max_lines` prunes, its extra `refresh()` can go.
3. `SteadyFooter` (no recompose when a focus move leaves the keys as they were): `Footer._bindings_ready`
   is still the flag `Footer.compose` waits for and `bindings_changed` sets, and `Footer.compose` still
   builds its keys from `screen.active_bindings` alone.
4. `QuietFocusScreen` (a focus move does not repaint the whole screen): `Screen.focused` is still the
   reactive whose `_watch_focused` refreshes the bindings, and still repaints the screen (else drop it).
5. `plotext_theme_name` (the plots build plotext's figure themselves): `PlotextPlot.
   _get_plotext_theme_name` still names the theme `PlotextPlot.render` sets and `_register_theme` registers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self, TypeVar

from textual.binding import Binding
from textual.reactive import Reactive
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Log
from textual_plotext import PlotextPlot

TEXTUAL_VERSIONS = {"textual": "8.2.8", "textual-plotext": "1.0.1"}
"""The versions these overrides were written against and checked with."""

CellType = TypeVar("CellType")
ScreenResult = TypeVar("ScreenResult")

# ---- 1. DataTable: keep the rendered rows across focus moves ------------------------------------------

DATATABLE_RESTYLE_CLEARS = frozenset(
    {
        "_row_render_cache",
        "_cell_render_cache",
        "_row_renderable_cache",
        "_line_cache",
        "_styles_cache",
        "_get_styles_to_render_cell",
    }
)
"""What `DataTable.notify_style_update` clears (textual 8.2.8)."""

DATATABLE_KEPT_CACHES = frozenset({"_row_render_cache", "_cell_render_cache", "_line_cache"})
"""What `FocusCachedTable` keeps on a restyle: each is keyed by the base style and the pseudo-class state.
(`_row_renderable_cache` is kept too: it holds the cells' renderables, keyed by row and update count,
before any style is applied.)"""


class FocusCachedTable(DataTable[CellType]):
    """A DataTable that keeps its rendered cells, rows and lines when it is restyled for a focus move.

    DataTable drops every rendered cell, row and line on any restyle, and each focus move restyles it (its
    look depends on :focus): a full re-render, ~1-2 ms a row. Those caches are keyed by the base style and
    the focus state, so both looks can stay cached; what is not keyed by them (the lines already composed,
    the component styles) is dropped as DataTable does, and a new theme (which may keep the base style but
    not the cursor's) drops everything.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._styled_theme: str | None = None

    def notify_style_update(self) -> None:
        if self.app.theme != self._styled_theme:
            self._styled_theme = self.app.theme
            super().notify_style_update()
            return
        Widget.notify_style_update(self)
        self._styles_cache.clear()
        self._get_styles_to_render_cell.cache_clear()
        self.refresh()


# ---- 2. Log: replace the last line ---------------------------------------------------------------------


class ReplaceableLog(Log):
    """A bounded log whose last line can be replaced (a `\\r` progress line), and that shows its newest
    lines once full."""

    def write_lines(self, lines: Iterable[str], scroll_end: bool | None = None) -> Self:
        super().write_lines(lines, scroll_end)
        # Log.write_lines repaints the new lines at the index they had before the oldest lines were pruned
        # to max_lines: once the log is full, the view would go on showing stale lines.
        self.refresh()
        return self

    def replace_last_line(self, text: str) -> None:
        """Overwrite the last line (the one before a trailing empty line), or write it if there is none."""
        # Log has no public way to overwrite a line; its line store is a plain list, and refresh_lines
        # drops the rendered copy of the line.
        if not self._lines:
            self.write_line(text)
            return
        index = len(self._lines) - 1
        if self._lines[index] == "" and index > 0:
            index -= 1
        self._lines[index] = text
        self.refresh_lines(index)


# ---- 3. Footer: recompose only when the keys shown change ---------------------------------------------


class SteadyFooter(Footer):
    """A Footer that rebuilds its keys only when the keys shown change.

    Textual's Footer recomposes all its keys whenever the focus moves; that restyles a dozen widgets (tens
    of ms on a busy CPU) even when the keys shown are the same. This one compares first.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: tuple[tuple[str, Binding, bool, str], ...] | None = None

    def bindings_changed(self, screen: Screen[Any]) -> None:
        shown = tuple(
            (key, active.binding, active.enabled, active.tooltip)
            for key, active in screen.active_bindings.items()
            if active.binding.show or key == screen.app.COMMAND_PALETTE_BINDING
        )
        # Before the first call Footer has composed nothing: its _bindings_ready flag says so.
        if shown == self._shown and self._bindings_ready:
            return
        self._shown = shown
        super().bindings_changed(screen)


# ---- 4. Screen.focused without a full repaint ---------------------------------------------------------


class QuietFocusScreen(Screen[ScreenResult]):
    """A screen whose focus moves repaint only the widgets that gain or lose the focus.

    Subclasses refresh what depends on the focus in `watch_focused` (Screen's own `_watch_focused`, which
    refreshes the bindings, still runs).
    """

    focused: Reactive[Widget | None] = Reactive(None, repaint=False)
    """As Screen.focused, without its repaint of the whole screen on every focus move (a full frame, tens of
    ms on a slow CPU)."""


# ---- 5. plotext's theme for a Textual theme -----------------------------------------------------------


def plotext_theme_name(plot: PlotextPlot) -> str:
    """The plotext theme that `PlotextPlot.render` would set on `plot`'s figure for the app's theme.

    The plots build plotext's figure themselves (see `TitledPlot`); textual-plotext names the theme only
    in a private method.
    """
    return plot._get_plotext_theme_name(plot.app.theme)
