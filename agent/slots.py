"""The trainer slots: where each run trains, the thread that waits for it, and how busy the slots were.

The engine decides what runs when; `Slots` starts a run in a free slot on a thread of its own, reports how it
ended to the engine's inbox (`RunDone`), stops runs when asked, keeps the busy share, and replaces the
trainers when the engine asks (with no run in flight). It writes nothing itself: the run's process id goes to
the engine's `on_pid` (the books record it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agent.books import crash_point
from agent.edits import file_hash
from agent.events import EngineError, Event, EventSink, Info, LogLine, RunFinished, StepMetric
from agent.promotion import Job
from agent.sandbox.spec import PrepareError, RunRequest, RunResult
from agent.trainers.base import Trainer, TrainerFactory, TrainerLost


@dataclass
class Flight:
    """A run training in a slot."""

    exp_id: int
    n: int
    seed: int
    slot: int
    started: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    """Why it was stopped: stop, skip or shutdown."""
    pgid: int | None = None
    promotion: Job | None = None
    """A promotion run (`agent.promotion`): the experiment's train.py again at a larger budget."""


@dataclass(frozen=True)
class RunDone:
    """A slot's run ended: its result, or the trainer lost it, or the runner failed, or nothing can train."""

    slot: int
    result: RunResult | None = None
    lost: TrainerLost | None = None
    error: str = ""
    unpreparable: str = ""


