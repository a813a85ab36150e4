"""The cockpit app: `create_app` (one factory for the CLI and the tests) and `run_app` (the CLI's entry)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from agent import known_noise
from agent.budget import Budget
from agent.commands import (
    Approve,
    Command,
    Override,
    Pause,
    Reapply,
    ReloadProgram,
    Resume,
    SetGate,
    SetProposer,
    SetTrainers,
    Shutdown,
    StopRun,
    UseModel,
    Veto,
)
from agent.config import EngineConfig
from agent.events import EngineSnapshot, EngineState, Event, EventSink, ReviewRequested
from agent.ledger import Ledger
from agent.promotion import read_plan
from agent.proposals import Edit, Proposal, Proposer, model_name
from agent.researcher.optuna_search import SAMPLERS, STUDY_FILE, OptunaSearch, shown_name
from agent.researcher.random_search import MODEL_NAME as RANDOM_SEARCH
from agent.researcher.random_search import RandomSearch
from tui.bridge import EventBridge
from tui.protocols import EngineLike, LedgerLike
from tui.screens import (
    HelpScreen,
    MainScreen,
    ModelChoice,
    ModelPickerScreen,
    ProgramEditorScreen,
    ProposalEditorScreen,
    QuitScreen,
    ReviewScreen,
    TrainersScreen,
    WelcomeScreen,
)
from tui.screens.models import discover_choices
from tui.screens.review import ReviewChoice
from tui.state import (
    OPENING_WORKSPACE,
    QUEUED,
    CockpitState,
    Curve,
    ExperimentRow,
    HeaderInfo,
    Update,
    parse_curve,
    row_from_experiment,
)

DRAIN_INTERVAL = 0.1
"""Seconds between two drains of the engine's events: ~10 batches a second whatever the event rate."""

MAX_LOG_LINES = 1000
"""The log view keeps this many lines (and a batch never writes more)."""

SNAPSHOT_MIN_INTERVAL = 0.5
"""Engine snapshots (which read the ledger) are taken at most this often."""


@dataclass
class OpenedEngine:
    """What opening a workspace gives the app: the engine, whether the workspace is new, and where it lives."""

    engine: EngineLike
    created: bool
    """The workspace is new, or nothing was ever run in it: the welcome is shown."""
    workspace: Path
    budget: str
    model: str | None = None


EngineBuilder = Callable[[EventSink], OpenedEngine]
"""Opens a workspace and makes an engine whose sink is the given one; called in a worker thread."""


def promotion_marks(ledger: LedgerLike) -> dict[int, str]:
    """Each keep's promotion marks as the workspace's ledger holds them (none without a promotion, or from a
    ledger that is not the real one)."""
    if not isinstance(ledger, Ledger):
        return {}
    plan = read_plan(ledger)
    return plan.marks() if plan is not None else {}


def default_engine_builder(
    workspace: Path,
    budget: Budget | None,
    model: str | None,
    *,
    seed: int | None = None,
    proposer: Proposer | None = None,
    config: EngineConfig | None = None,
    scheduling: dict[str, Any] | None = None,
) -> EngineBuilder:
    """The real thing: open (or create) the workspace, make the model proposer, build the engine.

    Every import of the core happens inside, in the worker: git, the model and torch never delay the
    first frame.
    """

    def build(sink: EventSink) -> OpenedEngine:
        from agent.session import open_engine
        from agent.workspace import Workspace

        cfg = config or EngineConfig(budget=budget, noise_record=known_noise.in_cache(), **(scheduling or {}))
        # A bad model fails here, before a new workspace is made for nothing.
        local_model = None
        if proposer is None:
            from agent.researcher.proposer import make_proposer

            local_model = make_proposer(model, seed)
        created = not Workspace.is_workspace(workspace)
        ws = Workspace.open_or_init(workspace)
        chosen_proposer = proposer
        if (
            local_model is not None
        ):  # the default researcher: the model and CMA-ES, its study in the workspace
            from agent.researcher.hybrid import hybrid

            chosen_proposer = hybrid(local_model, ws.state_dir, seed)
        assert chosen_proposer is not None
        engine = open_engine(ws, chosen_proposer, cfg, sink)
        # A workspace left at the welcome (nothing ever ran) still gets the welcome next time.
        fresh = created or engine.ledger.count() == 0
        return OpenedEngine(
            engine=engine,
            created=fresh,
            workspace=ws.path,
            budget=engine.budget.describe(),
            model=model_name(chosen_proposer) or model,
        )

    return build


