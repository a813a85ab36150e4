"""The research engine: a scheduler that keeps trainer slots busy, driven by one inbox, seen through events.

One experiment: take a proposal -> apply it to the best train.py -> validate (parses; only train.py changes;
the harness's SHA-256 is unchanged) -> commit (beside the branch) -> run in a free slot -> decide -> record.
The next proposal is thought of while runs train (`overlap`), and with several slots (local, one per GPU, or
Ray tasks) several experiments are out at once: each is judged against the best it started from, and a win
that lands after another keep is merged onto the new best and confirmed by a run before it is kept.
Bookkeeping (ledger, git, recovery) is `agent.books`; this module decides when things happen.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import statistics
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from agent import paths
from agent.books import CRASH_POINTS, Books, crash_point, queue_reapply
from agent.config import (
    EngineConfig,
    default_seeds,
    describe_budget,
    detect_device,
    estimate_training_seconds,
    resolve_budget,
)
from agent.containment import Containment
from agent.containment import probe as probe_containment
from agent.decisions import judge, judge_confirmed, noise_floor
from agent.edits import EditError, apply_edits, file_hash, unified_diff
from agent.events import (
    Decided,
    EngineError,
    Event,
    EventSink,
    Info,
    LogLine,
    ModelLoaded,
    ProposalReady,
    ProposalStarted,
    ProposerWaiting,
    ReviewRequested,
    RunFinished,
    RunStarted,
    StateChanged,
    StepMetric,
)
from agent.ledger import FAILED, RAN, Experiment, Ledger, Status, proposal_to_json
from agent.noop import Probe, ProbeCache, probe, probe_key, same_computation, static_noop
from agent.proposals import HistoryRow, Proposal, ProposalContext, ProposalFailed, Proposer
from agent.runner import PrepareError, RunResult, RunSpec, WarmJudge, prepare_for_runs
from agent.trainers import LocalTrainers, Trainer, TrainerLost
from agent.workspace import HARNESS, TRAIN, Workspace, WorkspaceError

PROPOSER_RETRY_S = (2.0, 60.0)
"""A proposer that fails (a local server down, slow or failing) is asked again after 2 s, then after twice
as long each time, at most 60 s ..."""
PROPOSER_PAUSE_AFTER_S = 300.0
"""... and once it has failed for this long the engine pauses and says why."""


@dataclass(frozen=True)
class EngineSnapshot:
    """What a UI shows in its header; cheap to take, from any thread."""

    state: str
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
    """How runs are contained here: 'full', 'network' or 'none' (see agent.containment), once probed."""
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


# ---- the inbox: user commands and what the engine's own threads report ----------------------------------


@dataclass(frozen=True)
class Wake:
    """Look at the flags again (pause, skip, stop, shutdown set them)."""


@dataclass(frozen=True)
class SetGate:
    on: bool


@dataclass(frozen=True)
class Approve:
    edited: Proposal | None = None


@dataclass(frozen=True)
class Veto:
    reason: str


@dataclass(frozen=True)
class Override:
    status: str
    exp_id: int | None
    by: str


@dataclass(frozen=True)
class Reapply:
    exp_id: int


@dataclass(frozen=True)
class ReloadProgram:
    pass


@dataclass(frozen=True)
class UseModel:
    name: str


@dataclass(frozen=True)
class SetProposer:
    proposer: Proposer


@dataclass(frozen=True)
class SetTrainers:
    """Train on `trainers` slots, through Ray at `ray` (None: on this machine), once the runs in flight end."""

    trainers: int
    ray: str | None = None


@dataclass(frozen=True)
class _RunDone:
    """A slot's run ended: its result, or the trainer lost it, or the runner itself failed."""

    slot: int
    result: RunResult | None = None
    lost: TrainerLost | None = None
    error: str = ""


@dataclass(frozen=True)
class _Proposed:
    """The proposer thread's answer: a proposal, None (no more ideas), or how it failed."""

    base_commit: str
    proposal: Proposal | None = None
    failed: ProposalFailed | None = None
    error: Exception | None = None
    detail: str = ""
    cancelled: bool = False


Command = (
    Wake
    | SetGate
    | Approve
    | Veto
    | Override
    | Reapply
    | ReloadProgram
    | UseModel
    | SetProposer
    | SetTrainers
)
_Message = Command | _RunDone | _Proposed


@dataclass
class _Item:
    """A proposal to try, and where it came from."""

    proposal: Proposal
    qid: int | None = None
    """Its row in the re-run queue."""
    source_exp_id: int | None = None
    force: bool = False
    """Run it even if the same train.py was tried before (a reapply, an interrupted run)."""
    base_commit: str | None = None
    """The best commit the proposer saw; the edits are re-applied to the best at dispatch time."""


@dataclass
class _Flight:
    """A run training in a slot."""

    exp_id: int
    n: int
    seed: int
    slot: int
    started: float
    stop: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    """Why it was stopped: stop, skip or shutdown."""
    pgid: int | None = None
    probe_against: tuple[int, str] | None = None
    """Probe first (a candidate's first run on this machine): the parent's id and train.py to compare with."""


@dataclass
class _Thinking:
    cancel: threading.Event
    thread: threading.Thread


@dataclass
class _Review:
    exp_id: int
    item: _Item
    parent: str
    base_text: str
    new_text: str
    diff: str
    cancelled: str = ""


