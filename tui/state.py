"""The cockpit's picture of the engine, folded from events by a pure reducer (no Textual here)."""

from __future__ import annotations

import bisect
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from agent.events import (
    Decided,
    EngineError,
    EngineSnapshot,
    EngineState,
    Event,
    Info,
    LogLine,
    ModelLoaded,
    ModelLoading,
    NoiseMeasured,
    ProposalReady,
    ProposalRejected,
    ProposalStarted,
    ProposalToken,
    ProposerWaiting,
    ReviewRequested,
    RunFinished,
    RunStarted,
    StateChanged,
    StepMetric,
    Transferred,
    first_line,
    last_line,
)
from agent.ledger import Experiment

PROGRESS_LINE = re.compile(r"^step\s+(\d+)\s+\|\s+loss\s+(\S+)\s+\|.*\btok/s\s+([\d.]+)")
"""A training progress line (docs/contracts.md)."""

IN_FLIGHT = frozenset({"pending", "running", "review"})
"""Row statuses of an experiment that has no verdict yet."""

KEPT = frozenset({"keep", "baseline"})
"""Statuses whose train.py became the best at the time."""

OVERRIDABLE = frozenset({"keep", "discard"})
"""Statuses a user can force; one decided by the user is an override."""

MAX_CURVE_POINTS = 4000
"""A loss curve longer than this is thinned (every other point dropped), so memory stays flat."""

MAX_RUN_LOG_LINES = 1000
"""Each trainer's run keeps this many log lines, to refill the log view when the user picks that trainer."""

MAX_REASONING_CHARS = 40_000
"""Only the tail of a streamed reasoning is kept."""

QUEUED = "queued"
"""HeaderInfo.loading_message of a model switch the engine has not started yet (it waits for a safe point)."""

Severity = Literal["information", "warning", "error"]

STARTING: Final = "starting"
"""The header's state before the app opens a workspace (no engine yet)."""

OPENING_WORKSPACE: Final = "opening workspace"
"""The header's state while a worker opens the workspace and builds the engine."""

HeaderState = EngineState | Literal["starting", "opening workspace"]
"""What the header says the engine is doing: the engine's state, or one of the cockpit's own before it has one."""

Dirty = Literal["header", "timeline", "run", "log", "trainers", "proposal"]
"""A part of the screen a batch of events changed: the header, the timeline (with the progress pane), the live
run's plot, the log view, the trainer list, the proposal pane."""


@dataclass
class ExperimentRow:
    """One experiment as the timeline and the detail view show it."""

    exp_id: int
    description: str = ""
    status: str = "pending"
    val_bpb: float | None = None
    seconds: float | None = None
    decided_by: str = "engine"
    reason: str = ""
    diff: str = ""
    log_tail: str = ""
    model: str | None = None
    proposer: str = ""
    peak_memory_mb: float | None = None
    seeds: int = 0

    @property
    def decided(self) -> bool:
        return self.status not in IN_FLIGHT


@dataclass
class HeaderInfo:
    """What the header shows; events update it, engine snapshots correct it."""

    workspace: str = ""
    branch: str = ""
    model: str | None = None
    device: str = ""
    budget: str = ""
    state: HeaderState = STARTING
    detail: str = ""
    baseline_bpb: float | None = None
    best_bpb: float | None = None
    best_exp_id: int | None = None
    margin: float | None = None
    margin_measured: bool = True
    """False when the margin is the default (the baseline ran once: no spread to measure)."""
    review_gate: bool = False
    pause_requested: bool = False
    loading_model: str | None = None
    loading_progress: float | None = None
    loading_message: str = ""
    containment: str = ""
    """'full', 'network' or 'none' once the engine has probed it; '' before."""
    trainers: int = 1
    """Trainer slots the engine runs (how many runs can train at once)."""
    ray: str | None = None
    """Where the runs train as Ray tasks ('local', 'auto', an address); None: on this machine."""
    busy_share: float | None = None
    """Share of the trainers' time spent training since the engine started (None until it says)."""
    experiments_per_hour: float | None = None
    """Experiments decided per hour of this session (None until the engine says)."""