class CockpitApp(App[int]):
    """The research cockpit: shows engine events, sends engine commands."""

    CSS_PATH = "app.tcss"
    TITLE = "autoresearch"
    ENABLE_COMMAND_PALETTE = True

    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume"),
        Binding("s", "stop_run", "Stop run"),
        Binding("g", "toggle_gate", "Gate"),
        Binding("r", "review", "Review"),
        Binding("m", "switch_model", "Model"),
        Binding("e", "edit_program", "program.md"),
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        Binding("k", "force_keep", "Force keep"),
        Binding("d", "force_discard", "Force discard"),
        Binding("x", "reapply", "Re-apply"),
        Binding("t", "next_trainer", "Trainer"),
        Binding("1", "show_pane('timeline')", "Timeline", show=False),
        Binding("2", "show_pane('live')", "Live", show=False),
        Binding("3", "show_pane('proposal')", "Proposal", show=False),
        Binding("4", "show_pane('progress')", "Progress", show=False),
        Binding("escape", "back_to_live", "Live proposal", show=False),
    ]
    """Engine commands first, then the rest; an 80-column footer shows the first ones, the palette all."""

    # -- messages from workers -------------------------------------------------------------------

    class EngineOpened(Message):
        def __init__(self, opened: OpenedEngine) -> None:
            super().__init__()
            self.opened = opened

    class SnapshotRead(Message):
        def __init__(self, snapshot: EngineSnapshot) -> None:
            super().__init__()
            self.snapshot = snapshot

    class RowsRead(Message):
        def __init__(self, rows: list[ExperimentRow]) -> None:
            super().__init__()
            self.rows = rows

    class MarksRead(Message):
        def __init__(self, marks: dict[int, str]) -> None:
            super().__init__()
            self.marks = marks

    class CurveRead(Message):
        def __init__(self, exp_id: int, curve: Curve) -> None:
            super().__init__()
            self.exp_id = exp_id
            self.curve = curve

    class ExperimentRead(Message):
        def __init__(self, row: ExperimentRow) -> None:
            super().__init__()
            self.row = row

    class FileRead(Message):
        def __init__(self, purpose: str, path: Path, text: str) -> None:
            super().__init__()
            self.purpose = purpose
            self.path = path
            self.text = text

    class FileSaved(Message):
        def __init__(self, purpose: str, path: Path) -> None:
            super().__init__()
            self.purpose = purpose
            self.path = path

    class EngineStopped(Message):
        def __init__(self, cleanly: bool) -> None:
            super().__init__()
            self.cleanly = cleanly

    def __init__(
        self,
        engine_builder: EngineBuilder | None = None,
        *,
        workspace: Path | None = None,
        header: HeaderInfo | None = None,
        welcome: bool | None = None,
        autostart: bool = True,
        model_loader: Callable[[], list[ModelChoice]] = discover_choices,
        seed: int | None = None,
    ) -> None:
        """Without an engine builder the app only shows what is fed to `bridge` (snapshots, benchmarks).

        `seed` seeds the random search when the model picker swaps it in."""
        super().__init__()
        self.bridge = EventBridge()
        self.state = CockpitState(header or HeaderInfo(workspace=str(workspace or "")))
        self.engine: EngineLike | None = None
        self.workspace_path = workspace
        self._builder = engine_builder
        self._welcome = welcome
        self._autostart = autostart
        self._model_loader = model_loader
        self.seed = seed
        self._model_proposer: Proposer | None = None
        """While random search proposes: the model proposer it replaced, to switch back to."""
        self._review_screen: ReviewScreen | None = None
        self._last_snapshot = 0.0
        self._snapshot_wanted = False
        self._quitting = False
        self.engine_started = False
        self.batches = 0
        """Batches of events drained so far (tests and the benchmark wait on it)."""

    # -- set-up ----------------------------------------------------------------------------------

    def get_default_screen(self) -> Screen[Any]:
        return MainScreen()

    @property
    def main(self) -> MainScreen:
        """The main screen (always at the bottom of the stack)."""
        screen = self.screen_stack[0]
        assert isinstance(screen, MainScreen)
        return screen

    @property
    def showing(self) -> bool:
        """Whether the main screen is up (not yet, or no more while the app closes)."""
        stack = self.screen_stack
        return bool(stack) and isinstance(stack[0], MainScreen) and stack[0].is_attached

    def on_mount(self) -> None:
        # The default screen composes after the app mounts: start once it is there.
        self.call_after_refresh(self._start)

    def _start(self) -> None:
        self.set_interval(DRAIN_INTERVAL, self.drain_events)
        self._render_all()
        if self._builder is not None:
            self.state.header.state = OPENING_WORKSPACE
            self._render_header()
            self._open_engine(self._builder)

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="engine", description="opening the workspace"
    )
    def _open_engine(self, builder: EngineBuilder) -> None:
        self.post_message(self.EngineOpened(builder(self.bridge)))

    @on(EngineOpened)
    def _engine_opened(self, message: EngineOpened) -> None:
        opened = message.opened
        self.engine = opened.engine
        self.workspace_path = opened.workspace
        header = self.state.header
        header.workspace = str(opened.workspace)
        header.budget = opened.budget
        header.model = opened.model or header.model
        header.state = EngineState.IDLE
        self._render_header()
        self._read_ledger()
        self._request_snapshot(force=True)
        show_welcome = opened.created if self._welcome is None else self._welcome
        if show_welcome:
            self.push_screen(
                WelcomeScreen(str(opened.workspace), opened.budget, header.model), self._welcomed
            )
        elif self._autostart:
            self.start_engine()

    def _welcomed(self, start: bool | None) -> None:
        if start:
            self.start_engine()
        else:
            self._stop_engine_and_exit()

    def start_engine(self) -> None:
        """Start the engine's loop (once)."""
        if self.engine is not None and not self.engine_started:
            self.engine_started = True
            self.engine.start()

    # -- workers that read -----------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="ledger", description="reading the ledger")
    def _read_ledger(self) -> None:
        engine = self.engine
        if engine is None:
            return
        rows = [row_from_experiment(exp) for exp in engine.ledger.experiments()]
        self.post_message(self.RowsRead(rows))
        # After the rows: a promotion that cannot be read must not keep the timeline empty.
        marks = promotion_marks(engine.ledger)
        if marks:
            self.post_message(self.MarksRead(marks))

    @on(RowsRead)
    def _rows_read(self, message: RowsRead) -> None:
        self.state.load_rows(message.rows)
        self._render_rows()
        best = self.state.header.best_exp_id
        if best is not None and self.state.best_curve.exp_id != best:
            self._read_curve(best)

    @on(MarksRead)
    def _marks_read(self, message: MarksRead) -> None:
        self.state.marks = message.marks
        self._render_rows()

    @work(thread=True, exclusive=True, exit_on_error=False, group="snapshot", description="engine snapshot")
    def _read_snapshot(self) -> None:
        if self.engine is not None:
            self.post_message(self.SnapshotRead(self.engine.snapshot()))

    def _request_snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.engine is None:
            return
        if force or now - self._last_snapshot >= SNAPSHOT_MIN_INTERVAL:
            self._last_snapshot = now
            self._snapshot_wanted = False
            self._read_snapshot()
        else:
            self._snapshot_wanted = True

    @on(SnapshotRead)
    def _snapshot_read(self, message: SnapshotRead) -> None:
        previous_best = self.state.header.best_exp_id
        trainers = self.state.n_trainers
        self.state.apply_snapshot(message.snapshot)
        self._render_header()
        if self.state.n_trainers != trainers and self.showing:
            self.main.live.show_trainers(self.state)
        best = self.state.header.best_exp_id
        if best is not None and best != previous_best and self.state.best_curve.exp_id != best:
            if best in self.state.curves:
                self.state.set_best_curve(best, self.state.curves[best])
            else:
                self._read_curve(best)
        if self.showing:  # a snapshot read while the app closes finds no screen to refresh
            self.refresh_bindings()

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="curve",
        description="reading the best run's log",
    )
    def _read_curve(self, exp_id: int) -> None:
        engine = self.engine
        if engine is None:
            return
        exp = engine.ledger.get(exp_id)
        text = ""
        if exp is not None and exp.log_path:
            path = Path(exp.log_path)
            if not path.is_absolute() and self.workspace_path is not None:
                path = self.workspace_path / path
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = exp.log_tail
        self.post_message(self.CurveRead(exp_id, parse_curve(text)))

    @on(CurveRead)
    def _curve_read(self, message: CurveRead) -> None:
        if message.exp_id == self.state.header.best_exp_id:
            self.state.set_best_curve(message.exp_id, message.curve)
            if self.showing:
                self.main.live.show_run(self.state.run, self.state.best_curve, self.state.n_trainers)
                self.main.live.show_trainers(self.state)

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="detail", description="reading an experiment"
    )
    def _read_experiment(self, exp_id: int) -> None:
        engine = self.engine
        exp = engine.ledger.get(exp_id) if engine is not None else None
        if exp is not None:
            self.post_message(self.ExperimentRead(row_from_experiment(exp)))

    @on(ExperimentRead)
    def _experiment_read(self, message: ExperimentRead) -> None:
        row = message.row
        known = self.state.rows.get(row.exp_id)
        if known is not None and not row.decided:
            # The ledger row of an experiment in flight knows less than the events did.
            row.diff = row.diff or known.diff
        if known is None or row.decided or not known.decided:
            self.state.rows[row.exp_id] = row
        if self.showing and self.main.proposal.detail_id == row.exp_id:
            self.main.proposal.show_detail(self.state.rows[row.exp_id], self.state.header.best_bpb)

    # -- events ----------------------------------------------------------------------------------

    def feed(self, events: Iterable[Event]) -> None:
        """Put events in as the engine would (from any thread); they show at the next drain."""
        for event in events:
            self.bridge(event)

    def drain_events(self) -> Update | None:
        """Fold everything the engine sent since the last drain into the state, and redraw what changed."""
        if not self.showing:
            return None
        events, dropped = self.bridge.drain()
        if self._snapshot_wanted:
            self._request_snapshot()
        if not events and not dropped:
            return None
        try:
            update = self.state.apply_batch(events, max_log_lines=MAX_LOG_LINES)
            update.dropped_lines += dropped
            self._render(update, events)
        except Exception as exc:  # a bug here must not take the cockpit down with a traceback
            self.notify(f"Could not show engine events: {exc!r}", severity="error", timeout=10)
            return None
        self.batches += 1
        return update

    def _render(self, update: Update, events: list[Event]) -> None:
        main = self.main
        dirty = update.dirty
        if update.dropped_lines:
            update.log.lines.insert(0, f"… {update.dropped_lines} log lines skipped (display fell behind)")
        if update.log.lines or update.log.replace_last is not None or update.log.reset:
            main.live.write_lines(update.log.lines, update.log.replace_last, update.log.reset)
        if dirty & {"run", "log", "timeline"}:
            main.live.show_run(self.state.run, self.state.best_curve, self.state.n_trainers)
        if "trainers" in dirty:
            main.live.show_trainers(self.state)
        if "timeline" in dirty:
            self._render_rows()
        elif "header" in dirty:
            self._render_header()
        if "proposal" in dirty:
            main.proposal.show_proposal(self.state.proposal)
        for text, severity in update.notifications:
            self.notify(text, severity=severity, timeout=8 if severity == "error" else 5, markup=False)
        if update.review_closed and self._review_screen is not None:
            screen, self._review_screen = self._review_screen, None
            if screen.is_current:
                screen.dismiss(("later", ""))
        if update.review is not None:
            self._offer_review()
        if dirty & {"header", "timeline"}:
            self._request_snapshot()
            self.refresh_bindings()
        best = self.state.header.best_exp_id
        if best is not None and self.state.best_curve.exp_id != best and best not in self.state.curves:
            self._read_curve(best)

    def _render_all(self) -> None:
        if not self.showing:
            return
        self._render_rows()
        main = self.main
        main.proposal.show_proposal(self.state.proposal)
        main.live.show_run(self.state.run, self.state.best_curve, self.state.n_trainers)
        main.live.show_trainers(self.state)

    def _render_header(self) -> None:
        if not self.showing:
            return
        self.main.header.show(self.state.header, self.state.n_done, self.state.gain)
        self.main.gains.show_state(self.state)

    def _render_rows(self) -> None:
        if not self.showing:
            return
        main = self.main
        main.timeline.show(self.state.ordered_rows(), self.state.header.best_bpb, self.state.marks)
        main.progress.show_state(self.state)
        self._render_header()

    # -- commands --------------------------------------------------------------------------------

    def _send(self, command: Command) -> bool:
        """Send one engine command; it returns at once (docs/contracts.md), an error becomes a notification."""
        if self.engine is None:
            self.notify("No engine is attached yet.", severity="warning")
            return False
        try:
            self.engine.send(command)
        except Exception as exc:
            what = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", type(command).__name__).lower()  # SetGate: set gate
            self.notify(f"{what} failed: {exc}", severity="error", timeout=8, markup=False)
            return False
        return True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        header = self.state.header
        paused = header.state == EngineState.PAUSED or header.pause_requested
        if action == "pause":
            return not paused
        if action == "resume":
            return paused
        if action == "review":
            return True if self.state.pending_review is not None else None
        if action == "next_trainer":
            return self.state.n_trainers > 1  # one trainer: no key, the cockpit as it always was
        return True

    def action_pause(self) -> None:
        if self._send(Pause()):
            self.state.header.pause_requested = True
            self.notify("Pausing after the current run.")
            self._after_command()

    def action_resume(self) -> None:
        if self._send(Resume()):
            self.state.header.pause_requested = False
            if self.state.header.state == EngineState.PAUSED:
                self.state.header.state = EngineState.RUNNING
            self._after_command()

    def action_stop_run(self) -> None:
        if self._send(StopRun()):
            # The engine pauses after a stop, so that the user decides what comes next.
            self.state.header.pause_requested = True
            self.notify("Stopping the current run (recorded as interrupted); then paused: p resumes.")
            self._after_command()

    def action_toggle_gate(self) -> None:
        on_now = not self.state.header.review_gate
        if self._send(SetGate(on_now)):
            self.state.header.review_gate = on_now
            self._after_command()

    def action_review(self) -> None:
        if self.state.pending_review is None:
            self.notify("No proposal is waiting for review.")
            return
        self._offer_review(force=True)

    def action_force_keep(self) -> None:
        if self._send(Override("keep")):
            self.notify("Forcing keep on the last decision…")

    def action_force_discard(self) -> None:
        if self._send(Override("discard")):
            self.notify("Forcing discard on the last decision…")

    def action_reapply(self) -> None:
        exp_id = self.main.timeline.selected_id
        row = self.state.rows.get(exp_id) if exp_id is not None else None
        if row is None:
            self.notify("Put the timeline cursor on a discarded experiment first.", severity="warning")
            return
        if row.status in ("keep", "baseline") or not row.decided:
            self.notify(
                f"#{row.exp_id} is {row.status}: only a finished, not kept experiment can be re-applied."
            )
            return
        self._send(Reapply(row.exp_id))

    def action_switch_model(self) -> None:
        self.push_screen(
            ModelPickerScreen(self.state.header.model, loader=self._model_loader), self._model_chosen
        )

    def _model_chosen(self, name: str | None) -> None:
        if not name or name == self.state.header.model:
            return
        sampler = next((key for key in SAMPLERS if shown_name(key) == name), None)
        if name == RANDOM_SEARCH or sampler is not None:
            # The model proposer is kept (its model stays loaded) for the way back.
            kept = self._model_proposer or (self.engine.proposer if self.engine is not None else None)
            if sampler is None:
                proposer: Proposer = RandomSearch(self.seed)
            elif self.workspace_path is None:
                self.notify("No workspace is open yet: its study would live there.", severity="warning")
                return
            else:
                # Here, not at the top: agent.workspace imports git, which the first frame must not wait for.
                from agent.workspace import STATE_DIR

                proposer = OptunaSearch(sampler, self.workspace_path / STATE_DIR / STUDY_FILE, self.seed)
            if self._send(SetProposer(proposer)):
                self._model_proposer = kept
                self.notify(
                    f"{'Random search' if sampler is None else name} proposes from the next proposal on."
                )
            return
        if self._model_proposer is not None:
            back, self._model_proposer = self._model_proposer, None
            if not self._send(SetProposer(back)) or name == model_name(back):
                return
        if self._send(UseModel(name)):
            header = self.state.header
            header.loading_model = name
            header.loading_progress = None
            header.loading_message = QUEUED
            self._render_header()
            self.notify(f"Switching to {name} before the next proposal.")

    def action_trainers(self) -> None:
        header = self.state.header
        self.push_screen(TrainersScreen(header.trainers, header.ray), self._trainers_chosen)

    def _trainers_chosen(self, chosen: tuple[int, str | None] | None) -> None:
        if chosen is None:
            return
        trainers, ray = chosen
        if (trainers, ray) == (self.state.header.trainers, self.state.header.ray):
            return
        if self._send(SetTrainers(trainers, ray)):
            where = f"Ray at {ray}" if ray else "this machine"
            self.notify(f"{trainers} trainer(s) on {where} once the runs in flight have ended.")

    def action_edit_program(self) -> None:
        if self.workspace_path is None:
            self.notify("No workspace is open yet.", severity="warning")
            return
        self._read_file("program", self.workspace_path / "program.md")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_next_trainer(self) -> None:
        """Show the next trainer's log and curve (after the last: follow the newest run again)."""
        if self.state.n_trainers <= 1 or not self.showing:
            return
        update = self.state.next_trainer()
        self._render(update, [])
        slot = self.state.selected_slot
        self.notify(
            "Following the newest run." if slot is None else f"Showing trainer {slot + 1}.", timeout=2
        )

    def action_show_pane(self, key: str) -> None:
        self.main.show_pane(key)

    def action_back_to_live(self) -> None:
        self.main.proposal.back_to_live(self.state.proposal)

    def _after_command(self) -> None:
        self._render_header()
        self.refresh_bindings()
        self._request_snapshot(force=True)

    def on_timeline_experiment_selected(self, message: Any) -> None:
        exp_id: int = message.exp_id
        row = self.state.rows.get(exp_id)
        if row is not None:
            self.main.proposal.show_detail(row, self.state.header.best_bpb)
        if self.main.narrow:
            self.main.show_pane("proposal")
        self._read_experiment(exp_id)

    # -- review ----------------------------------------------------------------------------------

    def _offer_review(self, force: bool = False) -> None:
        pending = self.state.pending_review
        if pending is None or self._review_screen is not None:
            return
        if not force and not isinstance(self.screen, MainScreen):
            self.notify(f"Proposal #{pending.exp_id} waits for your review: press r.", timeout=8)
            return
        reasoning = self.state.proposal.reasoning if self.state.proposal.exp_id == pending.exp_id else ""
        screen = ReviewScreen(pending.exp_id, pending.description, pending.diff, reasoning)
        self._review_screen = screen
        self.push_screen(screen, self._reviewed)

    def _reviewed(self, choice: ReviewChoice | None) -> None:
        self._review_screen = None
        pending = self.state.pending_review
        if choice is None or pending is None:
            return
        verdict, reason = choice
        if verdict == "approve":
            if self._send(Approve()):
                self.notify(f"#{pending.exp_id} approved.")
                self._review_done()
        elif verdict == "veto":
            if self._send(Veto(reason)):
                self.notify(f"#{pending.exp_id} vetoed; the model is told why.")
                self._review_done()
        elif verdict == "edit":
            self._edit_proposal(pending)

    def _review_done(self) -> None:
        self.state.pending_review = None
        if self.state.proposal.phase == "review":
            self.state.proposal.phase = "ready"
        if self.showing:
            self.main.proposal.show_proposal(self.state.proposal)
        self.refresh_bindings()

    def _edit_proposal(self, pending: ReviewRequested) -> None:
        """The train.py the proposal would make, in the editor; saving approves it, edited or not."""
        exp_id, description = pending.exp_id, pending.description
        base, proposed = pending.base_text, pending.candidate_text
        if not proposed:
            self.notify(f"#{exp_id} came without its train.py: approve or veto it.", severity="warning")
            self._offer_review(force=True)
            return

        def edited(text: str | None) -> None:
            if text is None:
                self._offer_review(force=True)
                return
            chosen: Proposal | None = None
            if text != proposed:
                # The whole base text is the one edit: it applies to the best the review was asked on.
                chosen = Proposal(
                    description=f"{description} (edited)",
                    edits=(Edit(search=base, replace=text),),
                    reasoning=self.state.proposal.reasoning,
                    proposer="user",
                )
            if self._send(Approve(chosen)):
                self.notify(f"#{exp_id} approved" + (" as you edited it." if chosen else " unchanged."))
                self._review_done()

        self.push_screen(ProposalEditorScreen(exp_id, description, proposed), edited)

    # -- files -----------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="files", description="reading a file")
    def _read_file(self, purpose: str, path: Path) -> None:
        self.post_message(self.FileRead(purpose, path, path.read_text(encoding="utf-8")))

    @work(thread=True, exclusive=True, exit_on_error=False, group="files", description="saving a file")
    def _save_file(self, purpose: str, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        self.post_message(self.FileSaved(purpose, path))

    @on(FileRead)
    def _file_read(self, message: FileRead) -> None:
        if message.purpose == "program":
            path = message.path

            def saved(text: str | None) -> None:
                if text is not None:
                    self._save_file("program", path, text)

            self.push_screen(ProgramEditorScreen(message.text, str(path)), saved)

    @on(FileSaved)
    def _file_saved(self, message: FileSaved) -> None:
        if message.purpose == "program" and self._send(ReloadProgram()):
            self.notify("program.md saved.")

    # -- errors from workers ---------------------------------------------------------------------

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state != WorkerState.ERROR:
            return
        error = worker.error
        what = worker.description or worker.name
        self.notify(f"{what} failed: {error}", severity="error", timeout=10, markup=False)
        if worker.group == "engine":
            self.state.header.state = EngineState.STOPPED
            self.state.header.detail = str(error)
            self._render_header()

    # -- quitting --------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        if self._quitting:
            return
        running = self.engine is not None and self.engine_started
        self.push_screen(QuitScreen(running), self._quit_confirmed)

    def _quit_confirmed(self, quit_now: bool | None) -> None:
        if quit_now:
            self._stop_engine_and_exit()

    def _stop_engine_and_exit(self) -> None:
        self._quitting = True
        if self.engine is None:
            self.exit(0)
            return
        self.notify("Stopping the engine…", timeout=30)
        self._shutdown_engine()

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="shutdown", description="stopping the engine"
    )
    def _shutdown_engine(self) -> None:
        cleanly = shutdown_engine(self.engine, started=self.engine_started)
        self.post_message(self.EngineStopped(cleanly))

    @on(EngineStopped)
    def _engine_stopped(self, message: EngineStopped) -> None:
        self.drain_events()
        self.exit(0 if message.cleanly else 1)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("Pause after this run", "Pause the research after the current run", self.action_pause),
            ("Resume", "Resume the research", self.action_resume),
            ("Stop the current run", "Kill the run now; it is recorded as interrupted", self.action_stop_run),
            ("Review gate on/off", "Hold each proposal for approval", self.action_toggle_gate),
            ("Review the held proposal", "Approve, edit or veto it", self.action_review),
            ("Force keep", "Override the last decision: keep it", self.action_force_keep),
            ("Force discard", "Override the last decision: discard it", self.action_force_discard),
            ("Re-apply experiment", "Queue the selected discarded experiment again", self.action_reapply),
            ("Switch model", "Pick another local model", self.action_switch_model),
            ("Trainers and Ray", "How many runs train at once, and where (Ray)", self.action_trainers),
            ("Edit program.md", "Edit the research instructions in place", self.action_edit_program),
            ("Help", "Keys and what quitting does", self.action_help),
        ]
        if self.state.n_trainers > 1:
            commands.append(
                ("Next trainer", "Show the next trainer's log and loss curve", self.action_next_trainer)
            )
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)


