"""The research engine: a scheduler that keeps trainer slots busy, driven by one inbox, seen through events.

One experiment: take a proposal -> make its train.py on the best (`agent.candidate`) -> record it -> (review) ->
commit (beside the branch) -> run in a free slot -> decide -> record. The next proposal is thought of while runs
train (`overlap`), and with several slots (local, one per GPU, or Ray tasks) several experiments are out at
once: each is judged against the best it started from, and a win that lands after another keep is merged onto
the new best and confirmed by a run before it is kept.

This module decides *when* things happen. Every ledger and git write is a named transition of `agent.books`;
where and how a run trains is the trainers' (`agent.trainers`, made by the factory the engine is given).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from agent import known_noise
from agent.books import Books
from agent.budget import Budget
from agent.candidate import candidate_text, merge3
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
    Skip,
    StopRun,
    UseModel,
    Veto,
)
from agent.config import EngineConfig, default_seeds, detect_device
from agent.decisions import Rules, RunAgain, baseline_runs, next_step, noise_floor
from agent.edits import EditError, file_hash
from agent.events import (
    EngineError,
    EngineSnapshot,
    EngineState,
    Event,
    EventSink,
    Info,
    ModelLoaded,
    ProposalReady,
    ReviewRequested,
    RunStarted,
    StateChanged,
)
from agent.ladder import Ladder
from agent.ledger import Experiment, Ledger, Phase, RunRecord, Status
from agent.promotion import Job, Rung
from agent.proposals import Proposal, ProposalContext, Proposer, SwitchableProposer, model_name
from agent.sandbox.spec import Outcome, PrepareError, ProbeParent, RunRequest
from agent.slots import Flight, RunDone, Slots, training_on, trial
from agent.static_noop import static_noop
from agent.thinking import Proposed, Thinking
from agent.trainers.base import TrainerFactory
from agent.workspace import Workspace, WorkspaceError

_STOPPED = {"stop": "stopped by the user", "skip": "skipped by the user", "shutdown": "the engine shut down"}
"""Why a run was stopped, in the ledger's words."""
PROMOTION_RUN = 1000
"""A promotion run's number in its request: past any experiment's own runs, and one per slot, so that the runs
training at once have folders of their own (a promotion is not a run of the experiment's: see agent.ladder)."""
_Message = Command | RunDone | Proposed
"""What the engine's inbox takes: the user's commands and what its slots and its proposer thread report."""


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
    """The best commit the proposer saw; where the best has moved since, the change is merged onto it."""


@dataclass
class _Review:
    """A proposal held for the user: both texts, until it is approved, edited, vetoed or dropped."""

    exp_id: int
    item: _Item
    parent: str
    base_text: str
    new_text: str
    diff: str
    cancelled: str = ""


