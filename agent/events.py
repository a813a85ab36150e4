"""Immutable events: the one seam between the engine and whatever shows it (CLI lines, JSON, the TUI)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event; `ts` is the wall-clock time it was made."""

    ts: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return type(self).__name__


EventSink = Callable[[Event], None]


class EngineState(StrEnum):
    """What the engine is doing (a member equals its text)."""

    IDLE = "idle"
    BASELINE = "baseline"
    """Measuring the noise: the unmodified train.py over several seeds."""
    PROPOSING = "proposing"
    WAITING_REVIEW = "waiting_review"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True, kw_only=True)
class StateChanged(Event):
    """The engine's state changed (and what it is about: '#3 seed 1')."""

    state: EngineState
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    """A training run of experiment `exp_id` began (one per seed)."""

    exp_id: int
    description: str
    commit: str
    seed: int
    budget: str
    slot: int = 0
    """The trainer slot it runs in (0 .. trainers-1)."""
    where: str = ""
    """Where it trains when that is not this machine (a Ray node)."""
    promotion: str = ""
    """The rung of a promotion run ('4x': `agent.promotion`), which trains an experiment's train.py again at a
    larger budget and changes nothing of the experiment; '' for the experiment's own runs."""


@dataclass(frozen=True, kw_only=True)
class LogLine(Event):
    """One line of a run's output; `replace` means it overwrites the previous line (a `\\r` progress line)."""

    exp_id: int
    text: str
    replace: bool = False
    slot: int = 0
    """The trainer slot of the run (seeds of one experiment may train at once in several)."""


@dataclass(frozen=True, kw_only=True)
class StepMetric(Event):
    """One parsed progress line of a run: enough for a live loss curve."""

    exp_id: int
    step: int
    loss: float
    tokens_per_s: float
    slot: int = 0
    """The trainer slot of the run (seeds of one experiment may train at once in several)."""


@dataclass(frozen=True, kw_only=True)
class RunFinished(Event):
    """A run ended: outcome is ok, crash, timeout, oom, nan, invalid or interrupted."""

    exp_id: int
    outcome: str
    val_bpb: float | None
    seconds: float
    """The training process's wall time."""
    summary: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""
    judge_seconds: float = 0.0
    """The judge's wall time after it (load, scoring with its causality checks)."""
    slot: int = 0
    """The trainer slot of the run (seeds of one experiment may train at once in several)."""
    promotion: str = ""
    """The rung of a promotion run (see RunStarted); '' for the experiment's own runs."""


@dataclass(frozen=True, kw_only=True)
class Transferred(Event):
    """A promotion run ended (`agent.promotion`): what it measured, and each keep's marks per rung."""

    message: str
    marks: dict[int, str] = field(default_factory=dict)
    """Keep id -> one mark per rung, smallest first: '✓' transfers, '✗' does not, '…' pending."""


@dataclass(frozen=True, kw_only=True)
class NoiseMeasured(Event):
    """The baseline measured the noise: its spread over seeds, and the margin a candidate must beat."""

    values: tuple[float, ...]
    spread: float
    margin: float


@dataclass(frozen=True, kw_only=True)
class ProposalStarted(Event):
    """A proposer began thinking about the next experiment."""

    proposer: str
    model: str | None = None


@dataclass(frozen=True, kw_only=True)
class ProposalToken(Event):
    """A streamed piece of the model's reply."""

    text: str


@dataclass(frozen=True, kw_only=True)
class ProposalReady(Event):
    """A proposal that applies cleanly: its description, reasoning and unified diff."""

    exp_id: int
    description: str
    diff: str
    reasoning: str = ""
    proposer: str = ""


@dataclass(frozen=True, kw_only=True)
class ProposalRejected(Event):
    """A proposer failed to produce a valid proposal; every reply is kept."""

    exp_id: int | None
    reason: str
    replies: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ProposerWaiting(Event):
    """The proposer failed (a local server down, slow or failing); the engine asks again in `retry_in_s`."""

    reason: str
    retry_in_s: float
    failures: int = 1
    """Failures in a row, this one included."""
    failing_for_s: float = 0.0
    """Seconds since the first of them."""


@dataclass(frozen=True, kw_only=True)
class ReviewRequested(Event):
    """The review gate holds proposal `exp_id` until approve, edit or veto: both texts, to show and to edit."""

    exp_id: int
    description: str
    diff: str
    base_text: str = ""
    """The best train.py the proposal applies to."""
    candidate_text: str = ""
    """train.py with the proposal applied."""


@dataclass(frozen=True, kw_only=True)
class Decided(Event):
    """The verdict on an experiment: keep, discard, crash, ... ; `by` is engine or user (an override)."""

    exp_id: int
    status: str
    val_bpb: float | None
    best_bpb: float | None
    margin: float
    reason: str
    by: str = "engine"


@dataclass(frozen=True, kw_only=True)
class ModelLoading(Event):
    """A local model is being loaded or assembled; progress in [0, 1] when known."""

    name: str
    progress: float | None = None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(Event):
    """A local model is ready."""

    name: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class EngineError(Event):
    """Something went wrong that the user should see; the engine keeps going unless `fatal`."""

    message: str
    detail: str = ""
    fatal: bool = False


@dataclass(frozen=True, kw_only=True)
class Info(Event):
    """A plain informational message."""

    message: str


@dataclass(frozen=True)
class EngineSnapshot:
    """What a UI shows in its header; cheap to take, from any thread."""

    state: EngineState
    workspace: Path
    branch: str
    model: str | None
    device: str
    budget: str
    n_experiments: int
    baseline_bpb: float | None
    best_bpb: float | None
    best_exp_id: int | None
    margin: float | None
    review_gate: bool
    current_exp_id: int | None = None
    """The experiment being proposed, reviewed or run."""
    proposer: str = ""
    queued: int = 0
    """Proposals waiting to be re-run (reapplied or interrupted)."""
    containment: str = ""
    """How runs are contained: 'full', 'network' or 'none' (see agent.sandbox.containment); '' until known."""
    trainers: int = 1
    """Trainer slots (runs that can train at once)."""
    ray: str | None = None
    """Where the runs train as Ray tasks ('local', 'auto', an address); None: on this machine."""
    in_flight: tuple[int, ...] = ()
    """The experiments training now, one per busy slot (slot order)."""
    busy_share: float | None = None
    """Seconds the trainers spent training / (trainers x wall seconds) since the engine started."""
    experiments_per_hour: float | None = None
    """Experiments decided per hour of this session (rejected proposals not counted)."""


def first_line(text: str, limit: int = 300) -> str:
    """The first non-blank line of a message (a reason, an error), for a one-line summary of it."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:limit]


def last_line(text: str, limit: int = 300) -> str:
    """The last non-blank line of a log tail or a traceback, where its error is, cut as `first_line` cuts."""
    return first_line(next((line for line in reversed(text.splitlines()) if line.strip()), ""), limit)


def to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict of an event, with its kind."""
    data = dataclasses.asdict(event)
    data["kind"] = event.kind
    return data