def shutdown_engine(engine: EngineLike | None, started: bool, timeout: float = 60.0) -> bool:
    """Stop the engine (a run in flight is killed and recorded as interrupted) and wait for it."""
    if engine is None:
        return True
    try:
        engine.send(Shutdown())
        if started:
            engine.join(timeout)
            if not engine.finished:
                return False
        engine.close()
    except Exception:
        return False
    return True


def create_app(
    workspace: Path,
    budget: Budget | None = None,
    model: str | None = None,
    *,
    seed: int | None = None,
    proposer: Proposer | None = None,
    config: EngineConfig | None = None,
    welcome: bool | None = None,
    autostart: bool = True,
    model_loader: Callable[[], list[ModelChoice]] = discover_choices,
    scheduling: dict[str, Any] | None = None,
) -> CockpitApp:
    """The cockpit on a workspace (created on first run); the CLI and the tests both use this.

    `seed` seeds the local model's sampling (None: unseeded); `proposer` replaces the local model (tests
    pass the idea queue); `config` replaces the EngineConfig built from `budget`;
    `welcome` forces the first-run welcome on or off; `scheduling` holds the EngineConfig fields of
    --trainers, --ray and --overlap.
    """
    builder = default_engine_builder(
        workspace, budget, model, seed=seed, proposer=proposer, config=config, scheduling=scheduling
    )
    return CockpitApp(
        builder,
        workspace=workspace,
        header=HeaderInfo(workspace=str(workspace), budget=budget.describe() if budget else ""),
        welcome=welcome,
        autostart=autostart,
        model_loader=model_loader,
        seed=seed,
    )


def run_app(
    workspace: Path, budget: Budget | None, model: str | None, seed: int | None = None, **scheduling: Any
) -> int:
    """Open the cockpit on `workspace` and return the exit status once the user quits; `scheduling`:
    EngineConfig's trainers, ray and overlap."""
    app = create_app(workspace, budget, model, seed=seed, scheduling=scheduling)
    try:
        code = app.run()
    finally:
        # However the app ended, no engine is left running a training behind the user's back.
        if app.engine is not None and not app._quitting:
            shutdown_engine(app.engine, started=app.engine_started)
    if app.return_code not in (None, 0):
        return app.return_code
    return code or 0