@dataclass
class Curve:
    """A loss curve: (step, loss) pairs of one run, thinned past MAX_CURVE_POINTS."""

    exp_id: int | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if len(self.steps) > MAX_CURVE_POINTS:
            # Keep the newest point exact; halve the rest.
            del self.steps[-2::-2]
            del self.losses[-2::-2]

    def loss_at(self, step: int) -> float | None:
        """The loss at the last logged step <= `step` (None before the first)."""
        i = bisect.bisect_right(self.steps, step) - 1
        return self.losses[i] if i >= 0 else None


@dataclass
class LiveRun:
    """A trainer's run (in flight, or its last one): its curve, throughput and the tail of its log."""

    exp_id: int | None = None
    seed: int | None = None
    description: str = ""
    curve: Curve = field(default_factory=Curve)
    tokens_per_s: float | None = None
    finished: bool = False
    slot: int = 0
    """The trainer slot it runs in."""
    where: str = ""
    """The node it trains on when that is not this machine."""
    promotion: str = ""
    """The rung of a promotion run ('4x'), which trains the experiment's train.py again at a larger budget."""
    log: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_RUN_LOG_LINES))
    """Its last log lines (its banner first while they fit)."""

    def add_line(self, text: str, replace: bool = False) -> None:
        if replace and self.log:
            self.log[-1] = text
        else:
            self.log.append(text)


@dataclass(frozen=True)
class TrainerRow:
    """One trainer as the live pane lists it: what it runs, how far, its loss against the best's."""

    slot: int
    exp_id: int | None
    description: str
    step: int | None
    loss: float | None
    best_loss: float | None
    """The best run's loss at the same step (None when the best's curve is unknown or it is this run)."""
    tokens_per_s: float | None
    where: str
    finished: bool
    shown: bool
    """Its log and curve are the ones the live pane shows."""
    status: str = ""
    """Its experiment's status in the timeline (running, keep, discard, ...)."""
    promotion: str = ""
    """The rung of a promotion run ('4x'); '' for the experiment's own run."""


@dataclass
class ProposalView:
    """The proposal being made or waiting: streamed reasoning, then the diff."""

    phase: str = "idle"
    """idle, thinking, ready, review, rejected."""
    proposer: str = ""
    model: str | None = None
    reasoning: str = ""
    exp_id: int | None = None
    description: str = ""
    diff: str = ""
    reason: str = ""


@dataclass
class LogOps:
    """What to do to the log view for one batch: replace its last line (a `\\r` line), then write `lines`."""

    lines: list[str] = field(default_factory=list)
    replace_last: str | None = None
    """Replaces the last line already in the view, before `lines` are written."""
    reset: bool = False
    """Clear the view first (another trainer's log is shown): `lines` are then its whole tail."""


@dataclass
class Update:
    """What a batch of events changed: the parts to redraw, log lines to write, notifications to show."""

    dirty: set[Dirty] = field(default_factory=set)
    log: LogOps = field(default_factory=LogOps)
    notifications: list[tuple[str, Severity]] = field(default_factory=list)
    review: ReviewRequested | None = None
    review_closed: bool = False
    dropped_lines: int = 0


def parse_curve(log_text: str) -> Curve:
    """The loss curve in a training log's progress lines."""
    curve = Curve()
    for line in log_text.splitlines():
        match = PROGRESS_LINE.match(line.strip())
        if match:
            try:
                curve.add(int(match.group(1)), float(match.group(2)))
            except ValueError:
                continue
    return curve


