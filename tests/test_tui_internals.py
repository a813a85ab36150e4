"""One test per override in tui/internals.py: each fails when the private part of Textual or textual-plotext
it relies on changes, so that an upgrade is checked rather than guessed (see that module's docstring)."""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from rich.console import Console
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.reactive import Reactive
from textual.renderables.styled import Styled
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, DataTable, Footer, Log
from textual_plotext import PlotextPlot
from tui_helpers import async_test

from tui.internals import (
    DATATABLE_KEPT_CACHES,
    DATATABLE_RESTYLE_CLEARS,
    TEXTUAL_VERSIONS,
    FocusCachedTable,
    QuietFocusScreen,
    ReplaceableLog,
    SteadyFooter,
    plotext_theme_name,
)
from tui.widgets.live import TitledPlot

ROOT = Path(__file__).resolve().parent.parent


def test_the_pins_hold_the_checked_versions_and_exclude_the_next_major() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {req.name: req.specifier for req in map(Requirement, dependencies)}
    for name, checked in TEXTUAL_VERSIONS.items():
        major = int(checked.split(".")[0])
        assert checked in pins[name] and version(name) in pins[name], (name, pins[name])
        assert f"{major + 1}.0.0" not in pins[name], (
            f"{name} must stay below {major + 1}: its internals change"
        )


# ---- 1. FocusCachedTable --------------------------------------------------------------------------------


def cache_key_source(source: str, cache: str) -> str:
    """The tuple a DataTable cache is keyed by, as written in DataTable's source."""
    use = re.search(rf"self\.{cache}\[(\w+)\]", source)
    assert use is not None, f"DataTable no longer indexes {cache}"
    assignments = list(
        re.finditer(rf"{use.group(1)}(?::[^=\n]*)? = \((.*?)\n\s*\)", source[: use.start()], re.S)
    )
    assert assignments, f"the key of {cache} is no longer a tuple built before its use"
    return assignments[-1].group(1)


def test_datatable_restyles_as_the_focus_cached_table_assumes() -> None:
    restyle = inspect.getsource(DataTable.notify_style_update)
    cleared = set(re.findall(r"self\.(\w+)\.(?:clear|cache_clear)\(\)", restyle))
    assert cleared == DATATABLE_RESTYLE_CLEARS, (
        "DataTable clears other caches on a restyle: see FocusCachedTable"
    )
    between = DataTable.__mro__[1 : DataTable.__mro__.index(Widget)]
    assert [cls for cls in between if "notify_style_update" in vars(cls)] == []
    source = inspect.getsource(DataTable)
    for cache in DATATABLE_KEPT_CACHES:
        key = cache_key_source(source, cache)
        assert "base_style" in key and "self._pseudo_class_state" in key, (cache, key)


class TableApp(App[None]):
    def compose(self) -> ComposeResult:
        yield FocusCachedTable[str](cursor_type="row", zebra_stripes=True, id="table")
        yield Button("elsewhere", id="elsewhere")

    def on_mount(self) -> None:
        table = self.query_one(FocusCachedTable)
        table.add_columns("#", "status", "description")
        for i in range(12):
            table.add_row(str(i), "keep" if i % 3 else "discard", f"idea number {i}")