class Engine:
    """The autoresearch scheduler over one workspace. `send(command)` is thread-safe and returns at once.

    One engine thread owns the ledger and git (through `Books`) and consumes one inbox: the user's commands and
    what its helper threads report — a proposer thread (one proposal at a time) and one thread per busy trainer
    slot. Runs wait in a queue for a free slot; proposals wait (bounded) for a slot to run in. Build it with
    `agent.session.open_engine`, which settles the budget and gives it its trainers.
    """

    def __init__(
        self,
        workspace: Workspace,
        proposer: Proposer,
        config: EngineConfig,
        sink: EventSink,
        make_trainers: TrainerFactory,
    ) -> None:
        if config.budget is None:
            raise ValueError("the budget must be settled before the engine is built (agent.session)")
        self.ws = workspace
        self.proposer = proposer
        self.config = config
        self.budget: Budget = config.budget
        self._sink = sink
        self.ledger = Ledger(workspace.ledger_path)
        """The experiments, for reading (the cockpit's timeline); only `books` writes it."""
        self.books = Books(workspace, self.ledger, self._emit, config.default_margin)
        rungs = None if config.promote is None else tuple(Rung(f) for f in config.promote)
        self.ladder = Ladder(workspace, self.ledger, self._emit, rungs)
        """Promotion: keeps trained again at larger budgets (`agent.promotion`), in slots experiments leave."""
        self.device = detect_device()
        self.seeds = config.seeds or default_seeds(self.device)
        self.overlap = config.overlap if config.overlap is not None else self.device.startswith("cuda")
        self.error: str | None = None
        """The fatal error that ended the loop, if any."""
        self._slots = Slots(
            make_trainers, config.trainers, config.ray, self._emit, self._inbox_put, self._run_pid
        )
        self._lock = threading.RLock()
        self._inbox: queue.Queue[_Message] = queue.Queue()
        self._state = EngineState.IDLE
        self._review_gate = config.review_gate
        self._pause_requested = False
        self._shutdown = False
        self._fatal = False
        self._current: int | None = None
        self._veto_reason: str | None = None
        self._program = workspace.read_program()
        self._session_count = 0
        self._thinking = Thinking(self._emit, self._inbox_put)
        self._dry = False
        self._done = threading.Event()
        self._resume_ids: list[int] = []
        self._waiting: deque[tuple[int, int]] = deque()
        """Runs (exp_id, seed) ready to train, waiting for a free slot."""
        self._ready: deque[_Item] = deque()
        self._review: _Review | None = None
        self._deferred: list[UseModel | SetProposer] = []
        """Model switches asked for while the proposer thinks: done once it has answered."""
        self._baseline_announced = False
        self._said: tuple[EngineState, str] = (EngineState.IDLE, "")
        """The state and detail last said (StateChanged), so that each is said once."""
        self._started = time.monotonic()
        self._retrain: SetTrainers | None = None
        """A change of trainers asked for: nothing new starts until the runs in flight end and it is made."""
        self._decided_runs = 0
        self._promotion_said = False

    # ---- the command API (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a daemon thread."""
        threading.Thread(target=self.run, name="autoresearch-engine", daemon=True).start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop to end (at most `timeout` seconds); see `finished`."""
        self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        """Whether the loop has ended."""
        return self._done.is_set()

    def send(self, command: Command) -> None:
        """Tell the engine something (agent.commands); it takes effect at the next safe point."""
        with self._lock:
            match command:
                case Pause():
                    self._pause_requested = True
                case Resume():
                    self._pause_requested = False
                case StopRun():
                    self._pause_requested = True
                    self._cancel_everything("stop")
                case Skip():
                    self._skip()
                case Shutdown():
                    self._shutdown = True
                    self._cancel_everything("shutdown")
                case SetGate(on=on):
                    self._review_gate = bool(on)
        self._inbox.put(command)

    def abort(self) -> None:
        """Kill the runs in flight at once (a second Ctrl-C); nothing is recorded: recover() sees to that."""
        self._slots.kill_all()

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            state, current, gate = self._state, self._current, self._review_gate
        slots = self._slots
        wall = max(time.monotonic() - self._started, 1e-9)
        best = self.books.best()
        noise = self.ledger.get_meta("noise")
        return EngineSnapshot(
            state=state,
            workspace=self.ws.path,
            branch=self.ws.branch,
            model=model_name(self.proposer),
            device=self.device,
            budget=self.budget.describe(),
            n_experiments=self.ledger.count(),
            baseline_bpb=self.ledger.get_meta("baseline_bpb"),
            best_bpb=best.val_bpb if best else None,
            best_exp_id=best.id if best else None,
            margin=noise["margin"] if noise else None,
            review_gate=gate,
            current_exp_id=current,
            proposer=self.proposer.name,
            queued=len(self.ledger.queued()),
            containment=slots.containment,
            trainers=slots.count,
            ray=slots.ray,
            in_flight=tuple(f.exp_id for f in slots.in_flight()),
            busy_share=slots.busy_share(),
            experiments_per_hour=self._decided_runs * 3600.0 / wall if self._decided_runs else None,
        )

    def close(self) -> None:
        self.ledger.close()

    # ---- plumbing -------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a broken display must not stop the research
            self._sink(event)

    def _set_state(self, state: EngineState, detail: str = "") -> None:
        """Say the engine's state (and what it is about), once per change."""
        with self._lock:
            said, self._said = self._said, (state, detail)
            self._state = state
        if (state, detail) != said:
            self._emit(StateChanged(state=state, detail=detail))

    def _inbox_put(self, message: RunDone | Proposed) -> None:
        self._inbox.put(message)

    def _run_pid(self, flight: Flight, pid: int) -> None:
        """(a slot's thread) The run's process exists here: recorded, so that a restart can kill it."""
        if flight.promotion is not None:
            self.ladder.started(flight.promotion, pid)
            return
        self.books.run_started(flight.exp_id, flight.n, pid)

    def _skip(self) -> None:
        """(lock held) The proposal under review, else the newest run, else the proposal being thought of."""
        if self._review is not None:
            self._review.cancelled = self._review.cancelled or "skip"
        elif (newest := self._slots.newest()) is not None:
            self._slots.stop(newest, "skip")
        else:
            self._thinking.cancel()

    def _cancel_everything(self, why: str) -> None:
        """(lock held) Stop every run, the proposal being thought of and the one under review."""
        self._slots.stop_all(why)
        self._thinking.cancel()
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
        return [] if self._retrain is not None else self._slots.free()

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the loop in the calling thread until the proposer runs dry, max_experiments, or shutdown."""
        try:
            with self.ws.engine_lock():
                trainer = self._slots.open()
                self.recover()
                self.ladder.open()
                self.ws.check_harness()
                self.books.record_budget(self.budget)
                self._emit(Info(message=f"training on {trainer.description}"))
                self._started = time.monotonic()
                self._slots.restart_clock()
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
            self._slots.close()
            self._set_state(EngineState.STOPPED)
            self._done.set()

    def recover(self) -> None:
        """Reconcile git, the ledger and results.tsv after a crash or kill -9 (called at the start of run);
        runs a killed engine left training here are killed."""
        found = self.books.recover()
        self._resume_ids.extend(found.resume)
        trainer = self._slots.trainer
        assert trainer is not None
        for exp_id, pid in found.stale:
            if trainer.reap(pid):
                found.notes.append(f"killed the orphaned run of #{exp_id} (pid {pid})")
        for what, pid in self.ladder.recover():
            if trainer.reap(pid):
                found.notes.append(f"killed the orphaned {what} (pid {pid})")
        if found.notes:
            self._emit(Info(message="recovered: " + "; ".join(found.notes)))

    def _session_summary(self) -> str:
        snap = self.snapshot()
        minutes = (time.monotonic() - self._started) / 60
        words = f"this session: {self._decided_runs} experiment(s) decided in {minutes:.1f} min"
        if snap.busy_share is not None:
            words += f"; {snap.trainers} trainer(s) busy {snap.busy_share:.0%} of the time"
        if snap.experiments_per_hour is not None:
            words += f", {snap.experiments_per_hour:.1f} experiments/hour"
        trained, promoted = self._slots.trained_seconds()
        if promoted:
            share = promoted / max(trained, 1e-9)
            words += f"; promotion took {promoted / 60:.1f} trainer-minutes ({share:.0%} of training)"
        return words

    def _abandon(self) -> None:
        """The loop ended abnormally with work in flight: stop it; recover() records it next time."""
        with self._lock:
            self._cancel_everything("shutdown")
        deadline = time.monotonic() + 30
        while self._slots.in_flight() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                message = self._inbox.get(timeout=0.2)
                if isinstance(message, RunDone):
                    flight = self._slots.done(message.slot)
                    if flight is not None and message.result is not None:
                        with contextlib.suppress(Exception):
                            if flight.promotion is not None:
                                self.ladder.finish(
                                    flight.promotion, message.result, flight.slot, flight.exp_id
                                )
                            else:
                                self.books.finish_run(flight.exp_id, flight.n, message.result, flight.slot)
        self._thinking.join(timeout=5)

    def _loop(self) -> None:
        while True:
            self._schedule()
            if self._ended():
                return
            with contextlib.suppress(queue.Empty):
                now = time.monotonic()
                retry_at = self._thinking.retry_at
                wait = 0.5 if retry_at <= now else min(0.5, retry_at - now)
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
        if self._retrain is not None and not self._slots.in_flight():
            retrain, self._retrain = self._retrain, None
            self._slots.change(retrain.trainers, retrain.ray)
        self._start_waiting_runs()
        if not self.books.baseline_decided():
            self._advance_baseline()
            self._show_state()
            return
        while self._resume_ids:
            self._advance(self._resume_ids.pop(0))
        if self._promotion_owed():
            self._start_promotions(1)
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
            self._thinking.start(self.proposer, self._context(), self.books.best_commit())
        self._start_promotions(self._spare_slots())
        self._show_state()

    def _ended(self) -> bool:
        with self._lock:
            busy = bool(self._waiting or self._thinking.busy or self._review)
        busy = busy or bool(self._slots.in_flight())
        if busy:
            return False
        if self._stopping():
            return True
        if self._paused() or not self.books.baseline_decided():
            return False
        if self._session_over() and self._promoting():
            return False  # the keeps' promotion is finished before the session ends
        if self._limit_reached():
            self._emit(Info(message=f"reached --max-experiments {self.config.max_experiments}"))
            return True
        if self._dry and not self._ready and not self.ledger.queued():
            name = self.proposer.name
            self._emit(Info(message=f"nothing more to try: the {name} proposer has no more proposals"))
            return True
        return False

    def _session_over(self) -> bool:
        """No experiment will start any more: the limit is reached, or the proposer ran dry."""
        return self._limit_reached() or (self._dry and not self._ready and not self.ledger.queued())

    def _limit_reached(self) -> bool:
        limit = self.config.max_experiments
        return limit is not None and self._session_count >= limit

    def _show_state(self) -> None:
        flights = sorted(self._slots.in_flight(), key=lambda f: f.started)
        with self._lock:
            review, thinking = self._review, self._thinking.busy
        if review is not None:
            self._set_state(EngineState.WAITING_REVIEW)
        elif flights:
            newest = flights[-1]
            if newest.promotion is not None:
                job = newest.promotion
                self._set_state(
                    EngineState.RUNNING, f"{job.subject.describe()} at {job.rung.name} seed {job.seed}"
                )
                return
            state = EngineState.BASELINE if newest.exp_id == 0 else EngineState.RUNNING
            self._set_state(state, f"#{newest.exp_id} seed {newest.seed}")
        elif thinking:
            self._set_state(EngineState.PROPOSING)
        elif self._paused():
            self._set_state(EngineState.PAUSED)
        else:
            self._set_state(EngineState.IDLE)

    def _handle(self, message: _Message) -> None:
        match message:
            case RunDone():
                self._run_done(message)
                return
            case Proposed():
                self._proposed(message)
                return
        self._thinking.retry_at = 0.0  # any command ends a wait for a failing proposer
        match message:
            case SetGate(on=on):
                self._emit(Info(message=f"review gate {'on' if on else 'off'}"))
            case Approve() | Veto() if self._review is None:
                name = "approve" if isinstance(message, Approve) else "veto"
                self._emit(Info(message=f"nothing is waiting for review ({name} ignored)"))
            case Approve() | Veto():
                self._resolve_review(message)
            case Override(status=status, exp_id=exp_id, by=by):
                self.books.override(status, exp_id, by)
            case Reapply(exp_id=exp_id):
                try:
                    self._emit(Info(message=self.books.reapply(exp_id)))
                except ValueError as exc:
                    self._emit(EngineError(message=str(exc)))
            case ReloadProgram():
                self._program = self.ws.read_program()
                self._emit(Info(message="program.md reloaded"))
            case SetTrainers(trainers=trainers, ray=ray):
                self._retrain = message
                if self._slots.in_flight():
                    self._emit(Info(message=f"{training_on(trainers, ray)} once the runs in flight end"))
            case UseModel() | SetProposer() if self._thinking.busy:
                self._deferred.append(message)
            case UseModel() | SetProposer():
                self._switch(message)

    def _switch(self, message: UseModel | SetProposer) -> None:
        if isinstance(message, SetProposer):
            self.proposer = message.proposer
            self._emit(ModelLoaded(name=model_name(message.proposer) or message.proposer.name, seconds=0.0))
            return
        if not isinstance(self.proposer, SwitchableProposer):
            self._emit(EngineError(message=f"the {self.proposer.name} proposer has no model to switch"))
            return
        try:
            self.proposer.use_model(message.name, self._emit)
        except Exception as exc:
            self._emit(EngineError(message=f"cannot switch to model {message.name}: {exc}"))

    # ---- proposals ------------------------------------------------------------------------------------

    def _context(self) -> ProposalContext:
        with self._lock:
            veto, self._veto_reason = self._veto_reason, None
        context = self.books.proposal_context(self._program, self.budget.describe(), veto)
        trainer, best = self._slots.trainer, self.books.best()
        if trainer is None or not trainer.can_probe or best is None:
            return context
        # A candidate's trial is the probe its first run would start with: same seed, budget and deadlines.
        first_run = self._run_request(
            self.ledger.count(),
            0,
            self.config.base_seed,
            context.train_py,
            self.ws.runs_dir / "trials" / "trial.log",
            best,
            ProbeParent(best.id, context.train_py),
        )
        return replace(context, trial=functools.partial(trial, trainer, first_run))

    def _run_request(
        self,
        exp_id: int,
        n: int,
        seed: int,
        text: str,
        log_path: Path,
        parent: Experiment | None,
        probe_against: ProbeParent | None,
    ) -> RunRequest:
        """What a trainer is asked: `text` trained with `seed` at the session's budget, its deadlines from the
        baseline's measured training and hand-over and from the parent's judging."""
        return RunRequest(
            exp_id=exp_id,
            n=n,
            seed=seed,
            train_source=text,
            budget=self.budget,
            log_path=log_path,
            probe_against=probe_against,
            observed_training_s=self.ledger.get_meta("baseline_training_seconds"),
            observed_handover_s=self.ledger.get_meta("baseline_handover_seconds"),
            parent_judge_s=self.books.judge_seconds(parent) if parent is not None else None,
        )

    def _want_proposal(self) -> bool:
        with self._lock:
            if self._thinking.busy or self._review is not None:
                return False
        if self._paused() or self._dry or time.monotonic() < self._thinking.retry_at:
            return False
        limit = self.config.max_experiments
        if limit is not None and self._session_count + len(self._ready) >= limit:
            return False
        if self.ledger.queued():
            return False
        room = len(self._free_slots()) - len(self._waiting)
        return room > len(self._ready) or (self.overlap and not self._ready)

    def _proposed(self, message: Proposed) -> None:
        self._thinking.answered(message)
        deferred, self._deferred = self._deferred, []
        for switch in deferred:
            self._switch(switch)
        if message.cancelled:
            return  # dropped by the user (skip, stop) or the engine is stopping: not the model's failure
        if message.failed is not None:
            failed = message.failed
            who = failed.proposer or self.proposer.name
            nothing = Proposal("(no valid proposal)", (), proposer=who, model=failed.model)
            self._reject_new(replace(nothing, replies=failed.replies), failed.reason)
            return
        if message.error is not None:
            self._proposer_failed(message.error, message.detail)
            return
        proposal = message.proposal
        if proposal is None:
            self._dry = True
        elif proposal.key and self._key_tried(proposal.key):
            self._emit(Info(message=f"already tried, skipped: {proposal.description}"))
        else:
            self._ready.append(_Item(proposal, base_commit=message.base_commit))

    def _proposer_failed(self, exc: Exception, detail: str) -> None:
        """The proposer raised (its server is down, slow or failing): asked again later, longer each time
        (`Thinking.wait_longer`), the engine paused with the reason once it has failed for long. Nothing is
        recorded; any command ends the wait."""
        if self._thinking.wait_longer(exc) is None:
            with self._lock:
                self._pause_requested = True
            failing_for, reason = self._thinking.failing_for, str(exc) or type(exc).__name__
            self._emit(
                EngineError(
                    message=f"paused: the proposer has failed for {failing_for / 60:.0f} min ({reason}); "
                    "resume once it answers again (p in the cockpit; Ctrl-C stops a headless run)",
                    detail=detail,
                )
            )

    def _key_tried(self, key: str) -> bool:
        return any(item.proposal.key == key for item in self._ready) or self.ledger.idea_tried(key)

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
        """train.py after the item's edits on the best (EditError if it cannot be made). A change made on an
        older best (a keep landed while it was made or queued), or re-applied, is merged onto the best."""
        made_on, made = self.books.made_on(item.source_exp_id, item.base_commit, parent)
        return candidate_text(item.proposal, base_text, made_on, made)

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
        except Exception as exc:  # whatever one proposal holds, it is that proposal's problem, not the loop's
            if item.qid is not None:
                self.books.dequeue(item.qid)
            cannot = f"the proposal cannot be applied: {type(exc).__name__}: {exc}"[:300]
            self._reject_new(proposal, str(exc) if isinstance(exc, EditError) else cannot)
            return
        twin = self.ledger.twin(digest)
        if twin is not None and not item.force:
            self._reject_new(proposal, f"duplicate: this train.py was already tried as #{twin.id}")
            return
        noop = static_noop(base_text, new_text)
        diff = self.books.record_proposed(
            exp_id,
            proposal,
            new_text,
            parent,
            base_commit=item.base_commit,
            proposer=self.proposer.name,
            qid=item.qid,
            source_exp_id=item.source_exp_id,
        )
        self._session_count += 1
        self._say_ready(exp_id, proposal, diff)
        with self._lock:
            gate = self._review_gate
        if noop is not None:  # the same program: nothing to train, nothing to review
            self._decide(exp_id, Status.NOOP, noop)
            return
        if gate:
            with self._lock:
                self._review = _Review(exp_id, item, parent, base_text, new_text, diff)
            self._set_state(EngineState.WAITING_REVIEW)
            self._ask_review(self._review)
            return
        self._commit_and_run(exp_id, proposal, new_text, parent)

    def _say_ready(self, exp_id: int, proposal: Proposal, diff: str) -> None:
        who = proposal.proposer or self.proposer.name
        what, why = proposal.description, proposal.reasoning
        self._emit(ProposalReady(exp_id=exp_id, description=what, diff=diff, reasoning=why, proposer=who))

    def _ask_review(self, review: _Review) -> None:
        self._emit(
            ReviewRequested(
                exp_id=review.exp_id,
                description=review.item.proposal.description,
                diff=review.diff,
                base_text=review.base_text,
                candidate_text=review.new_text,
            )
        )

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
                why = "the engine stopped while the proposal waited for review"
                self.books.interrupt(review.exp_id, why, requeue=True)
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
                text = candidate_text(edited, review.base_text)
            except EditError as exc:
                self._emit(EngineError(message=f"the edited proposal does not apply: {exc}"))
                self._ask_review(review)
                return
            proposal = edited
            self._say_ready(
                exp_id, edited, self.books.record_review_edit(exp_id, edited, text, review.base_text)
            )
        with self._lock:
            self._review = None
        parent = self.books.best_commit()
        if parent != review.parent:  # a keep landed while it waited: apply it to the new best
            merged = merge3(review.base_text, text, self.ws.file_at(parent))
            if merged is None:
                why = "the best changed while it waited for review and the change no longer applies to it"
                self.books.record_rejected(proposal, why, self.proposer.name, exp_id)
                return
            text = merged
            self.books.record_rebased(exp_id, text, parent, review.parent)
        self._commit_and_run(exp_id, proposal, text, parent)

    def _commit_and_run(self, exp_id: int, proposal: Proposal, text: str, parent: str) -> None:
        if self.books.commit_candidate(exp_id, proposal, text, parent, self.proposer.name):
            self._advance(exp_id)

    def _advance(self, exp_id: int) -> None:
        """The next step of a committed experiment, from its runs so far: a run to start, or the decision."""
        exp = self.ledger.get(exp_id)
        assert exp is not None and exp.commit
        measured = self.books.current_runs(exp)
        against = self.books.started_from(exp)
        assert against.val_bpb is not None
        reference = self.books.current_runs(against)
        found, counted = next_step(measured, reference, against.val_bpb, self.books.margin(), self._rules())
        if isinstance(found, RunAgain):
            if found.say:
                self._emit(Info(message=f"#{exp_id}: {found.say}"))
            self._queue_run(exp_id, found.seed)
            return
        if found.status == Status.KEEP and exp.parent_commit != self.books.best_commit():
            self._merge_onto_best(exp, against, found.reason)
            return
        reason = found.reason
        if len(self.ledger.runs(exp_id)) > len(measured):  # it trained on the commit it was merged from
            started = self.books.experiment_at(exp.base_commit)
            reason = (
                f"beat #{started.id if started else '?'}, the best it started from, and was merged onto the new "
                f"best #{against.id}; its run there: {reason}"
            )
        self._decide(exp_id, found.status, reason, counted)

    def _rules(self) -> Rules:
        alone = self._slots.count == 1 and not self._slots.ray and not self.overlap
        cores = (os.cpu_count() or 1) if alone else None
        return Rules(self.config.base_seed, self.config.confirm_marginal, cores)

    def _merge_onto_best(self, exp: Experiment, against: Experiment, reason: str) -> None:
        """`exp` beat the best it started from, but another keep landed while it ran: its change is merged onto
        the new best and confirmed with a run before it is kept (a conflict: discarded)."""
        best = self.books.best()
        assert best is not None
        won = f"beat #{against.id}, the best it started from ({reason})"
        if self.books.merge_onto_best(exp) is None:
            why = f"{won}, but its change conflicts with the new best #{best.id} (or is already in it)"
            self._decide(exp.id, Status.DISCARD, why)
            return
        self._emit(
            Info(message=f"#{exp.id} {won}; merged onto the new best #{best.id}, confirming with a run")
        )
        self._queue_run(exp.id, self.config.base_seed)

    def _decide(self, exp_id: int, status: str, reason: str, runs: list[RunRecord] | None = None) -> None:
        self.books.decide(exp_id, status, reason, runs)
        with self._lock:
            self._decided_runs += 1

    # ---- runs -----------------------------------------------------------------------------------------

    def _drop_waiting_runs(self) -> None:
        """The engine stops: runs that never got a slot do not start; their experiments are re-queued (the
        baseline's missing seeds simply run next time)."""
        while self._waiting:
            exp_id, _seed = self._waiting.popleft()
            exp = self.ledger.get(exp_id)
            if exp_id != 0 and exp is not None and exp.phase != Phase.DECIDED:
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
        trainer = self._slots.trainer
        assert exp is not None and exp.commit and trainer is not None
        n = len(self.ledger.runs(exp_id))
        log_path = self.ws.run_dir(exp_id) / ("run.log" if n == 0 else f"run-{n}.log")
        parent = self.books.started_from(exp) if exp_id != 0 and exp.parent_commit else None
        probe_against = None
        if parent and exp.parent_commit and trainer.can_probe and self.books.may_probe(exp, parent):
            probe_against = ProbeParent(parent.id, self.ws.file_at(exp.parent_commit))
        text = self.ws.file_at(exp.commit)
        request = self._run_request(exp_id, n, seed, text, log_path, parent, probe_against)
        self.books.start_run(exp_id, n, seed, str(log_path), exp.commit)
        flight = Flight(exp_id=exp_id, n=n, seed=seed, slot=slot)
        self._slots.occupy(flight)
        with self._lock:
            self._current = exp_id
        description, budget = exp.description, self.budget.describe()
        self._emit(
            RunStarted(
                exp_id=exp_id, description=description, commit=exp.commit, seed=seed, budget=budget, slot=slot
            )
        )
        self._show_state()
        self._slots.start(flight, request)

    def _run_done(self, message: RunDone) -> None:
        flight = self._slots.done(message.slot)
        assert flight is not None
        if flight.promotion is not None:
            self._promotion_done(flight, message)
            return
        if message.result is None:
            self._run_lost(flight, message)
            if message.unpreparable:
                raise PrepareError(message.unpreparable)
            return
        result = self.books.finish_run(flight.exp_id, flight.n, message.result, flight.slot)
        if result.outcome == Outcome.INTERRUPTED:
            self._run_interrupted(flight)
        elif flight.exp_id != 0:
            self._advance(flight.exp_id)

    def _run_lost(self, flight: Flight, message: RunDone) -> None:
        """The trainer lost the run (a node or worker went away) or the runner failed: interrupted, re-queued."""
        reason = _why_lost(message)
        if message.lost is None and not message.unpreparable:
            self._emit(EngineError(message=reason, detail=message.error))
        retries = message.lost.system_retries if message.lost is not None else 0
        self.books.lose_run(flight.exp_id, flight.n, reason, retries)
        if flight.exp_id == 0:
            self._emit(Info(message=f"baseline seed {flight.seed}: {reason}; it runs again"))
            return
        exp = self.ledger.get(flight.exp_id)
        assert exp is not None
        self.books.interrupt(flight.exp_id, reason, requeue=self.books.should_requeue(exp))

    def _run_interrupted(self, flight: Flight) -> None:
        why = flight.why or "interrupted"
        if flight.exp_id == 0:
            self.books.baseline_run_interrupted()
            if why == "skip":
                self._emit(Info(message="the baseline cannot be skipped; it will run again"))
            return
        self.books.interrupt(flight.exp_id, _STOPPED.get(why, why), requeue=why == "shutdown")

    # ---- promotion ------------------------------------------------------------------------------------

    def _spare_slots(self) -> int:
        """Free slots no experiment wants: none while a proposal waits or is thought of, unless the session has
        no more experiments to run."""
        spare = len(self._free_slots()) - len(self._waiting)
        if self._session_over():
            return spare
        with self._lock:
            wanted = len(self._ready) + int(self._thinking.busy or self._review is not None)
        return 0 if self.ledger.queued() else spare - wanted

    def _promotion_owed(self) -> bool:
        """Whether promotion is owed a slot before experiments, to keep its share of the trainers' time."""
        share = self.config.promote_share
        trained, promoted = self._slots.trained_seconds()
        return share > 0 and promoted < share * max(trained, 1e-9)

    def _start_promotions(self, slots: int) -> None:
        """Promotion runs in up to `slots` free slots (none while paused, stopping or before the baseline)."""
        if slots <= 0 or not self.ladder.rungs or self._paused() or self._stopping():
            return
        if not self.books.baseline_decided():
            return
        flights = self._slots.in_flight()
        busy = {f.promotion.key for f in flights if f.promotion is not None}
        # The leave-one-out pass is of the final best: asked for once no experiment can still change it.
        final = self._session_over() and not self._waiting and all(f.promotion for f in flights)
        free = self._free_slots()[len(self._waiting) :]
        for slot in free[:slots]:
            job = self.ladder.next_job(busy, finishing=final)
            if job is None:
                return
            busy.add(job.key)
            self._start_promotion(job, slot)

    def _start_promotion(self, job: Job, slot: int) -> None:
        """`job` in `slot`: contained and judged like any run, at the rung's budget, without a probe."""
        exp_id = self.ladder.shown_as(job)
        template = self._run_request(exp_id, PROMOTION_RUN + slot, job.seed, "", Path(), None, None)
        request = self.ladder.request(job, template)
        self.ladder.start(job, request, slot, exp_id)
        flight = Flight(exp_id=exp_id, n=request.n, seed=job.seed, slot=slot, promotion=job)
        self._slots.occupy(flight)
        self._show_state()
        self._slots.start(flight, request)

    def _promotion_done(self, flight: Flight, message: RunDone) -> None:
        job = flight.promotion
        assert job is not None
        if message.result is None:
            reason = _why_lost(message)
            if message.unpreparable:
                raise PrepareError(message.unpreparable)
            if message.lost is None:  # the runner failed: said as an error, and not tried again
                self._emit(EngineError(message=reason, detail=message.error))
            again = self.ladder.lose(job, reason, retry=message.lost is not None)
            what = f"promotion {job.rung.name} of {job.subject.describe()}"
            self._emit(
                Info(message=f"{what}: {reason}; {'it runs again' if again else 'recorded as failed'}")
            )
            return
        self.ladder.finish(job, self.books.check_after_run(message.result), flight.slot, flight.exp_id)

    def _promoting(self) -> bool:
        """(the session has no more experiments) Whether promotion has runs left; once it has none, its
        transfer table is said (once)."""
        if self.ladder.pending(finishing=True):
            return True
        if not self._promotion_said and self.ladder.plan() is not None:
            self._promotion_said = True
            self._emit(Info(message=self.ladder.summary()))
        return False

    # ---- the baseline ---------------------------------------------------------------------------------

    def _advance_baseline(self) -> None:
        """Experiment 0: the unmodified train.py, run K times (in parallel where there are slots) to measure
        the noise floor. A failing baseline ends the loop."""
        self.books.baseline()
        with self._lock:
            self._current = 0
        busy_seeds = {f.seed for f in self._slots.in_flight() if f.exp_id == 0}
        busy_seeds |= {seed for exp_id, seed in self._waiting if exp_id == 0}
        wanted = [self.config.base_seed + i for i in range(self.seeds)]
        if not self._baseline_announced:
            self._baseline_announced = True
            self._emit(
                Info(message=f"baseline: {len(wanted)} run(s) with seeds {wanted} to measure the noise floor")
            )
        runs = self.ledger.runs(0)
        failed = next((r for r in runs if r.outcome not in (None, Outcome.OK, Outcome.INTERRUPTED)), None)
        if failed is not None:
            message = f"the baseline train.py fails ({failed.outcome}: {failed.reason}); fix it and run again"
            self.error = message
            with self._lock:
                self._fatal = True
            self._emit(EngineError(message=message, detail=failed.log_tail, fatal=True))
            self.books.baseline_failed(failed, message)
            return
        counted, again = baseline_runs(runs, wanted, self._rules())
        done = {r.seed for r in counted}
        missing = [seed for seed in wanted if seed not in busy_seeds and seed not in done]
        if missing:
            if not self._paused():
                for seed in missing:
                    if seed in again:
                        self._emit(Info(message=f"baseline seed {seed}: {again[seed]}; it runs again"))
                    self._queue_run(0, seed)
            return
        if busy_seeds:
            return
        self._record_baseline(counted)

    def _record_baseline(self, runs: list[RunRecord]) -> None:
        """The baseline's noise floor from its runs, floored by what this machine is known to do with the same
        train.py at the same budget (earlier sessions), and then remembered for the next ones."""
        values = [r.val_bpb for r in runs if r.val_bpb is not None]
        record = self.config.noise_record
        baseline = self.books.baseline()
        assert baseline.commit
        code = file_hash(self.ws.file_at(baseline.commit))
        budget = self.budget.text
        known = known_noise.known_std(record, self.device, budget, code) if record else None
        noise = noise_floor(values, self.config.min_margin, self.config.default_margin, known)
        self.books.record_baseline(runs, noise)
        if record and noise.measured:
            known_noise.remember(record, self.device, budget, code, noise.std, len(values), self.ws.path)


def _why_lost(message: RunDone) -> str:
    """Why a run came back without a result, in the ledger's words."""
    if message.lost is not None:
        return f"the trainer lost the run: {message.lost.reason}"
    if message.unpreparable:
        return f"the data could not be prepared: {message.unpreparable}"
    return f"the runner failed: {message.error.splitlines()[0] if message.error else 'unknown'}"


__all__ = ["Engine", "EngineSnapshot"]