def row_from_experiment(exp: Experiment) -> ExperimentRow:
    """An ExperimentRow from a ledger `Experiment`."""
    return ExperimentRow(
        exp_id=exp.id,
        description=exp.description,
        status=exp.status or "pending",
        val_bpb=exp.val_bpb,
        seconds=exp.total_seconds or exp.training_seconds,
        decided_by=exp.decided_by or "engine",
        reason=exp.reason,
        diff=exp.diff,
        log_tail=exp.log_tail,
        model=exp.model,
        proposer=exp.proposer,
        peak_memory_mb=exp.peak_memory_mb,
        seeds=len(exp.seeds),
    )


class CockpitState:
    """Folds engine events into what the cockpit shows. Pure: no Textual, no I/O."""

    def __init__(self, header: HeaderInfo | None = None) -> None:
        self.header = header or HeaderInfo()
        self.rows: dict[int, ExperimentRow] = {}
        self.slots: dict[int, LiveRun] = {}
        """Each trainer slot's run: the one it trains now, or the last one it trained."""
        self.selected_slot: int | None = None
        """The trainer whose log and curve the live pane shows; None follows the newest run."""
        self.newest_slot = 0
        """The slot of the run that started last."""
        self._no_run = LiveRun()
        self.best_curve = Curve()
        self.curves: dict[int, Curve] = {}
        """Curves of this session's runs, kept only for the runs the trainers hold and the best."""
        self.proposal = ProposalView()
        self.pending_review: ReviewRequested | None = None
        self.last_log_exp: int | None = None
        self.marks: dict[int, str] = {}
        """Each keep's promotion marks, one per rung ('✓✗'): empty when the workspace has no promotion."""

    # -- derived ---------------------------------------------------------------------------------

    @property
    def n_trainers(self) -> int:
        """Trainer slots: as the engine says, or as many as runs were seen in."""
        return max(self.header.trainers, max(self.slots, default=-1) + 1, 1)

    @property
    def shown_slot(self) -> int:
        """The trainer whose log and curve the live pane shows."""
        return self.newest_slot if self.selected_slot is None else self.selected_slot

    @property
    def run(self) -> LiveRun:
        """The run the live pane shows (the shown trainer's; an empty one before any)."""
        return self.slots.get(self.shown_slot, self._no_run)

    def trainer_rows(self) -> list[TrainerRow]:
        """One row per trainer slot, in slot order."""
        rows = []
        for slot in range(self.n_trainers):
            run = self.slots.get(slot)
            if run is None:
                rows.append(
                    TrainerRow(slot, None, "", None, None, None, None, "", False, slot == self.shown_slot)
                )
                continue
            step = run.curve.steps[-1] if run.curve.steps else None
            best = self.best_curve
            # A promotion run trains to another budget: its loss at a step is not comparable to the best's.
            comparable = not run.promotion and best.exp_id not in (None, run.exp_id)
            best_loss = best.loss_at(step) if step is not None and comparable else None
            rows.append(
                TrainerRow(
                    slot=slot,
                    exp_id=run.exp_id,
                    description=run.description or self._description(run.exp_id),
                    step=step,
                    loss=run.curve.losses[-1] if run.curve.losses else None,
                    best_loss=best_loss,
                    tokens_per_s=run.tokens_per_s,
                    where=run.where,
                    finished=run.finished,
                    shown=slot == self.shown_slot,
                    status=self.rows[run.exp_id].status if run.exp_id in self.rows else "",
                    promotion=run.promotion,
                )
            )
        return rows

    def _description(self, exp_id: int | None) -> str:
        row = self.rows.get(exp_id) if exp_id is not None else None
        return row.description if row is not None else ""

    @property
    def n_done(self) -> int:
        """Experiments with a verdict (the baseline included)."""
        return sum(1 for row in self.rows.values() if row.decided)

    def ordered_rows(self) -> list[ExperimentRow]:
        """Newest first."""
        return [self.rows[key] for key in sorted(self.rows, reverse=True)]

    def delta_vs_best(self, row: ExperimentRow) -> float | None:
        if row.val_bpb is None or self.header.best_bpb is None:
            return None
        return row.val_bpb - self.header.best_bpb

    @property
    def gain(self) -> float | None:
        """How much the best beats the baseline (positive is better)."""
        if self.header.best_bpb is None or self.header.baseline_bpb is None:
            return None
        return self.header.baseline_bpb - self.header.best_bpb

    def progress_points(self) -> tuple[list[int], list[float], list[int], list[float], list[float]]:
        """(ids, val_bpb) of every measured experiment, (ids, val_bpb) of the keeps, running best per id."""
        ids: list[int] = []
        values: list[float] = []
        keep_ids: list[int] = []
        keep_values: list[float] = []
        best_line: list[float] = []
        best: float | None = None
        for key in sorted(self.rows):
            row = self.rows[key]
            if row.val_bpb is None or not row.decided:
                continue
            ids.append(key)
            values.append(row.val_bpb)
            if row.status in KEPT:
                keep_ids.append(key)
                keep_values.append(row.val_bpb)
                best = row.val_bpb if best is None else min(best, row.val_bpb)
            best_line.append(best if best is not None else row.val_bpb)
        return ids, values, keep_ids, keep_values, best_line

    # -- loading ---------------------------------------------------------------------------------

    def load_rows(self, rows: Iterable[ExperimentRow]) -> None:
        """Replace the rows by the ledger's (on open), and derive the baseline and best from them."""
        for row in rows:
            known = self.rows.get(row.exp_id)
            if known is not None and not row.decided:
                continue  # the events of an experiment in flight are newer than a ledger read
            self.rows[row.exp_id] = row
        for row in sorted(self.rows.values(), key=lambda r: r.exp_id):
            if row.status == "baseline" and row.val_bpb is not None:
                self.header.baseline_bpb = row.val_bpb
        kept = [row for row in self.rows.values() if row.status in KEPT and row.val_bpb is not None]
        if kept and self.header.best_bpb is None:
            best = min(kept, key=lambda r: r.val_bpb or 0.0)
            self.header.best_bpb = best.val_bpb
            self.header.best_exp_id = best.exp_id

    def apply_snapshot(self, snapshot: EngineSnapshot) -> None:
        """Correct the header from an engine snapshot."""
        header = self.header
        if snapshot.state != header.state:
            header.detail = ""  # the detail belonged to the state the events last reported
        header.state = snapshot.state
        header.workspace = str(snapshot.workspace)
        header.branch = snapshot.branch
        if snapshot.model is not None:
            header.model = snapshot.model
        header.device = snapshot.device
        header.budget = snapshot.budget
        header.containment = snapshot.containment
        header.baseline_bpb = snapshot.baseline_bpb
        header.best_bpb = snapshot.best_bpb
        header.best_exp_id = snapshot.best_exp_id
        header.margin = snapshot.margin
        header.busy_share = snapshot.busy_share
        header.experiments_per_hour = snapshot.experiments_per_hour
        if snapshot.trainers >= 1:
            header.trainers = snapshot.trainers
            # Fewer trainers than before: the slots gone keep nothing once their runs have ended.
            for slot in [s for s, run in self.slots.items() if s >= snapshot.trainers and run.finished]:
                del self.slots[slot]
            if self.selected_slot is not None and self.selected_slot >= snapshot.trainers:
                self.selected_slot = None
            if self.newest_slot not in self.slots:
                self.newest_slot = max(self.slots, default=0)
        header.ray = snapshot.ray or None
        header.review_gate = snapshot.review_gate
        if header.state == EngineState.PAUSED:
            header.pause_requested = False

    def set_best_curve(self, exp_id: int, curve: Curve) -> None:
        curve.exp_id = exp_id
        self.best_curve = curve

    def select_trainer(self, slot: int | None) -> Update:
        """Show trainer `slot`'s log and curve (None: follow the newest run); the log view is refilled."""
        self.selected_slot = slot
        update = Update(dirty={"run", "trainers"})
        update.log.reset = True
        update.log.lines = list(self.run.log)
        return update

    def next_trainer(self) -> Update:
        """Cycle what the live pane shows: the newest run, then trainer 1, 2, ... and back."""
        slot = self.selected_slot
        if slot is None:
            following = 0
        elif slot + 1 < self.n_trainers:
            following = slot + 1
        else:
            return self.select_trainer(None)
        return self.select_trainer(following)

    # -- the reducer -----------------------------------------------------------------------------

    def row(self, exp_id: int) -> ExperimentRow:
        if exp_id not in self.rows:
            self.rows[exp_id] = ExperimentRow(exp_id=exp_id)
        return self.rows[exp_id]

    def apply_batch(self, events: Sequence[Event], max_log_lines: int = 2000) -> Update:
        """Fold a batch of events (in order) and say what changed."""
        update = Update()
        for event in events:
            self._apply(event, update)
        if len(update.log.lines) > max_log_lines:
            update.dropped_lines += len(update.log.lines) - max_log_lines
            update.log.lines = update.log.lines[-max_log_lines:]
        return update

    def _apply(self, event: Event, update: Update) -> None:
        header = self.header
        if isinstance(event, LogLine):
            self._log_line(event, update)
        elif isinstance(event, StepMetric):
            slot = self._slot_of(event)
            if slot is None:
                slot = self._free_slot()
                self._new_run(event.exp_id, slot=slot)
            run = self.slots[slot]
            run.curve.add(event.step, event.loss)
            run.tokens_per_s = event.tokens_per_s
            update.dirty.add("trainers")
            if slot == self.shown_slot:
                update.dirty.add("run")
        elif isinstance(event, StateChanged):
            header.state = event.state
            header.detail = event.detail
            if event.state == EngineState.PAUSED:
                header.pause_requested = False
            if self.pending_review is not None and event.state != EngineState.WAITING_REVIEW:
                self.pending_review = None
                update.review_closed = True
                if self.proposal.phase == "review":
                    self.proposal.phase = "ready"
                update.dirty.add("proposal")
            update.dirty.add("header")
        elif isinstance(event, RunStarted) and event.promotion:
            self._promotion_started(event, update)
        elif isinstance(event, RunStarted):
            row = self.row(event.exp_id)
            row.status = "running"
            row.description = row.description or event.description
            row.seeds += 1
            header.budget = event.budget or header.budget
            run = self._new_run(event.exp_id, event.seed, event.description, event.slot, event.where)
            self.newest_slot = event.slot
            banner = f"── #{event.exp_id} seed {event.seed}{self._on(event)}: {event.description} ──"
            run.add_line(banner)
            if event.slot == self.shown_slot:
                update.log.lines.append(banner)
            update.dirty.update({"timeline", "run", "header", "trainers"})
        elif isinstance(event, RunFinished) and event.promotion:
            slot = self._slot_of(event)
            if slot is not None:
                self.slots[slot].finished = True
            update.dirty.update({"run", "trainers"})
        elif isinstance(event, RunFinished):
            row = self.row(event.exp_id)
            row.seconds = (row.seconds or 0.0) + event.seconds if row.seeds > 1 else event.seconds
            if event.log_tail:
                row.log_tail = event.log_tail
            if event.val_bpb is not None and row.status in IN_FLIGHT:
                row.val_bpb = event.val_bpb
            peak = event.summary.get("peak_memory_mb") if event.summary else None
            if isinstance(peak, int | float):
                row.peak_memory_mb = float(peak)
            slot = self._slot_of(event)
            if slot is not None:
                self.slots[slot].finished = True
            if event.outcome not in ("ok", "interrupted"):
                tail = last_line(event.log_tail)
                update.notifications.append(
                    (f"Run #{event.exp_id}: {event.outcome}" + (f" — {tail}" if tail else ""), "warning")
                )
            update.dirty.update({"timeline", "run"})
        elif isinstance(event, Decided):
            row = self.row(event.exp_id)
            row.status = event.status
            row.val_bpb = event.val_bpb if event.val_bpb is not None else row.val_bpb
            row.decided_by = event.by
            row.reason = event.reason
            previous_best = header.best_exp_id
            if event.status == "baseline" and event.val_bpb is not None:
                header.baseline_bpb = event.val_bpb
            if event.best_bpb is not None:
                header.best_bpb = event.best_bpb
            if event.status in KEPT and event.val_bpb is not None and event.val_bpb == event.best_bpb:
                header.best_exp_id = event.exp_id
            header.margin = event.margin
            if header.best_exp_id != previous_best and header.best_exp_id in self.curves:
                self.set_best_curve(header.best_exp_id, self.curves[header.best_exp_id])
            if event.by == "user" and event.status in OVERRIDABLE:
                update.notifications.append(
                    (f"#{event.exp_id} is now {event.status} (override)", "information")
                )
            update.dirty.update({"timeline", "header", "run", "trainers"})
        elif isinstance(event, ProposalStarted):
            self.proposal = ProposalView(phase="thinking", proposer=event.proposer, model=event.model)
            if event.model:
                header.model = event.model
            update.dirty.update({"proposal", "header"})
        elif isinstance(event, ProposalToken):
            reasoning = self.proposal.reasoning + event.text
            if len(reasoning) > MAX_REASONING_CHARS:
                reasoning = reasoning[-MAX_REASONING_CHARS:]
            self.proposal.reasoning = reasoning
            if self.proposal.phase == "idle":
                self.proposal.phase = "thinking"
            update.dirty.add("proposal")
        elif isinstance(event, ProposalReady):
            view = self.proposal
            view.phase = "ready"
            view.exp_id = event.exp_id
            view.description = event.description
            view.diff = event.diff
            if event.reasoning and not view.reasoning:
                view.reasoning = event.reasoning
            view.proposer = event.proposer or view.proposer
            row = self.row(event.exp_id)
            row.description = event.description
            row.diff = event.diff
            row.proposer = event.proposer
            row.model = view.model
            update.dirty.update({"proposal", "timeline"})
        elif isinstance(event, ProposalRejected):
            self.proposal.phase = "rejected"
            self.proposal.reason = event.reason
            if event.exp_id is not None:
                row = self.row(event.exp_id)
                row.status = "rejected"
                row.reason = event.reason
                row.description = row.description or "(rejected proposal)"
                update.dirty.add("timeline")
            update.notifications.append((f"Proposal rejected: {first_line(event.reason)}", "warning"))
            update.dirty.add("proposal")
        elif isinstance(event, ProposerWaiting):
            header.detail = f"asking again in {event.retry_in_s:.0f} s"
            update.notifications.append(
                (
                    f"Proposer failed: {first_line(event.reason)}; asking again in {event.retry_in_s:.0f} s",
                    "warning",
                )
            )
            update.dirty.add("header")
        elif isinstance(event, ReviewRequested):
            self.pending_review = event
            view = self.proposal
            view.phase = "review"
            view.exp_id = event.exp_id
            view.description = event.description
            view.diff = event.diff
            row = self.row(event.exp_id)
            row.status = "review"
            row.description = event.description
            row.diff = event.diff
            update.review = event
            update.dirty.update({"proposal", "timeline", "header"})
        elif isinstance(event, NoiseMeasured):
            header.margin = event.margin
            header.margin_measured = len(event.values) > 1
            update.dirty.add("header")
        elif isinstance(event, ModelLoading):
            header.loading_model = event.name
            header.loading_progress = event.progress
            header.loading_message = event.message
            update.dirty.add("header")
        elif isinstance(event, ModelLoaded):
            header.model = event.name
            header.loading_model = None
            header.loading_progress = None
            header.loading_message = ""
            update.notifications.append((f"Model {event.name} ready ({event.seconds:.1f} s)", "information"))
            update.dirty.add("header")
        elif isinstance(event, EngineError):
            if header.loading_model is not None:
                header.loading_model = None
                header.loading_progress = None
                update.dirty.add("header")
            text = event.message + (f"\n{last_line(event.detail)}" if event.detail else "")
            update.notifications.append((text, "error"))
        elif isinstance(event, Info):
            update.notifications.append((event.message, "information"))
        elif isinstance(event, Transferred):
            self.marks = dict(event.marks)
            update.notifications.append((event.message, "information"))
            update.dirty.add("timeline")

    def _promotion_started(self, event: RunStarted, update: Update) -> None:
        """A promotion run began: it shows in its trainer and the log, and changes nothing of the experiment
        (its status, seeds, time and val_bpb are the session's budget's)."""
        run = self._new_run(
            event.exp_id, event.seed, event.description, event.slot, event.where, promotion=event.promotion
        )
        self.newest_slot = event.slot
        banner = f"── {event.promotion} promotion: #{event.exp_id} seed {event.seed}{self._on(event)}: "
        banner += f"{event.description} ──"
        run.add_line(banner)
        if event.slot == self.shown_slot:
            update.log.lines.append(banner)
        update.dirty.update({"run", "trainers"})

    def _on(self, event: RunStarted) -> str:
        """' · trainer 2 on node-b' when there are several trainers; '' with one."""
        if self.n_trainers <= 1:
            return ""
        return f" · trainer {event.slot + 1}" + (f" on {event.where}" if event.where else "")

    def _new_run(
        self,
        exp_id: int,
        seed: int | None = None,
        description: str = "",
        slot: int = 0,
        where: str = "",
        promotion: str = "",
    ) -> LiveRun:
        """A fresh run in `slot`; only the curves of the trainers' runs and the best's are kept, so memory
        stays flat. A promotion run's curve is not the experiment's (another budget): it is not kept as one."""
        run = LiveRun(
            exp_id=exp_id,
            seed=seed,
            description=description,
            curve=Curve(exp_id=exp_id),
            slot=slot,
            where=where,
            promotion=promotion,
        )
        self.slots[slot] = run
        held = {r.exp_id for r in self.slots.values()} | {self.best_curve.exp_id}
        self.curves = {k: v for k, v in self.curves.items() if k in held}
        if not promotion:
            self.curves[exp_id] = run.curve
        return run

    def _slot_of(self, event: LogLine | StepMetric | RunFinished) -> int | None:
        """The trainer slot of the event's run: the engine's word when that slot runs the event's experiment,
        else the one that runs it still, else the last one."""
        if event.slot in self.slots and self.slots[event.slot].exp_id == event.exp_id:
            return event.slot
        holding = sorted(s for s, run in self.slots.items() if run.exp_id == event.exp_id)
        running = [s for s in holding if not self.slots[s].finished]
        chosen = running or holding
        return chosen[0] if chosen else None

    def _free_slot(self) -> int:
        """A slot for a run seen without its start: the first idle one, else the shown one."""
        for slot in range(self.n_trainers):
            run = self.slots.get(slot)
            if run is None or run.finished:
                return slot
        return self.shown_slot

    def _log_line(self, event: LogLine, update: Update) -> None:
        slot = self._slot_of(event)
        if slot is not None:
            self.slots[slot].add_line(event.text, event.replace)
            if slot != self.shown_slot:
                return  # another trainer's line: kept with its run, shown when the user picks it
        lines = update.log.lines
        if event.replace:
            if lines:
                lines[-1] = event.text
            else:
                update.log.replace_last = event.text
        else:
            lines.append(event.text)
        update.dirty.add("log")