class Engine:
    """The autoresearch scheduler over one workspace. Commands are thread-safe and return at once.

    One engine thread owns the ledger and git (through `Books`) and consumes one inbox: the user's commands and
    what its helper threads report — a proposer thread (one proposal at a time) and one thread per busy trainer
    slot. Runs wait in a queue for a free slot; proposals wait (bounded) for a slot to run in.
    """

    def __init__(
        self,
        workspace: Workspace,
        proposer: Proposer,
        config: EngineConfig,
        sink: EventSink,
        trainer: Trainer | None = None,
    ) -> None:
        self.ws = workspace
        self.proposer = proposer
        self.config = config
        self._sink = sink
        self.ledger = Ledger(workspace.ledger_path)
        self.books = Books(workspace, self.ledger, config, self._emit)
        self.device = detect_device()
        self.seeds = config.seeds or default_seeds(self.device)
        self.overlap = config.overlap if config.overlap is not None else self.device.startswith("cuda")
        self.error: str | None = None
        """The fatal error that ended the loop, if any."""
        self._trainer = trainer
        self._slots = trainer.slots if trainer is not None else max(1, config.trainers)
        self._lock = threading.RLock()
        self._inbox: queue.Queue[_Message] = queue.Queue()
        self._state = "idle"
        self._review_gate = config.review_gate
        self._pause_requested = False
        self._shutdown = False
        self._fatal = False
        self._current: int | None = None
        self._veto_reason: str | None = None
        self._program = workspace.read_program()
        self._session_count = 0
        self._proposer_errors = 0
        self._proposer_failing_since = 0.0
        self._retry_at = 0.0
        self._dry = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._contained: Containment | None = None
        self._containment_checked = False
        self._hidden: tuple[Path, ...] | None = None
        self._warm_judge: WarmJudge | None = None
        self._resume_ids: list[int] = []
        self._flights: dict[int, _Flight] = {}
        self._waiting: deque[tuple[int, int]] = deque()
        """Runs (exp_id, seed) ready to train, waiting for a free slot."""
        self._ready: deque[_Item] = deque()
        self._thinking: _Thinking | None = None
        self._review: _Review | None = None
        self._deferred: list[Command] = []
        """Model switches asked for while the proposer thinks: done once it has answered."""
        self._baseline_announced = False
        self._said = ("idle", "")
        """The state and detail last said (StateChanged), so that each is said once."""
        self._probes = ProbeCache()
        self._started = time.monotonic()
        self._busy_s = 0.0
        self._slot_s = 0.0
        """Slot-seconds of the trainer setups this session had before the current one (busy share's base)."""
        self._slots_since = self._started
        self._retrain: SetTrainers | None = None
        """A change of trainers asked for: nothing new starts until the runs in flight end and it is made."""
        self._decided_runs = 0

    # ---- the command API (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="autoresearch-engine", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop to end (at most `timeout` seconds); see `finished`."""
        self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        """Whether the loop has ended."""
        return self._done.is_set()

    def pause(self) -> None:
        """Start nothing new; runs in flight finish (and are decided)."""
        with self._lock:
            self._pause_requested = True
        self._inbox.put(Wake())

    def resume(self) -> None:
        with self._lock:
            self._pause_requested = False
        self._inbox.put(Wake())

    def stop_run(self) -> None:
        """Kill the runs in flight now, record them as interrupted, and pause."""
        with self._lock:
            self._pause_requested = True
            self._cancel_everything("stop")
        self._inbox.put(Wake())

    def skip(self) -> None:
        """Drop what the user is looking at and go on: the proposal under review, else the newest run, else
        the proposal being thought of."""
        with self._lock:
            if self._review is not None:
                self._review.cancelled = self._review.cancelled or "skip"
            elif self._flights:
                newest = max(self._flights.values(), key=lambda f: f.started)
                self._stop_flight(newest, "skip")
            elif self._thinking is not None:
                self._thinking.cancel.set()
        self._inbox.put(Wake())

    def shutdown(self) -> None:
        """End the loop: runs in flight are killed, recorded as interrupted and re-queued."""
        with self._lock:
            self._shutdown = True
            self._cancel_everything("shutdown")
        self._inbox.put(Wake())

    def set_review_gate(self, on: bool) -> None:
        """Hold each proposal for approve/edit/veto (on), or not; turning it off releases a waiting proposal."""
        with self._lock:
            self._review_gate = bool(on)
        self._inbox.put(SetGate(bool(on)))

    def abort(self) -> None:
        """Kill the runs in flight at once (a second Ctrl-C); nothing is recorded: recover() sees to that."""
        with self._lock:
            groups = [f.pgid for f in self._flights.values() if f.pgid is not None]
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def approve(self, edited: Proposal | None = None) -> None:
        """Let the proposal under review run, or run `edited` in its place."""
        self._inbox.put(Approve(edited))

    def veto(self, reason: str) -> None:
        """Refuse the proposal under review; the reason goes back to the proposer."""
        self._inbox.put(Veto(reason))

    def override(self, status: str, exp_id: int | None = None, by: str = "user") -> None:
        """Force keep or discard of a decision (None: the last one); recorded with who decided."""
        self._inbox.put(Override(status, exp_id, by))

    def reapply(self, exp_id: int) -> None:
        """Queue a (discarded) experiment's change again, on top of the current best."""
        self._inbox.put(Reapply(exp_id))

    def reload_program(self) -> None:
        self._inbox.put(ReloadProgram())

    def use_model(self, name: str) -> None:
        """Switch the proposer's model between proposals."""
        self._inbox.put(UseModel(name))

    def set_proposer(self, proposer: Proposer) -> None:
        """Take the proposals from another proposer from the next one on (the cockpit's random search)."""
        self._inbox.put(SetProposer(proposer))

    def set_trainers(self, trainers: int, ray: str | None = None) -> None:
        """Train on `trainers` slots, as Ray tasks at `ray` ('local', 'auto', an ADDRESS) or on this machine
        (None), from now on: nothing new starts until the runs in flight have ended, then the trainers are
        replaced (a setup that cannot start is reported and the old one kept)."""
        if not isinstance(trainers, int) or trainers < 1:
            raise ValueError(f"trainers must be a whole number of at least 1, not {trainers!r}")
        self._inbox.put(SetTrainers(trainers, (ray or "").strip() or None))

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            state, current, gate = self._state, self._current, self._review_gate
            flights = sorted(self._flights.values(), key=lambda f: f.slot)
            in_flight = tuple(f.exp_id for f in flights)
            now = time.monotonic()
            busy = self._busy_s + sum(now - f.started for f in flights)
            decided = self._decided_runs
            slot_seconds = self._slot_s + self._slots * (now - self._slots_since)
        wall = max(now - self._started, 1e-9)
        best = self.books.best()
        noise = self.ledger.get_meta("noise")
        return EngineSnapshot(
            state=state,
            workspace=self.ws.path,
            branch=self.ws.branch,
            model=getattr(self.proposer, "model_name", None),
            device=self.device,
            budget=describe_budget(self.config.budget, self.device),
            n_experiments=self.ledger.count(),
            baseline_bpb=self.ledger.get_meta("baseline_bpb"),
            best_bpb=best.val_bpb if best else None,
            best_exp_id=best.id if best else None,
            margin=noise["margin"] if noise else None,
            review_gate=gate,
            current_exp_id=current,
            proposer=getattr(self.proposer, "name", ""),
            queued=len(self.ledger.queued()),
            containment=self._contained.level if self._contained else "",
            trainers=self._slots,
            ray=self.config.ray,
            in_flight=in_flight,
            busy_share=min(1.0, busy / slot_seconds) if wall > 1.0 else None,
            experiments_per_hour=decided * 3600.0 / wall if decided else None,
        )

    def close(self) -> None:
        self.ledger.close()

    # ---- plumbing -------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a broken display must not stop the research
            self._sink(event)

    def _set_state(self, state: str, detail: str = "") -> None:
        """Say the engine's state (and what it is about), once per change."""
        with self._lock:
            said, self._said = self._said, (state, detail)
            self._state = state
        if (state, detail) != said:
            self._emit(StateChanged(state=state, detail=detail))

    def _stop_flight(self, flight: _Flight, why: str) -> None:
        if not flight.stop.is_set():
            flight.why = why
            flight.stop.set()

    def _cancel_everything(self, why: str) -> None:
        """(lock held) Stop every run, the proposal being thought of and the one under review."""
        for flight in self._flights.values():
            self._stop_flight(flight, why)
        if self._thinking is not None:
            self._thinking.cancel.set()
        if self._review is not None:
            self._review.cancelled = why if why == "shutdown" else (self._review.cancelled or why)

    def _paused(self) -> bool:
        with self._lock:
            return self._pause_requested and not self._shutdown

    def _stopping(self) -> bool:
        with self._lock:
            return self._shutdown or self._fatal

    def _free_slots(self) -> list[int]:
        """Slots that can take a run now: none while the trainers are being changed."""
        with self._lock:
            busy = set(self._flights)
        if self._retrain is not None:
            return []
        return [slot for slot in range(self._slots) if slot not in busy]

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the loop in the calling thread until the proposer runs dry, max_experiments, or shutdown."""
        try:
            with self.ws.engine_lock():
                self._containment()
                self.recover()
                self._check_harness_hands_over()
                self._settle_budget()
                if self._trainer is None:
                    self._trainer = self._make_trainer()
                self._emit(Info(message=f"training on {self._trainer.description}"))
                self._started = self._slots_since = time.monotonic()
                self._loop()
                self._emit(Info(message=self._session_summary()))
        except (WorkspaceError, PrepareError) as exc:
            self.error = (
                str(exc) if isinstance(exc, WorkspaceError) else f"the data could not be prepared: {exc}"
            )
            self._emit(EngineError(message=self.error, fatal=True))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self._emit(EngineError(message=self.error, detail=traceback.format_exc(), fatal=True))
        finally:
            self._abandon()
            if self._trainer is not None:
                with contextlib.suppress(Exception):
                    self._trainer.close()
            if self._warm_judge is not None:
                self._warm_judge.close()
                self._warm_judge = None
            self._set_state("stopped")
            self._done.set()

    def _session_summary(self) -> str:
        snap = self.snapshot()
        minutes = (time.monotonic() - self._started) / 60
        words = f"this session: {self._decided_runs} experiment(s) decided in {minutes:.1f} min"
        if snap.busy_share is not None:
            words += f"; {snap.trainers} trainer(s) busy {snap.busy_share:.0%} of the time"
        if snap.experiments_per_hour is not None:
            words += f", {snap.experiments_per_hour:.1f} experiments/hour"
        return words

    def _make_trainer(self) -> Trainer:
        if self.config.ray:
            from agent.ray_trainers import RayTrainers  # Ray is imported only when asked for

            return RayTrainers(self.config.ray, self._slots, self.device)
        gpus = self._slots if self.device.startswith("cuda") else 0
        return LocalTrainers(self._slots, self._containment, self._judge_for_runs, gpus=gpus)

    @staticmethod
    def _trainers_words(setup: SetTrainers) -> str:
        where = f"Ray at {setup.ray}" if setup.ray else "this machine"
        return f"training on {setup.trainers} trainer(s) on {where}"

    def _change_trainers(self, wanted: SetTrainers) -> None:
        """Replace the trainers (no run is in flight): the old ones are closed, the new ones made; if they
        cannot be, the error is said and the old setup is made again."""
        self._retrain = None
        if (wanted.trainers, wanted.ray) == (self._slots, self.config.ray) and self._trainer is not None:
            self._emit(Info(message=f"already {self._trainers_words(wanted)}"))
            return
        before, slots = self.config, self._slots
        if self._trainer is not None:
            with contextlib.suppress(Exception):
                self._trainer.close()
            self._trainer = None
        self._set_slots(wanted.trainers)
        self.config = replace(self.config, trainers=wanted.trainers, ray=wanted.ray)
        try:
            self._trainer = self._make_trainer()
        except Exception as exc:
            self._emit(EngineError(message=f"cannot start {self._trainers_words(wanted)}: {exc}"))
            self.config = before
            self._set_slots(slots)
            self._trainer = self._make_trainer()
        self._emit(Info(message=f"training on {self._trainer.description}"))

    def _set_slots(self, slots: int) -> None:
        """Change the number of trainer slots, keeping the busy share's slot-seconds of the old ones."""
        with self._lock:
            now = time.monotonic()
            self._slot_s += self._slots * (now - self._slots_since)
            self._slots, self._slots_since = max(1, slots), now

    def _abandon(self) -> None:
        """The loop ended abnormally with work in flight: stop it; recover() records it next time."""
        with self._lock:
            self._cancel_everything("shutdown")
            threads = [self._thinking.thread] if self._thinking else []
        deadline = time.monotonic() + 30
        while self._flights and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                message = self._inbox.get(timeout=0.2)
                if isinstance(message, _RunDone):
                    with self._lock:
                        flight = self._flights.pop(message.slot, None)
                    if flight is not None and message.result is not None:
                        with contextlib.suppress(Exception):
                            self._record_run(flight, message.result)
        for thread in threads:
            thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            self._schedule()
            if self._ended():
                return
            with contextlib.suppress(queue.Empty):
                wait = (
                    0.5 if self._retry_at <= time.monotonic() else min(0.5, self._retry_at - time.monotonic())
                )
                self._handle(self._inbox.get(timeout=max(wait, 0.01)))
                while True:  # everything already waiting, before scheduling again
                    self._handle(self._inbox.get_nowait())

    def _schedule(self) -> None:
        """Start what can start: waiting runs in free slots, the baseline, new experiments, the next proposal."""
        if self._stopping():
            with self._lock:
                self._cancel_everything("shutdown")
            self._drop_waiting_runs()
            self._settle_review()
            self._show_state()
            return
        self._settle_review()
        if self._retrain is not None and not self._flights:
            self._change_trainers(self._retrain)
        self._start_waiting_runs()
        if not self._baseline_decided():
            self._advance_baseline()
            self._show_state()
            return
        while self._resume_ids:
            self._advance(self._resume_ids.pop(0))
        while (
            not self._paused()
            and self._review is None
            and len(self._free_slots()) > len(self._waiting)
            and not self._limit_reached()
        ):
            item = self._take_item()
            if item is None:
                break
            self._start_experiment(item)
        if self._want_proposal():
            self._start_thinking()
        self._show_state()

    def _ended(self) -> bool:
        with self._lock:
            busy = bool(self._flights or self._waiting or self._thinking or self._review)
        if busy:
            return False
        if self._stopping():
            return True
        if self._paused() or not self._baseline_decided():
            return False
        if self._limit_reached():
            self._emit(Info(message=f"reached --max-experiments {self.config.max_experiments}"))
            return True
        if self._dry and not self._ready and not self.ledger.queued():
            name = getattr(self.proposer, "name", "proposer")
            self._emit(Info(message=f"nothing more to try: the {name} proposer has no more proposals"))
            return True
        return False

    def _limit_reached(self) -> bool:
        limit = self.config.max_experiments
        return limit is not None and self._session_count >= limit

    def _show_state(self) -> None:
        with self._lock:
            flights = sorted(self._flights.values(), key=lambda f: f.started)
            review, thinking = self._review, self._thinking
        if review is not None:
            self._set_state("waiting_review")
        elif flights:
            newest = flights[-1]
            state = "baseline" if newest.exp_id == 0 else "running"
            self._set_state(state, f"#{newest.exp_id} seed {newest.seed}")
        elif thinking is not None:
            self._set_state("proposing")
        elif self._paused():
            self._set_state("paused")
        else:
            self._set_state("idle")

    def _handle(self, message: _Message) -> None:
        if isinstance(message, _RunDone):
            self._run_done(message)
            return
        if isinstance(message, _Proposed):
            self._proposed(message)
            return
        self._retry_at = 0.0  # any command ends a wait for a failing proposer
        if isinstance(message, Wake):
            return
        if isinstance(message, SetGate):
            self._emit(Info(message=f"review gate {'on' if message.on else 'off'}"))
        elif isinstance(message, Approve | Veto):
            if self._review is None:
                name = "approve" if isinstance(message, Approve) else "veto"
                self._emit(Info(message=f"nothing is waiting for review ({name} ignored)"))
            else:
                self._resolve_review(message)
        elif isinstance(message, Override):
            self.books.override(message.status, message.exp_id, message.by)
        elif isinstance(message, Reapply):
            try:
                self._emit(Info(message=queue_reapply(self.ledger, message.exp_id)))
            except ValueError as exc:
                self._emit(EngineError(message=str(exc)))
        elif isinstance(message, ReloadProgram):
            self._program = self.ws.read_program()
            self._emit(Info(message="program.md reloaded"))
        elif isinstance(message, SetTrainers):
            self._retrain = message
            if self._flights:
                self._emit(Info(message=f"{self._trainers_words(message)} once the runs in flight end"))
        elif isinstance(message, UseModel | SetProposer):
            if self._thinking is not None:
                self._deferred.append(message)
            else:
                self._switch(message)

    def _switch(self, message: UseModel | SetProposer) -> None:
        if isinstance(message, SetProposer):
            self.proposer = message.proposer
            name = getattr(message.proposer, "model_name", None) or message.proposer.name
            self._emit(ModelLoaded(name=name, seconds=0.0))
            return
        use = getattr(self.proposer, "use_model", None)
        if use is None:
            self._emit(EngineError(message=f"the {self.proposer.name} proposer has no model to switch"))
            return
        try:
            use(message.name, self._emit)
        except Exception as exc:
            self._emit(EngineError(message=f"cannot switch to model {message.name}: {exc}"))

    # ---- proposals ------------------------------------------------------------------------------------

    def _context(self) -> ProposalContext:
        experiments = self.ledger.experiments()
        history = tuple(
            HistoryRow(
                exp_id=e.id,
                description=e.description,
                status=e.status,
                val_bpb=e.val_bpb,
                crash_tail="\n".join(e.log_tail.splitlines()[-15:]) if e.status in FAILED else "",
            )
            for e in experiments
            if e.phase == "decided"
        )
        best = self.books.best()
        noise = self.ledger.get_meta("noise")
        with self._lock:
            veto, self._veto_reason = self._veto_reason, None
        tried = {
            e.train_hash for e in experiments if e.train_hash and (e.status in RAN or e.phase != "decided")
        }
        return ProposalContext(
            program_md=self._program,
            train_py=self.ws.file_at(self.books.best_commit()),
            history=history,
            best_bpb=best.val_bpb if best else None,
            noise_margin=noise["margin"] if noise else None,
            budget=describe_budget(self.config.budget, self.device),
            tried_hashes=frozenset(tried),
            veto_reason=veto,
        )

    def _want_proposal(self) -> bool:
        with self._lock:
            if self._thinking is not None or self._review is not None:
                return False
        if self._paused() or self._dry or time.monotonic() < self._retry_at:
            return False
        limit = self.config.max_experiments
        if limit is not None and self._session_count + len(self._ready) >= limit:
            return False
        if self.ledger.queued():
            return False
        room = len(self._free_slots()) - len(self._waiting)
        return room > len(self._ready) or (self.overlap and not self._ready)

    def _start_thinking(self) -> None:
        context = self._context()
        base = self.books.best_commit()
        cancel = threading.Event()
        proposer = self.proposer
        thread = threading.Thread(
            target=self._think,
            args=(proposer, context, base, cancel),
            name="autoresearch-proposer",
            daemon=True,
        )
        with self._lock:
            self._thinking = _Thinking(cancel, thread)
        self._emit(ProposalStarted(proposer=proposer.name, model=getattr(proposer, "model_name", None)))
        thread.start()

    def _think(
        self, proposer: Proposer, context: ProposalContext, base: str, cancel: threading.Event
    ) -> None:
        """The proposer thread: one proposal, reported to the inbox."""
        try:
            proposal = proposer.propose(context, self._emit, cancel)
        except ProposalFailed as exc:
            self._inbox.put(_Proposed(base, failed=exc, cancelled=cancel.is_set()))
        except Exception as exc:
            self._inbox.put(
                _Proposed(base, error=exc, detail=traceback.format_exc(), cancelled=cancel.is_set())
            )
        else:
            # A model cancelled mid-reply returns None, which must not read as "no more proposals".
            self._inbox.put(_Proposed(base, proposal=proposal, cancelled=cancel.is_set()))

    def _proposed(self, message: _Proposed) -> None:
        with self._lock:
            thinking, self._thinking = self._thinking, None
        if thinking is not None:
            thinking.thread.join(timeout=5)
        deferred, self._deferred = self._deferred, []
        for switch in deferred:
            self._switch(switch)  # type: ignore[arg-type]
        if message.cancelled:
            self._proposer_errors = 0
            return  # dropped by the user (skip, stop) or the engine is stopping: not the model's failure
        if message.failed is not None:
            self._proposer_errors = 0
            exc = message.failed
            self._reject_new(
                Proposal(
                    description="(no valid proposal)",
                    edits=(),
                    proposer=self.proposer.name,
                    model=exc.model,
                    replies=exc.replies,
                ),
                exc.reason,
            )
            return
        if message.error is not None:
            self._proposer_failed(message.error, message.detail)
            return
        self._proposer_errors = 0
        proposal = message.proposal
        if proposal is None:
            self._dry = True
            return
        if proposal.key and self._key_tried(proposal.key):
            self._emit(Info(message=f"already tried, skipped: {proposal.description}"))
            return
        self._ready.append(_Item(proposal, base_commit=message.base_commit))

    def _proposer_failed(self, exc: Exception, detail: str) -> None:
        """The proposer raised (its server is down, slow or failing): ask again later, longer each time; pause
        with the reason once it has failed for PROPOSER_PAUSE_AFTER_S. Nothing is recorded; any command ends
        the wait."""
        now = time.monotonic()
        self._proposer_errors += 1
        if self._proposer_errors == 1:
            self._proposer_failing_since = now
        failing_for = now - self._proposer_failing_since
        reason = str(exc) or type(exc).__name__
        if failing_for >= PROPOSER_PAUSE_AFTER_S:
            self._proposer_errors = 0
            with self._lock:
                self._pause_requested = True
            self._emit(
                EngineError(
                    message=f"paused: the proposer has failed for {failing_for / 60:.0f} min ({reason}); "
                    "resume once it answers again (p in the cockpit; Ctrl-C stops a headless run)",
                    detail=detail,
                )
            )
            return
        first, longest = PROPOSER_RETRY_S
        delay = min(longest, first * 2 ** (self._proposer_errors - 1))
        self._emit(
            ProposerWaiting(
                reason=reason, retry_in_s=delay, failures=self._proposer_errors, failing_for_s=failing_for
            )
        )
        self._retry_at = now + delay

    def _key_tried(self, key: str) -> bool:
        if any(q.proposal.key == key for q in self.ledger.queued()):
            return True
        if any(item.proposal.key == key for item in self._ready):
            return True
        return any(
            e.idea_key == key and (e.phase != "decided" or e.status != Status.INTERRUPTED)
            for e in self.ledger.experiments()
        )

    def _take_item(self) -> _Item | None:
        queued = self.ledger.queued()
        if queued:
            q = queued[0]
            return _Item(q.proposal, qid=q.qid, source_exp_id=q.source_exp_id, force=True)
        return self._ready.popleft() if self._ready else None

    def _reject_new(self, proposal: Proposal, reason: str) -> None:
        self.books.record_rejected(proposal, reason, self.proposer.name)
        self._session_count += 1

    def _candidate_text(self, item: _Item, parent: str, base_text: str) -> str:
        """train.py after the item's edits on the best (EditError if they do not apply or touch another file).

        Edits that no longer apply because the best moved (a keep while the proposal was made or queued) are
        applied where they were made and merged onto the best; a reapplied change is merged the same way."""
        for number, edit in enumerate(item.proposal.edits, start=1):
            if edit.path != TRAIN:
                frozen = " (the frozen harness)" if edit.path in HARNESS else ""
                raise EditError(f"edit {number} targets {edit.path}{frozen}: only train.py may be changed")
        try:
            return apply_edits(base_text, item.proposal.edits)
        except EditError:
            merged = self._merged_text(item, parent, base_text)
            if merged is None:
                raise
            return merged

    def _merged_text(self, item: _Item, parent: str, base_text: str) -> str | None:
        if item.source_exp_id is not None:
            source = self.ledger.get(item.source_exp_id)
            if source is None or not (
                self.ws.is_commit(source.commit) and self.ws.is_commit(source.parent_commit)
            ):
                return None
            assert source.commit and source.parent_commit
            return self.books.merge(
                self.ws.file_at(source.parent_commit), self.ws.file_at(source.commit), base_text
            )
        if item.base_commit is None or item.base_commit == parent or not self.ws.is_commit(item.base_commit):
            return None
        ancestor = self.ws.file_at(item.base_commit)
        try:
            theirs = apply_edits(ancestor, item.proposal.edits)
        except EditError:
            return None
        return self.books.merge(ancestor, theirs, base_text)

    # ---- one experiment: proposal -> (review) -> commit -> runs -> decision ------------------------------

    def _start_experiment(self, item: _Item) -> None:
        parent = self.books.best_commit()
        base_text = self.ws.file_at(parent)
        proposal = item.proposal
        exp_id = self.ledger.next_id()
        with self._lock:
            self._current = exp_id
        try:
            new_text = self._candidate_text(item, parent, base_text)
            digest = file_hash(new_text)  # also refuses text that is not valid UTF-8 (a lone surrogate)
        except EditError as exc:
            self._consume_queue_item(item)
            self._reject_new(proposal, str(exc))
            return
        except Exception as exc:  # whatever one proposal holds, it is that proposal's problem, not the loop's
            self._consume_queue_item(item)
            self._reject_new(proposal, f"the proposal cannot be applied: {type(exc).__name__}: {exc}"[:300])
            return
        twin = self._twin(digest)
        if twin is not None and not item.force:
            self._reject_new(proposal, f"duplicate: this train.py was already tried as #{twin.id}")
            return
        noop = static_noop(base_text, new_text)
        diff = unified_diff(base_text, new_text)
        with self.ledger.transaction() as conn:
            self.ledger._insert(
                conn,
                exp_id,
                Status.PENDING,
                "proposed",
                parent_commit=parent,
                base_commit=item.base_commit if item.base_commit not in (None, parent) else None,
                description=proposal.description,
                proposal=proposal_to_json(proposal),
                diff=diff,
                proposer=proposal.proposer or self.proposer.name,
                model=proposal.model,
                temperature=proposal.temperature,
                seed=proposal.seed,
                train_hash=digest,
                idea_key=proposal.key,
                requeued_from=item.source_exp_id,
            )
            if item.qid is not None:
                self.ledger.dequeue(item.qid, conn)
        self._session_count += 1
        crash_point("after_propose", exp_id)
        self._emit(
            ProposalReady(
                exp_id=exp_id,
                description=proposal.description,
                diff=diff,
                reasoning=proposal.reasoning,
                proposer=proposal.proposer or self.proposer.name,
            )
        )
        with self._lock:
            gate = self._review_gate
        if noop is not None:  # the same program: nothing to train, nothing to review
            self._decide(exp_id, Status.NOOP, noop)
            return
        if gate:
            with self._lock:
                self._review = _Review(exp_id, item, parent, base_text, new_text, diff)
            self._set_state("waiting_review")
            self._emit(ReviewRequested(exp_id=exp_id, description=proposal.description, diff=diff))
            return
        self._commit_and_run(exp_id, proposal, new_text, parent)

    def _twin(self, digest: str) -> Experiment | None:
        """An experiment with this train.py that ran, or is in flight."""
        return next(
            (
                e
                for e in self.ledger.experiments()
                if e.train_hash == digest and (e.status in RAN or (e.phase != "decided" and e.commit))
            ),
            None,
        )

    def _consume_queue_item(self, item: _Item) -> None:
        if item.qid is not None:
            self.ledger.dequeue(item.qid)

    def _settle_review(self) -> None:
        """Act on a review the user or the engine dropped (skip, stop, shutdown) or released (gate off)."""
        with self._lock:
            review, gate = self._review, self._review_gate
        if review is None:
            return
        if review.cancelled:
            with self._lock:
                self._review = None
            if review.cancelled == "shutdown":
                self.books.interrupt(
                    review.exp_id, "the engine stopped while the proposal waited for review", requeue=True
                )
            else:
                self.books.finish_unrun(review.exp_id, Status.VETOED, "skipped by the user")
        elif not gate:
            self._emit(Info(message=f"#{review.exp_id} approved: the review gate was turned off"))
            self._resolve_review(Approve())

    def _resolve_review(self, answer: Approve | Veto) -> None:
        review = self._review
        assert review is not None
        exp_id, proposal = review.exp_id, review.item.proposal
        if isinstance(answer, Veto):
            reason = str(answer.reason or "vetoed by the user")
            with self._lock:
                self._veto_reason = reason
                self._review = None
            self.books.finish_unrun(exp_id, Status.VETOED, reason)
            return
        text = review.new_text
        if answer.edited is not None:
            edited: Proposal = replace(answer.edited, proposer=answer.edited.proposer or "user")
            try:
                text = self._candidate_text(_Item(edited), review.parent, review.base_text)
            except EditError as exc:
                self._emit(EngineError(message=f"the edited proposal does not apply: {exc}"))
                self._emit(ReviewRequested(exp_id=exp_id, description=proposal.description, diff=review.diff))
                return
            proposal = edited
            new_diff = unified_diff(review.base_text, text)
            self.ledger.update(
                exp_id,
                description=edited.description,
                proposal=proposal_to_json(edited),
                diff=new_diff,
                proposer=edited.proposer,
                train_hash=file_hash(text),
            )
            self._emit(
                ProposalReady(
                    exp_id=exp_id,
                    description=edited.description,
                    diff=new_diff,
                    reasoning=edited.reasoning,
                    proposer=edited.proposer,
                )
            )
        with self._lock:
            self._review = None
        parent = self.books.best_commit()
        if parent != review.parent:  # a keep landed while it waited: apply it to the new best
            merged = self.books.merge(review.base_text, text, self.ws.file_at(parent))
            if merged is None:
                self.books.record_rejected(
                    proposal,
                    "the best changed while it waited for review and the change no longer applies to it",
                    self.proposer.name,
                    exp_id,
                )
                return
            text = merged
            self.ledger.update(
                exp_id,
                parent_commit=parent,
                base_commit=review.parent,
                diff=unified_diff(self.ws.file_at(parent), text),
                train_hash=file_hash(text),
            )
        self._commit_and_run(exp_id, proposal, text, parent)

    def _commit_and_run(self, exp_id: int, proposal: Proposal, new_text: str, parent: str) -> None:
        if problems := self.ws.harness_problems():
            self.ws.restore_harness()
            reason = (
                f"the frozen harness changed ({', '.join(problems)}); restored it and refused the proposal"
            )
            self.books.record_rejected(proposal, reason, self.proposer.name, exp_id)
            return
        message = (
            f"{proposal.description}\n\nexperiment #{exp_id} by {proposal.proposer or self.proposer.name}"
        )
        if proposal.model:
            message += f" ({proposal.model})"
        commit = self.ws.commit_candidate(new_text, parent, message)
        crash_point("after_commit", exp_id)
        self.ledger.update(exp_id, commit=commit, phase="committed")
        self._advance(exp_id)

    def _advance(self, exp_id: int) -> None:
        """The next step of a committed experiment, from its runs so far: a run to start, or the decision."""
        exp = self.ledger.get(exp_id)
        assert exp is not None and exp.commit
        runs = self.books.current_runs(exp)
        if not runs:
            self._queue_run(exp_id, self.config.base_seed)
            return
        first = runs[0]
        if first.outcome != "ok" or first.val_bpb is None:
            self._decide(exp_id, first.outcome or Status.CRASH, first.reason or "the run failed")
            return
        against = self._started_from(exp)
        best, margin = against.val_bpb, self.books.margin()
        assert best is not None
        verdict = judge(first.val_bpb, best, margin, self.config.confirm_marginal)
        if verdict.status == "confirm":
            if len(runs) < 2:
                self._emit(Info(message=f"#{exp_id}: {verdict.reason}"))
                self._queue_run(exp_id, self.config.base_seed + 1)
                return
            second = runs[1]
            if second.outcome != "ok" or second.val_bpb is None:
                self._decide(
                    exp_id, Status.DISCARD, f"{verdict.reason}; the confirmation run failed: {second.outcome}"
                )
                return
            verdict = judge_confirmed([first.val_bpb, second.val_bpb], best, margin)
        if verdict.status == Status.KEEP and exp.parent_commit != self.books.best_commit():
            self._merge_onto_best(exp, against, verdict.reason)
            return
        reason = verdict.reason
        if len(self.ledger.runs(exp_id)) > len(runs):  # it trained before on the commit it was merged from
            started = self.books.experiment_at(exp.base_commit)
            reason = (
                f"beat #{started.id if started else '?'}, the best it started from, and was merged onto the new "
                f"best #{against.id}; its run there: {reason}"
            )
        self._decide(exp_id, verdict.status, reason)

    def _started_from(self, exp: Experiment) -> Experiment:
        """The kept experiment (or baseline) `exp` was applied to: what it is judged against."""
        parent = self.books.experiment_at(exp.parent_commit)
        if parent is not None and parent.val_bpb is not None:
            return parent
        best = self.books.best()
        assert best is not None
        return best

    def _merge_onto_best(self, exp: Experiment, against: Experiment, reason: str) -> None:
        """`exp` beat the best it started from, but another keep landed while it ran: merge its change onto
        the new best and confirm that with a run before it is kept (a conflict: discarded)."""
        assert exp.commit and exp.parent_commit
        best = self.books.best()
        assert best is not None
        best_commit = self.books.best_commit()
        ours = self.ws.file_at(best_commit)
        merged = self.books.merge(self.ws.file_at(exp.parent_commit), self.ws.file_at(exp.commit), ours)
        won = f"beat #{against.id}, the best it started from ({reason})"
        if merged is None:
            self._decide(
                exp.id,
                Status.DISCARD,
                f"{won}, but its change conflicts with the new best #{best.id} (or is already in it)",
            )
            return
        self.ws.repo.git.update_ref(f"refs/autoresearch/merged/{exp.id}", exp.commit)
        message = f"{exp.description}\n\nexperiment #{exp.id}, merged onto #{best.id}"
        commit = self.ws.commit_candidate(merged, best_commit, message)
        self.ledger.update(
            exp.id,
            base_commit=exp.base_commit or exp.parent_commit,
            parent_commit=best_commit,
            commit=commit,
            diff=unified_diff(ours, merged),
            train_hash=file_hash(merged),
        )
        self._emit(
            Info(message=f"#{exp.id} {won}; merged onto the new best #{best.id}, confirming with a run")
        )
        self._queue_run(exp.id, self.config.base_seed)

    def _decide(self, exp_id: int, status: str, reason: str) -> None:
        self.books.decide(exp_id, status, reason)
        with self._lock:
            self._decided_runs += 1

    # ---- runs -----------------------------------------------------------------------------------------

    def _drop_waiting_runs(self) -> None:
        """The engine stops: runs that never got a slot do not start; their experiments are re-queued (the
        baseline's missing seeds simply run next time)."""
        while self._waiting:
            exp_id, _seed = self._waiting.popleft()
            exp = self.ledger.get(exp_id)
            if exp_id != 0 and exp is not None and exp.phase != "decided":
                reason = "the engine shut down before it could train"
                self.books.interrupt(exp_id, reason, requeue=self.books.should_requeue(exp))

    def _queue_run(self, exp_id: int, seed: int) -> None:
        self._waiting.append((exp_id, seed))
        self._start_waiting_runs()

    def _start_waiting_runs(self) -> None:
        for slot in self._free_slots():
            if not self._waiting:
                return
            exp_id, seed = self._waiting.popleft()
            self._start_run(exp_id, seed, slot)

    def _start_run(self, exp_id: int, seed: int, slot: int) -> None:
        exp = self.ledger.get(exp_id)
        assert exp is not None and exp.commit and self._trainer is not None
        n = len(self.ledger.runs(exp_id))
        first_on_commit = not self.books.current_runs(exp)
        spec = self._spec(exp, n, seed)
        self.ledger.start_run(exp_id, n, seed, str(spec.log_path), commit=exp.commit)
        flight = _Flight(exp_id=exp_id, n=n, seed=seed, slot=slot, started=time.monotonic())
        if exp_id != 0 and first_on_commit and exp.parent_commit and self._probing():
            parent = self._started_from(exp)
            flight.probe_against = (parent.id, self.ws.file_at(exp.parent_commit))
        with self._lock:
            self._flights[slot] = flight
            self._current = exp_id
        self._emit(
            RunStarted(
                exp_id=exp_id,
                description=exp.description,
                commit=exp.commit,
                seed=seed,
                budget=describe_budget(self.config.budget, self.device),
                slot=slot,
            )
        )
        self._show_state()
        thread = threading.Thread(
            target=self._train, args=(flight, spec), name=f"autoresearch-trainer-{slot}", daemon=True
        )
        thread.start()

    def _train(self, flight: _Flight, spec: RunSpec) -> None:
        """A slot's thread: one run, reported to the inbox."""
        assert self._trainer is not None

        def started(pid: int) -> None:
            flight.pgid = pid
            self.ledger.set_run_pid(flight.exp_id, flight.n, pid)
            crash_point("during_run", flight.exp_id)

        def emit(event: Event) -> None:
            if isinstance(event, LogLine | StepMetric | RunFinished):
                event = replace(event, slot=flight.slot)
                if flight.pgid is None and not isinstance(event, RunFinished):
                    crash_point("during_run", flight.exp_id)  # a remote run has no pid here: its first line
            self._emit(event)

        try:
            result = self._probe(flight, spec, emit, started) if flight.probe_against else None
            if result is None:
                result = self._trainer.run(flight.slot, spec, emit, flight.stop, started)
        except TrainerLost as lost:
            self._inbox.put(_RunDone(flight.slot, lost=lost))
        except Exception as exc:
            self._inbox.put(
                _RunDone(flight.slot, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            )
        else:
            self._inbox.put(_RunDone(flight.slot, result=result))

    def _probing(self) -> bool:
        if self.config.probe is not None:
            return self.config.probe and isinstance(self._trainer, LocalTrainers)
        return isinstance(self._trainer, LocalTrainers) and not self.device.startswith("cuda")

    def _probe(
        self, flight: _Flight, spec: RunSpec, emit: EventSink, started: Callable[[int], None]
    ) -> RunResult | None:
        """(a slot's thread) A few seeded steps of the candidate and, once per parent, of its parent: the
        run's result when that settles it (a crash, the same computation as the parent, stopped), else None:
        train it."""
        assert flight.probe_against is not None
        parent_id, parent_text = flight.probe_against
        containment, judge = self._containment(), self._judge_for_runs()

        def probing(source: bytes | None, name: str) -> RunSpec:
            folder = spec.scratch.with_name(f"{spec.scratch.name}-{name}")
            log = spec.log_path.with_name(f"{spec.log_path.stem}.{name}.log")
            return replace(spec, scratch=folder, log_path=log, train_source=source)

        candidate_spec = probing(spec.train_source, "probe")
        candidate = self._probes.get(  # cached: once kept, it is the next candidates' parent probe
            probe_key(candidate_spec),
            lambda: probe(
                candidate_spec, emit, stop=flight.stop, on_start=started, containment=containment, judge=judge
            ),
        )
        if candidate.outcome == "interrupted" or candidate.settles:
            crashed = candidate.outcome != "interrupted"
            return _probe_result(
                candidate,
                "crash" if crashed else "interrupted",
                f"in a probe of {candidate.steps} steps: {candidate.reason}" if crashed else candidate.reason,
            )
        if candidate.outcome != "ok":
            return None
        parent_spec = probing(parent_text.encode("utf-8"), "parent-probe")
        parent = self._probes.get(
            probe_key(parent_spec),
            lambda: probe(
                parent_spec, None, stop=flight.stop, on_start=started, containment=containment, judge=judge
            ),
        )
        same = same_computation(parent, candidate, parent_id)
        if same is None:
            return None
        return _probe_result(candidate, "noop", same)

    def _spec(self, exp: Experiment, n: int, seed: int) -> RunSpec:
        assert exp.commit
        run_dir = self.ws.run_dir(exp.id)
        suffix = "" if n == 0 else f"-{n}"
        memory, address = self._limits()
        return RunSpec(
            workspace=self.ws.path,
            scratch=self.ws.state_dir / "scratch" / f"{exp.id}-{n}",
            exp_id=exp.id,
            seed=seed,
            log_path=run_dir / f"run{suffix}.log",
            deadline_s=self._deadline(),
            budget=self.config.budget,
            budget_limit=self._budget_limit(),
            handover_s=self.config.handover_s or (60.0 if self.device.startswith("cuda") else 10.0),
            memory_mb=memory,
            address_space_mb=address,
            hidden=self._prepare_runs(),
            readable=(paths.cache_dir(),),
            harness_sha256=self._harness_sha256(),
            log_cap_bytes=self.config.log_cap_bytes,
            network=self.config.network,
            python=self.config.python or _python(),
            env={"AUTORESEARCH_CACHE": str(paths.cache_dir()), **self.ws.run_env},  # the profile's vocab
            device_memory_from_summary=self.device.startswith("cuda"),
            train_source=self.ws.file_at(exp.commit).encode("utf-8"),
        )

    def _run_done(self, message: _RunDone) -> None:
        with self._lock:
            flight = self._flights.pop(message.slot)
            self._busy_s += time.monotonic() - flight.started
        if message.result is None:
            self._run_lost(flight, message)
            return
        result = self._record_run(flight, message.result)
        crash_point("after_run", flight.exp_id)
        if result.outcome == "interrupted":
            self._run_interrupted(flight)
            return
        if flight.exp_id != 0:
            self._advance(flight.exp_id)

    def _record_run(self, flight: _Flight, result: RunResult) -> RunResult:
        result = self._check_after_run(result)
        summary = result.summary
        self.ledger.finish_run(
            flight.exp_id,
            flight.n,
            outcome=result.outcome,
            val_bpb=result.val_bpb,
            reason=result.reason,
            seconds=result.seconds,
            peak_memory_mb=result.peak_memory_mb,
            training_seconds=_number(summary.get("training_seconds")),
            total_seconds=_number(summary.get("total_seconds")) or result.seconds,
            log_tail=result.log_tail,
            summary=summary,
        )
        self._emit(
            RunFinished(
                exp_id=flight.exp_id,
                outcome=result.outcome,
                val_bpb=result.val_bpb,
                seconds=result.seconds,
                summary=summary,
                log_tail=result.log_tail,
                judge_seconds=result.judge_seconds,
                slot=flight.slot,
            )
        )
        return result

    def _run_lost(self, flight: _Flight, message: _RunDone) -> None:
        """The trainer lost the run (a node or worker went away) or the runner failed: interrupted, re-queued."""
        if message.lost is not None:
            reason = f"the trainer lost the run: {message.lost.reason}"
            retries = message.lost.system_retries
        else:
            reason = f"the runner failed: {message.error.splitlines()[0] if message.error else 'unknown'}"
            retries = 0
            self._emit(EngineError(message=reason, detail=message.error))
        self.ledger.finish_run(
            flight.exp_id, flight.n, outcome="interrupted", reason=reason, system_retries=retries
        )
        self._emit(
            RunFinished(
                exp_id=flight.exp_id, outcome="interrupted", val_bpb=None, seconds=0.0, log_tail=reason
            )
        )
        if flight.exp_id == 0:
            self._emit(Info(message=f"baseline seed {flight.seed}: {reason}; it runs again"))
            return
        exp = self.ledger.get(flight.exp_id)
        assert exp is not None
        self.books.interrupt(flight.exp_id, reason, requeue=self.books.should_requeue(exp))

    def _run_interrupted(self, flight: _Flight) -> None:
        why = flight.why or "interrupted"
        if flight.exp_id == 0:
            self.ledger.update(0, status=Status.INTERRUPTED, phase="finished", reason="interrupted")
            if why == "skip":
                self._emit(Info(message="the baseline cannot be skipped; it will run again"))
            return
        words = {
            "stop": "stopped by the user",
            "skip": "skipped by the user",
            "shutdown": "the engine shut down",
        }
        self.books.interrupt(flight.exp_id, words.get(why, why), requeue=why == "shutdown")

    def _check_after_run(self, result: RunResult) -> RunResult:
        """A run that changed the harness or train.py is invalid, whatever it printed; the files are restored."""
        changed = set(self.ws.changed_tracked_files()) | set(self.ws.harness_problems())
        if not changed:
            return result
        self.ws.move_branch(self.books.best_commit())
        if self.ws.harness_problems():
            self.ws.restore_harness()
        if result.outcome == "interrupted":
            return result
        reason = f"the run modified {', '.join(sorted(changed))} (restored): its result cannot be trusted"
        return replace(result, outcome="invalid", val_bpb=None, reason=reason)

    # ---- the baseline ---------------------------------------------------------------------------------

    def _baseline_decided(self) -> bool:
        exp = self.ledger.get(0)
        return exp is not None and exp.phase == "decided"

    def _advance_baseline(self) -> None:
        """Experiment 0: the unmodified train.py, run K times (in parallel where there are slots) to measure
        the noise floor. A failing baseline ends the loop."""
        exp = self.ledger.get(0)
        if exp is None:
            exp = self.ledger.create(
                0,
                Status.PENDING,
                "committed",
                parent_commit=None,
                commit=self.ws.head(),
                description="baseline",
                proposer="baseline",
                train_hash=file_hash(self.ws.file_at(self.ws.head())),
            )
        with self._lock:
            self._current = 0
            busy_seeds = {f.seed for f in self._flights.values() if f.exp_id == 0}
        busy_seeds |= {seed for exp_id, seed in self._waiting if exp_id == 0}
        wanted = [self.config.base_seed + i for i in range(self.seeds)]
        if not self._baseline_announced:
            self._baseline_announced = True
            self._emit(
                Info(message=f"baseline: {len(wanted)} run(s) with seeds {wanted} to measure the noise floor")
            )
        runs = self.ledger.runs(0)
        failed = next((r for r in runs if r.outcome not in (None, "ok", "interrupted")), None)
        if failed is not None:
            message = f"the baseline train.py fails ({failed.outcome}: {failed.reason}); fix it and run again"
            self.ledger.update(
                0, status=failed.outcome, phase="finished", reason=message, log_tail=failed.log_tail
            )
            self.error = message
            with self._lock:
                self._fatal = True
            self._emit(EngineError(message=message, detail=failed.log_tail, fatal=True))
            self._emit(
                Decided(
                    exp_id=0,
                    status=failed.outcome or Status.CRASH,
                    val_bpb=None,
                    best_bpb=None,
                    margin=0.0,
                    reason=message,
                )
            )
            return
        missing = [
            seed
            for seed in wanted
            if seed not in busy_seeds and not any(r.seed == seed and r.outcome == "ok" for r in runs)
        ]
        if missing:
            if not self._paused():
                for seed in missing:
                    self._queue_run(0, seed)
            return
        if busy_seeds:
            return
        ok = [r for r in runs if r.outcome == "ok" and r.seed in wanted]
        values = [r.val_bpb for r in ok if r.val_bpb is not None]
        noise = noise_floor(values, self.config.min_margin, self.config.default_margin)
        self.books.record_noise(noise)
        reason = f"baseline mean of {len(values)} seed(s); {noise.describe()}"
        with self.ledger.transaction() as conn:
            self.ledger.update(
                0,
                conn,
                status=Status.BASELINE,
                phase="decided",
                val_bpb=noise.mean,
                peak_memory_mb=max((r.peak_memory_mb or 0.0) for r in ok) or None,
                training_seconds=_mean([r.training_seconds for r in ok]),
                total_seconds=_mean([r.total_seconds for r in ok]),
                log_tail=ok[-1].log_tail,
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
            self.ledger.set_meta("best_exp_id", 0, conn)
            self.ledger.set_meta("best_commit", exp.commit, conn)
            self.ledger.set_meta("baseline_bpb", noise.mean, conn)
            self.ledger.set_meta(
                "baseline_training_seconds", max((r.training_seconds or 0.0) for r in ok), conn
            )
        self.ledger.write_results_tsv(self.ws.results_tsv)
        self._emit(
            Decided(
                exp_id=0,
                status=Status.BASELINE,
                val_bpb=noise.mean,
                best_bpb=noise.mean,
                margin=noise.margin,
                reason=reason,
            )
        )

    # ---- recovery -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile git, the ledger and results.tsv after a crash or kill -9 (called at the start of run)."""
        found = self.books.recover()
        self._resume_ids.extend(found.resume)
        if found.notes:
            self._emit(Info(message="recovered: " + "; ".join(found.notes)))

    # ---- limits, containment, the judge ---------------------------------------------------------------

    def _deadline(self) -> float:
        if self.config.deadline_s is not None:
            return self.config.deadline_s
        seconds, estimated = estimate_training_seconds(self.config.budget, self.device)
        if estimated:
            observed = self.ledger.get_meta("baseline_training_seconds") or 0.0
            seconds = max(seconds, observed) * self.config.compute_budget_factor
        eval_s = self.config.eval_s
        if eval_s is None:
            eval_s = 240.0 if self.device.startswith("cuda") else 60.0
        return seconds + eval_s + self.config.grace_s

    def _budget_limit(self) -> tuple[str, float] | None:
        """A wall or CPU budget, which the runner measures and enforces; None for FLOPs (the run counts them)."""
        mode, amount = resolve_budget(self.config.budget, self.device)
        return (mode, amount) if mode in ("time", "cpu") else None

    def _limits(self) -> tuple[int, int | None]:
        total_mb = psutil.virtual_memory().total // 2**20
        memory = self.config.memory_mb or int(total_mb * 0.8)
        if self.config.address_space_mb is not None:
            address = self.config.address_space_mb or None
        else:
            address = None if self.device.startswith("cuda") else int(total_mb * 2)
        return memory, address

    def _containment(self) -> Containment | None:
        """How runs are contained here (probed once); says so once when it is less than full."""
        if not self._containment_checked:
            self._containment_checked = True
            self._contained = probe_containment()
            if self._contained.level != "full":
                self._emit(
                    EngineError(
                        message=f"runs are contained only partly: {self._contained.summary}",
                        detail=self._contained.detail
                        or "Linux mount, PID and network namespaces (root or unprivileged user namespaces) "
                        "contain a run fully; see the README's threat model",
                    )
                )
        return self._contained

    def _check_harness_hands_over(self) -> None:
        """A workspace made before runs were judged outside the run has a prepare.py that cannot hand over."""
        try:
            harness = (self.ws.path / "prepare.py").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return  # recover() has put the committed harness back; git has it if this fails
        if "def judge(" not in harness:
            raise WorkspaceError(
                f"{self.ws.path} was made before runs were scored by a separate judge: its frozen prepare.py "
                "cannot hand a model over, so no run could be scored. Start a new workspace "
                "(autoresearch init NEW_FOLDER); this one stays readable with `autoresearch log`."
            )

    def _judge_for_runs(self) -> WarmJudge | None:
        """The workspace's warm judge (started on first use), or None to start a judge per run."""
        with self._lock:  # slots ask from their own threads
            return self._make_judge()

    def _make_judge(self) -> WarmJudge | None:
        if self._warm_judge is None and self.config.warm_judge:
            self._warm_judge = WarmJudge(
                self.ws.path,
                self.ws.state_dir / "scratch" / "judge",
                python=self.config.python or _python(),
                env={"AUTORESEARCH_CACHE": str(paths.cache_dir()), **self.ws.run_env},
                containment=self._containment(),
                readable=(paths.cache_dir(),),
                harness_sha256=self._harness_sha256(),
            )
        return self._warm_judge

    def _harness_sha256(self) -> str | None:
        """The frozen prepare.py's SHA-256 as recorded at init: the only harness a judge may import."""
        recorded = self.ws.meta.get("harness", {}).get(HARNESS[0])
        return recorded if isinstance(recorded, str) else None

    def _prepare_runs(self) -> tuple[Path, ...]:
        """Once per engine: the harness builds the data cache outside any run; the files runs must not read."""
        if self._hidden is None:
            self._hidden = prepare_for_runs(
                self.ws.path,
                self.ws.state_dir / "scratch",
                python=self.config.python or _python(),
                env={"AUTORESEARCH_CACHE": str(paths.cache_dir()), **self.ws.run_env},
                containment=self._containment(),
                emit=self._emit,
            )
        return self._hidden

    def _settle_budget(self) -> None:
        """Every run of a workspace uses the budget its baseline was measured with: results must compare."""
        baseline = self.ledger.get(0)
        fixed = baseline is not None and baseline.phase == "decided"
        stored = self.ledger.get_meta("budget", "unset")
        if not fixed or stored == "unset":
            self.ledger.set_meta("budget", self.config.budget)
            return
        if self.config.budget is None and stored is not None:
            self.config.budget = stored
            self._emit(Info(message=f"budget {describe_budget(stored)}, as the baseline was measured"))
        elif self.config.budget != stored:
            raise WorkspaceError(
                f"the baseline of {self.ws.path} was measured with budget {describe_budget(stored)}, not "
                f"{describe_budget(self.config.budget)}: results would not compare; run with the same budget "
                f"({'--budget ' + stored if stored else 'no --budget'}) or in a new workspace"
            )


def _probe_result(found: Probe, outcome: str, reason: str) -> RunResult:
    """A probe that settles an experiment, as its run's result."""
    summary = {"probe_steps": found.steps, "probe_seconds": round(found.seconds, 2)}
    log_path = found.log_path or Path("probe.log")
    return RunResult.without_judge(outcome, reason, found.seconds, log_path, found.log_tail, summary)


def _python() -> str:
    import sys

    return sys.executable


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


__all__ = ["CRASH_POINTS", "Engine", "EngineSnapshot", "crash_point", "queue_reapply"]