class Slots:
    """`count` trainer slots, on this machine or through Ray at `ray`, made by `make_trainers`."""

    def __init__(
        self,
        make_trainers: TrainerFactory,
        count: int,
        ray: str | None,
        emit: EventSink,
        report: Callable[[RunDone], None],
        on_pid: Callable[[Flight, int], None],
    ) -> None:
        self._make, self._emit, self._report, self._on_pid = make_trainers, emit, report, on_pid
        self.count, self.ray = max(1, count), ray
        self.trainer: Trainer | None = None
        self.containment = ""
        """How the current (or last) trainers contain runs ('' until they are made; see Trainer)."""
        self.flights: dict[int, Flight] = {}
        self._lock = threading.Lock()
        self._since = self._session = time.monotonic()
        self._busy_s = 0.0
        self._promoted_s = 0.0
        """Of the busy seconds, those of promotion runs."""
        self._slot_s = 0.0
        """Slot-seconds of the trainer setups before the current one (the busy share's base)."""

    def open(self) -> Trainer:
        """Make the trainers (the engine's first step, and after each change); their containment is probed
        now, so that a partial one is said before any run."""
        self.trainer = self._make(self.count, self.ray, self._emit)
        self.containment = self.trainer.containment
        return self.trainer

    def restart_clock(self) -> None:
        """The session starts now: the busy share counts from here."""
        self._since = self._session = time.monotonic()

    def free(self) -> list[int]:
        with self._lock:
            return [slot for slot in range(self.count) if slot not in self.flights]

    def in_flight(self) -> list[Flight]:
        """The runs training now, in slot order."""
        with self._lock:
            return sorted(self.flights.values(), key=lambda f: f.slot)

    def newest(self) -> Flight | None:
        with self._lock:
            return max(self.flights.values(), key=lambda f: f.started, default=None)

    def stop(self, flight: Flight, why: str) -> None:
        if not flight.stop.is_set():
            flight.why = why
            flight.stop.set()

    def stop_all(self, why: str) -> None:
        for flight in self.in_flight():
            self.stop(flight, why)

    def kill_all(self) -> None:
        """Kill the runs in flight here at once (nothing recorded: the next start's recovery sees to it)."""
        for flight in self.in_flight():
            if flight.pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(flight.pgid, signal.SIGKILL)

    def occupy(self, flight: Flight) -> None:
        """`flight.slot` is taken from now on (the run is said before it trains: `start`)."""
        with self._lock:
            self.flights[flight.slot] = flight

    def start(self, flight: Flight, request: RunRequest) -> None:
        """Train `request` in the slot `flight` occupies, on a thread that reports to the engine when it ends."""
        name = f"autoresearch-trainer-{flight.slot}"
        threading.Thread(target=self._train, args=(flight, request), name=name, daemon=True).start()

    def _train(self, flight: Flight, request: RunRequest) -> None:
        trainer = self.trainer
        assert trainer is not None

        def started(pid: int) -> None:
            flight.pgid = pid
            self._on_pid(flight, pid)

        def emit(event: Event) -> None:
            if isinstance(event, LogLine | StepMetric | RunFinished):
                event = replace(event, slot=flight.slot)
                if flight.pgid is None and flight.promotion is None and not isinstance(event, RunFinished):
                    crash_point("during_run", flight.exp_id)  # a remote run has no pid here: its first line
            self._emit(event)

        try:
            result = trainer.run(flight.slot, request, emit, flight.stop, started)
        except TrainerLost as lost:
            self._report(RunDone(flight.slot, lost=lost))
        except PrepareError as exc:
            self._report(RunDone(flight.slot, unpreparable=str(exc)))
        except Exception as exc:
            self._report(RunDone(flight.slot, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        else:
            self._report(RunDone(flight.slot, result=result))

    def done(self, slot: int) -> Flight | None:
        """The flight of a slot whose run ended (None: it was not in flight), its time counted as busy."""
        with self._lock:
            flight = self.flights.pop(slot, None)
            if flight is not None:
                seconds = time.monotonic() - flight.started
                self._busy_s += seconds
                if flight.promotion is not None:
                    self._promoted_s += seconds
            return flight

    def trained_seconds(self) -> tuple[float, float]:
        """Trainer seconds of the runs that ended since the session started: all of them, and promotion's."""
        with self._lock:
            return self._busy_s, self._promoted_s

    def busy_share(self) -> float | None:
        """Seconds the trainers trained / (slots x wall seconds) since the session started."""
        now = time.monotonic()
        with self._lock:
            busy = self._busy_s + sum(now - f.started for f in self.flights.values())
            slot_seconds = self._slot_s + self.count * (now - self._since)
        return min(1.0, busy / slot_seconds) if now - self._session > 1.0 else None

    def change(self, count: int, ray: str | None) -> None:
        """Replace the trainers (no run is in flight): the old ones are closed, the new ones made; if they
        cannot be, the error is said and the old setup is made again."""
        words = training_on(count, ray)
        if (count, ray) == (self.count, self.ray) and self.trainer is not None:
            self._emit(Info(message=f"already {words}"))
            return
        before = (self.count, self.ray)
        self.close()
        self._set(count, ray)
        try:
            trainer = self.open()
        except Exception as exc:
            self._emit(EngineError(message=f"cannot start {words}: {exc}"))
            self._set(*before)
            trainer = self.open()
        self._emit(Info(message=f"training on {trainer.description}"))

    def _set(self, count: int, ray: str | None) -> None:
        """Change the slots, keeping the busy share's slot-seconds of the old ones."""
        with self._lock:
            now = time.monotonic()
            self._slot_s += self.count * (now - self._since)
            self.count, self.ray, self._since = max(1, count), ray, now

    def close(self) -> None:
        trainer, self.trainer = self.trainer, None
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.close()


def training_on(count: int, ray: str | None) -> str:
    """'training on 2 trainer(s) on Ray at local', for the user."""
    return f"training on {count} trainer(s) on " + (f"Ray at {ray}" if ray else "this machine")


def trial(trainer: Trainer, template: RunRequest, text: str, cancel: threading.Event) -> str | None:
    """(the proposer's thread) `Trainer.trial` of the candidate `text`, made like the first run `template`
    describes (its seed, budget and deadlines); its log beside the template's, named by the text's hash."""
    log_path = template.log_path.with_name(f"{file_hash(text)[:12]}.log")
    return trainer.trial(replace(template, train_source=text, log_path=log_path), cancel)