@async_test
async def test_the_table_draws_focus_moves_from_its_caches_and_draws_them_right() -> None:
    app = TableApp()
    async with app.run_test(size=(60, 16)) as pilot:
        table = app.query_one(FocusCachedTable)
        table.focus()
        await pilot.pause()
        app.query_one(Button).focus()
        await pilot.pause()
        table.focus()  # both looks rendered once
        await pilot.pause()
        render_lines = app.console.render_lines
        cells_rendered: list[object] = []

        def counting(renderable: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(renderable, Styled):  # how DataTable renders a cell
                cells_rendered.append(renderable)
            return render_lines(renderable, *args, **kwargs)

        app.console.render_lines = counting  # type: ignore[method-assign]
        try:
            app.query_one(Button).focus()
            await pilot.pause()
            table.focus()
            await pilot.pause()
            assert not cells_rendered, "a focus move re-rendered the cells"
        finally:
            app.console.render_lines = render_lines  # type: ignore[method-assign]

        def drawn_as_when_rendered_afresh() -> None:
            kept = [list(strip) for strip in table.render_lines(table.size.region)]
            DataTable.notify_style_update(table)  # what Textual does: drop every rendered cell
            assert kept == [list(strip) for strip in table.render_lines(table.size.region)]

        drawn_as_when_rendered_afresh()  # focused, from the caches
        app.query_one(Button).focus()
        await pilot.pause()
        drawn_as_when_rendered_afresh()  # blurred, from the caches
        app.theme = "nord"
        await pilot.pause()
        drawn_as_when_rendered_afresh()


# ---- 2. ReplaceableLog ----------------------------------------------------------------------------------


class LogApp(App[None]):
    def compose(self) -> ComposeResult:
        yield ReplaceableLog(max_lines=30)


def shown(log: Log) -> list[str]:
    return [log.render_line(y).text.rstrip() for y in range(log.size.height)]


def test_log_keeps_its_lines_in_the_list_the_override_edits() -> None:
    log = Log()
    assert log.lines is log._lines and isinstance(log._lines, list)
    refresh = inspect.getsource(Log.refresh_lines)
    assert "self._render_line_cache.discard(y)" in refresh, (
        "Log.refresh_lines no longer drops its rendered lines"
    )


@async_test
async def test_a_replaced_line_is_shown_and_a_full_log_shows_its_newest_lines() -> None:
    app = LogApp()
    async with app.run_test(size=(40, 8)) as pilot:
        log = app.query_one(ReplaceableLog)
        log.write_lines(["one", "10%"])
        await pilot.pause()
        assert shown(log)[:2] == ["one", "10%"]
        log.replace_last_line("20%")
        await pilot.pause()
        assert list(log.lines) == ["one", "20%"]
        assert shown(log)[:2] == ["one", "20%"]
        assert "20%" in app.export_screenshot() and "10%" not in app.export_screenshot()
        for batch in range(6):  # past max_lines, so the oldest lines are pruned on every write
            log.write_lines([f"line-{batch * 12 + i}" for i in range(12)])
            await pilot.pause()
        assert list(log.lines) == [f"line-{i}" for i in range(42, 72)]
        screen = app.export_screenshot()
        assert "line-71" in screen and "line-59" not in screen


# ---- 3. SteadyFooter -------------------------------------------------------------------------------------


class Keyed(Button):
    BINDINGS = [Binding("x", "extra", "Extra")]

    def action_extra(self) -> None:
        pass


class FooterApp(App[None]):
    BINDINGS = [Binding("p", "noop", "Pause")]

    def __init__(self, footer: Footer) -> None:
        super().__init__()
        self.footer = footer

    def compose(self) -> ComposeResult:
        yield Button("first", id="first")
        yield Button("second", id="second")
        yield Keyed("keyed", id="keyed")
        yield self.footer

    def action_noop(self) -> None:
        pass


def test_footer_composes_from_the_active_bindings_once_its_flag_is_set() -> None:
    assert isinstance(vars(Footer)["_bindings_ready"], Reactive)
    assert list(Footer().compose()) == []  # nothing until bindings_changed sets the flag
    assert "self._bindings_ready = True" in inspect.getsource(Footer.bindings_changed)
    compose = inspect.getsource(Footer.compose)
    assert set(re.findall(r"self\.(\w+)", compose)) <= {
        "_bindings_ready",
        "screen",
        "styles",
        "app",
        "show_command_palette",
    }
    assert set(re.findall(r"self\.screen\.(\w+)", compose)) == {"active_bindings"}


async def recomposes_on_focus_moves(footer: Footer) -> tuple[int, int, str]:
    """How often `footer` recomposes: moving between buttons with the same keys, then to one with more."""
    app = FooterApp(footer)
    async with app.run_test(size=(80, 10)) as pilot:
        app.query_one("#first").focus()
        await pilot.pause()
        recomposed: list[int] = []
        recompose = footer.recompose

        async def counting() -> None:
            recomposed.append(1)
            await recompose()

        footer.recompose = counting  # type: ignore[method-assign]
        app.query_one("#second").focus()
        await pilot.pause()
        same = len(recomposed)
        app.query_one("#keyed").focus()
        await pilot.pause()
        return same, len(recomposed) - same, app.export_screenshot()


@async_test
async def test_the_steady_footer_recomposes_only_when_the_keys_change() -> None:
    plain_same, _, _ = await recomposes_on_focus_moves(Footer())
    assert plain_same >= 1, "Footer no longer recomposes on every focus move: SteadyFooter can go"
    same, changed, screen = await recomposes_on_focus_moves(SteadyFooter())
    assert (same, changed) == (0, 1)
    assert "Extra" in screen and "Pause" in screen


# ---- 4. QuietFocusScreen ---------------------------------------------------------------------------------


class TwoButtons(Screen[None]):
    def compose(self) -> ComposeResult:
        yield Button("first", id="first")
        yield Button("second", id="second")


class QuietTwoButtons(QuietFocusScreen[None]):
    compose = TwoButtons.compose


async def focus_move(screen: Screen[None]) -> tuple[list[dict[str, Any]], int]:
    """The screen's own reactive refreshes and the binding refreshes that one focus move causes."""
    app = App[None]()
    async with app.run_test(size=(40, 10)) as pilot:
        await app.push_screen(screen)
        screen.query_one("#first").focus()
        await pilot.pause()
        refreshes: list[dict[str, Any]] = []
        refresh = screen.refresh

        def recording(*args: Any, **kwargs: Any) -> Any:
            if set(kwargs) == {"repaint", "layout", "recompose"}:  # how a reactive refreshes its owner
                refreshes.append(kwargs)
            return refresh(*args, **kwargs)

        screen.refresh = recording  # type: ignore[method-assign]
        published: list[object] = []
        screen.bindings_updated_signal.subscribe(screen, published.append)
        screen.query_one("#second").focus()
        await pilot.pause()
        assert screen.focused is screen.query_one("#second")
        screen.refresh = refresh  # type: ignore[method-assign]
        return refreshes, len(published)


def test_screen_focused_is_the_reactive_the_override_replaces() -> None:
    focused = vars(Screen)["focused"]
    assert isinstance(focused, Reactive) and focused._repaint, (
        "Screen.focused no longer repaints: drop the override"
    )
    assert "refresh_bindings" in inspect.getsource(Screen._watch_focused)


@async_test
async def test_a_quiet_focus_move_does_not_repaint_the_screen_but_refreshes_the_bindings() -> None:
    plain, plain_bindings = await focus_move(TwoButtons())
    assert plain == [{"repaint": True, "layout": False, "recompose": False}]
    quiet, quiet_bindings = await focus_move(QuietTwoButtons())
    assert quiet == []
    assert quiet_bindings == plain_bindings >= 1  # Screen._watch_focused still runs


# ---- 5. plotext_theme_name -------------------------------------------------------------------------------


class PlotApp(App[None]):
    def compose(self) -> ComposeResult:
        yield TitledPlot()


@async_test
async def test_the_plot_draws_what_plotext_writes_with_the_theme_textual_plotext_names() -> None:
    assert hasattr(PlotextPlot, "_get_plotext_theme_name"), "textual-plotext changed: see plotext_theme_name"
    app = PlotApp()
    async with app.run_test(size=(60, 16)) as pilot:
        plot = app.query_one(TitledPlot)
        assert plotext_theme_name(plot) == f"textual-auto-{app.theme}"
        plot.title_text = "a curve"
        plot.plt.plot([1, 2, 3, 4], [3.0, 1.0, 2.0, 1.5], color="cyan", marker="braille")
        plot.changed()
        await pilot.pause()
        strips = [plot.render_line(y) for y in range(plot.size.height)]
        rendered = PlotextPlot.render(plot)  # textual-plotext's own: a Text parsed from the same figure
        assert isinstance(rendered, Text)
        lines = rendered.split("\n")
        assert [strip.text for strip in strips] == [line.plain for line in lines]
        assert any("a curve" in line.plain for line in lines)
        console = Console()
        for strip, line in zip(strips, lines, strict=True):
            offset = 0
            for segment in strip:
                for _ in segment.text:
                    assert segment.style == plot.rich_style + line.get_style_at_offset(console, offset)
                    offset += 1
