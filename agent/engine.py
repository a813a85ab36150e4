"""The research engine: the autoresearch loop in its own thread, driven by a command inbox, seen through events.

One experiment: take a proposal -> apply it to train.py -> validate (parses; only train.py changes; the
harness's SHA-256 is unchanged) -> commit -> run -> parse -> decide -> record. Every step is written to the
ledger before it is acted on, so `recover()` can put a killed engine's workspace back in a consistent state:
the branch at the best kept commit, every discarded commit under refs/autoresearch/discarded/<id>, interrupted
experiments recorded as such (and re-queued), results.tsv regenerated from the ledger.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from agent import paths
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
from agent.decisions import NoiseFloor, judge, judge_confirmed, noise_floor
from agent.edits import EditError, apply_edits, file_hash, unified_diff
from agent.events import (
    Decided,
    EngineError,
    Event,
    EventSink,
    Info,
    ModelLoaded,
    ProposalReady,
    ProposalRejected,
    ProposalStarted,
    ProposerWaiting,
    ReviewRequested,
    RunFinished,
    RunStarted,
    StateChanged,
)
from agent.events import (
    NoiseFloor as NoiseFloorEvent,
)
from agent.ledger import FAILED, RAN, Experiment, Ledger, proposal_from_json, proposal_to_json
from agent.proposals import HistoryRow, Proposal, ProposalContext, ProposalFailed, Proposer
from agent.runner import (
    PrepareError,
    RunResult,
    RunSpec,
    WarmJudge,
    kill_stale_run,
    prepare_for_runs,
    run_training,
)
from agent.workspace import HARNESS, TRAIN, Workspace, WorkspaceError

CRASH_ENV = "AUTORESEARCH_CRASH_AT"
"""Fault injection for tests: `point` or `point:exp_id` makes the engine SIGKILL itself at that point."""
CRASH_POINTS = ("after_propose", "after_commit", "during_run", "after_run", "during_decide", "after_decide")
PROPOSER_RETRY_S = (2.0, 60.0)
"""A proposer that fails (a local server down, slow or failing) is asked again after 2 s, then after twice
as long each time, at most 60 s ..."""
PROPOSER_PAUSE_AFTER_S = 300.0
"""... and once it has failed for this long the engine pauses and says why."""


def crash_point(name: str, exp_id: int | None = None) -> None:
    """Die by SIGKILL here if AUTORESEARCH_CRASH_AT names this point (and experiment)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, target = spec.partition(":")
    if point == name and (not target or (exp_id is not None and target == str(exp_id))):
        os.kill(os.getpid(), signal.SIGKILL)


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
    in_flight: tuple[int, ...] = ()
    """The experiments training now, one per busy slot (slot order)."""
    busy_share: float | None = None
    """Seconds the trainers spent training / (trainers x wall seconds) since the engine started."""
    experiments_per_hour: float | None = None
    """Experiments decided per hour of this session (rejected proposals not counted)."""


@dataclass
class _Item:
    """A proposal to try, and where it came from."""

    proposal: Proposal
    qid: int | None = None
    """Its row in the re-run queue."""
    source_exp_id: int | None = None
    force: bool = False
    """Run it even if the same train.py was tried before (a reapply, an interrupted run)."""


class _Cancelled(Exception):
    """The current step was cancelled (stop, skip or shutdown)."""


class Engine:
    """The autoresearch loop over one workspace. Commands are thread-safe and return at once."""

    def __init__(
        self, workspace: Workspace, proposer: Proposer, config: EngineConfig, sink: EventSink
    ) -> None:
        self.ws = workspace
        self.proposer = proposer
        self.config = config
        self._sink = sink
        self.ledger = Ledger(workspace.ledger_path)
        self.device = detect_device()
        self.seeds = config.seeds or default_seeds(self.device)
        self.error: str | None = None
        """The fatal error that ended the loop, if any."""
        self._lock = threading.RLock()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._state = "idle"
        self._review_gate = config.review_gate
        self._pause_requested = False
        self._shutdown = False
        self._step: tuple[str, threading.Event] | None = None
        self._cancel_reason = ""
        self._current: int | None = None
        self._veto_reason: str | None = None
        self._program = workspace.read_program()
        self._session_count = 0
        self._proposer_errors = 0
        self._proposer_failing_since = 0.0
        self._thread: threading.Thread | None = None
        self._run_pgid: int | None = None
        self._done = threading.Event()
        self._contained: Containment | None = None
        self._containment_checked = False
        self._hidden: tuple[Path, ...] | None = None
        self._warm_judge: WarmJudge | None = None
        self._resume_ids: list[int] = []

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
        """Pause after the current run."""
        with self._lock:
            self._pause_requested = True
        self._inbox.put(("wake", None))

    def resume(self) -> None:
        with self._lock:
            self._pause_requested = False
        self._inbox.put(("resume", None))

    def stop_run(self) -> None:
        """Kill the current run now, record it as interrupted, and pause."""
        with self._lock:
            self._pause_requested = True
            self._cancel_step("stop")
        self._inbox.put(("wake", None))

    def skip(self) -> None:
        """Drop the current proposal or run and go on."""
        with self._lock:
            self._cancel_step("skip")
        self._inbox.put(("wake", None))

    def shutdown(self) -> None:
        """End the loop: a run in flight is killed, recorded as interrupted and re-queued."""
        with self._lock:
            self._shutdown = True
            self._cancel_step("shutdown")
        self._inbox.put(("wake", None))

    def set_review_gate(self, on: bool) -> None:
        """Hold each proposal for approve/edit/veto (on), or not; turning it off releases a waiting proposal."""
        with self._lock:
            self._review_gate = bool(on)
        self._inbox.put(("gate", bool(on)))

    def abort(self) -> None:
        """Kill the run in flight at once (a second Ctrl-C); nothing is recorded: recover() sees to that."""
        with self._lock:
            pgid = self._run_pgid
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def approve(self, edited: Proposal | None = None) -> None:
        """Let the proposal under review run, or run `edited` in its place."""
        self._inbox.put(("approve", edited))

    def veto(self, reason: str) -> None:
        """Refuse the proposal under review; the reason goes back to the proposer."""
        self._inbox.put(("veto", reason))

    def override(self, status: str, exp_id: int | None = None, by: str = "user") -> None:
        """Force keep or discard of a decision (None: the last one); recorded with who decided."""
        self._inbox.put(("override", (status, exp_id, by)))

    def reapply(self, exp_id: int) -> None:
        """Queue a (discarded) experiment's change again, on top of the current best."""
        self._inbox.put(("reapply", exp_id))

    def reload_program(self) -> None:
        self._inbox.put(("reload_program", None))

    def use_model(self, name: str) -> None:
        """Switch the proposer's model between proposals."""
        self._inbox.put(("use_model", name))

    def set_proposer(self, proposer: Proposer) -> None:
        """Take the proposals from another proposer from the next one on (the cockpit's random search)."""
        self._inbox.put(("set_proposer", proposer))

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            state, current, gate = self._state, self._current, self._review_gate
        best_id = self.ledger.get_meta("best_exp_id")
        best = self.ledger.get(best_id) if best_id is not None else None
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
            best_exp_id=best_id,
            margin=noise["margin"] if noise else None,
            review_gate=gate,
            current_exp_id=current,
            proposer=getattr(self.proposer, "name", ""),
            queued=len(self.ledger.queued()),
            containment=self._contained.level if self._contained else "",
        )

    def close(self) -> None:
        self.ledger.close()

    # ---- plumbing -------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a broken display must not stop the research
            self._sink(event)

    def _set_state(self, state: str, detail: str = "") -> None:
        with self._lock:
            self._state = state
        self._emit(StateChanged(state=state, detail=detail))

    def _cancel_step(self, reason: str) -> None:
        if self._step is not None and not self._step[1].is_set():
            self._cancel_reason = reason
            self._step[1].set()

    @contextlib.contextmanager
    def _stepping(self, what: str) -> Any:
        event = threading.Event()
        with self._lock:
            self._cancel_reason = "shutdown" if self._shutdown else ""
            if self._shutdown:
                event.set()
            self._step = (what, event)
        try:
            yield event
        finally:
            with self._lock:
                self._step = None

    def _stopping(self) -> bool:
        with self._lock:
            return self._shutdown

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the loop in the calling thread until the proposer runs dry, max_experiments, or shutdown."""
        try:
            with self.ws.engine_lock():
                self._containment()
                self.recover()
                self._check_harness_hands_over()
                self._settle_budget()
                if self._ensure_baseline():
                    for exp_id in self._resume_ids:
                        self._safe_point()
                        if self._stopping():
                            break
                        self._resume_experiment(exp_id)
                    self._resume_ids.clear()
                    self._loop()
        except (WorkspaceError, PrepareError) as exc:
            self.error = (
                str(exc) if isinstance(exc, WorkspaceError) else f"the data could not be prepared: {exc}"
            )
            self._emit(EngineError(message=self.error, fatal=True))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self._emit(EngineError(message=self.error, detail=traceback.format_exc(), fatal=True))
        finally:
            if self._warm_judge is not None:
                self._warm_judge.close()
                self._warm_judge = None
            self._set_state("stopped")
            self._done.set()

    def _loop(self) -> None:
        while True:
            self._safe_point()
            if self._stopping():
                return
            limit = self.config.max_experiments
            if limit is not None and self._session_count >= limit:
                self._emit(Info(message=f"reached --max-experiments {limit}"))
                return
            item = self._next_item()
            if item is None:
                name = getattr(self.proposer, "name", "proposer")
                self._emit(Info(message=f"nothing more to try: the {name} proposer has no more proposals"))
                return
            if item is not _SKIPPED:
                self._experiment(item)

    def _safe_point(self) -> None:
        """Handle queued commands; wait here while paused."""
        self._drain_inbox()
        while True:
            with self._lock:
                paused = self._pause_requested and not self._shutdown
            if not paused:
                return
            if self._state != "paused":
                self._set_state("paused")
            self._handle(self._inbox.get())
        # unreachable

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(command)

    def _handle(self, command: tuple[str, Any]) -> None:
        name, arg = command
        if name in ("wake", "resume"):
            return
        if name == "gate":
            self._emit(Info(message=f"review gate {'on' if arg else 'off'}"))
            return
        if name in ("approve", "veto"):
            self._emit(Info(message=f"nothing is waiting for review ({name} ignored)"))
        elif name == "override":
            self._override(*arg)
        elif name == "reapply":
            self._queue_reapply(arg)
        elif name == "reload_program":
            self._program = self.ws.read_program()
            self._emit(Info(message="program.md reloaded"))
        elif name == "use_model":
            use = getattr(self.proposer, "use_model", None)
            if use is None:
                self._emit(EngineError(message=f"the {self.proposer.name} proposer has no model to switch"))
                return
            try:
                use(arg, self._emit)
            except Exception as exc:
                self._emit(EngineError(message=f"cannot switch to model {arg}: {exc}"))
        elif name == "set_proposer":
            self.proposer = arg
            self._emit(ModelLoaded(name=getattr(arg, "model_name", None) or arg.name, seconds=0.0))

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
        best = self._best()
        noise = self.ledger.get_meta("noise")
        with self._lock:
            veto, self._veto_reason = self._veto_reason, None
        return ProposalContext(
            program_md=self._program,
            train_py=self.ws.file_at(self.ws.head()),
            history=history,
            best_bpb=best.val_bpb if best else None,
            noise_margin=noise["margin"] if noise else None,
            budget=describe_budget(self.config.budget, self.device),
            tried_hashes=frozenset(e.train_hash for e in experiments if e.train_hash and e.status in RAN),
            veto_reason=veto,
        )

    def _next_item(self) -> _Item | None:
        queued = self.ledger.queued()
        if queued:
            q = queued[0]
            return _Item(q.proposal, qid=q.qid, source_exp_id=q.source_exp_id, force=True)
        context = self._context()
        model = getattr(self.proposer, "model_name", None)
        with self._stepping("propose") as cancel:
            self._set_state("proposing")
            self._emit(ProposalStarted(proposer=self.proposer.name, model=model))
            try:
                proposal = self.proposer.propose(context, self._emit, cancel)
            except ProposalFailed as exc:
                self._proposer_errors = 0
                if cancel.is_set():
                    return _SKIPPED  # cancelled mid-thought (skip, shutdown): not the model's failure
                self._record_rejected(
                    Proposal(
                        description="(no valid proposal)",
                        edits=(),
                        proposer=self.proposer.name,
                        model=exc.model,
                        replies=exc.replies,
                    ),
                    exc.reason,
                )
                return _SKIPPED
            except Exception as exc:
                if not cancel.is_set():
                    self._wait_for_proposer(exc, cancel)
                return _SKIPPED
            if cancel.is_set():
                # The user dropped it (skip, stop) or the engine is stopping; a model cancelled mid-reply
                # returns None, which must not read as "no more proposals" (that ends the loop).
                return _SKIPPED
        self._proposer_errors = 0
        if proposal is None:
            return None
        if proposal.key and self._key_tried(proposal.key):
            self._emit(Info(message=f"already tried, skipped: {proposal.description}"))
            return _SKIPPED
        return _Item(proposal)

    def _wait_for_proposer(self, exc: Exception, cancel: threading.Event) -> None:
        """The proposer raised (its server is down, slow or failing): wait longer each time, then let the
        loop ask again; pause with the reason once it has failed for PROPOSER_PAUSE_AFTER_S.

        Nothing is recorded and the workspace is untouched. A command, pause, skip or shutdown ends the wait.
        """
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
                    detail=traceback.format_exc(),
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
        deadline = now + delay
        while (left := deadline - time.monotonic()) > 0 and self._inbox.empty():
            with self._lock:
                if self._pause_requested:
                    return
            if cancel.wait(min(left, 0.2)):
                return

    def _key_tried(self, key: str) -> bool:
        if any(q.proposal.key == key for q in self.ledger.queued()):
            return True
        return any(
            e.idea_key == key and e.phase == "decided" and e.status != "interrupted"
            for e in self.ledger.experiments()
        )

    def _record_rejected(self, proposal: Proposal, reason: str, exp_id: int | None = None) -> None:
        """A proposal that never ran: status rejected, with its replies kept."""
        if exp_id is None:
            exp_id = self.ledger.next_id()
            self.ledger.create(
                exp_id,
                "rejected",
                "decided",
                parent_commit=self.ws.head(),
                description=proposal.description,
                proposal=proposal_to_json(proposal),
                proposer=proposal.proposer or self.proposer.name,
                model=proposal.model,
                temperature=proposal.temperature,
                seed=proposal.seed,
                idea_key=proposal.key,
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
            self._session_count += 1
        else:
            self.ledger.update(
                exp_id,
                status="rejected",
                phase="decided",
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
        self._emit(ProposalRejected(exp_id=exp_id, reason=reason, replies=proposal.replies))
        self._emit(
            Decided(
                exp_id=exp_id,
                status="rejected",
                val_bpb=None,
                best_bpb=self._best_bpb(),
                margin=self._margin(),
                reason=reason,
            )
        )

    def _candidate_text(self, item: _Item, base_text: str) -> str:
        """train.py after the item's edits (EditError if they do not apply or touch another file)."""
        for number, edit in enumerate(item.proposal.edits, start=1):
            if edit.path != TRAIN:
                frozen = " (the frozen harness)" if edit.path in HARNESS else ""
                raise EditError(f"edit {number} targets {edit.path}{frozen}: only train.py may be changed")
        try:
            return apply_edits(base_text, item.proposal.edits)
        except EditError:
            if item.source_exp_id is None:
                raise
            merged = self._merge_source(item.source_exp_id, base_text)
            if merged is None:
                raise
            return merged

    def _merge_source(self, source_id: int, base_text: str) -> str | None:
        """A 3-way merge of experiment `source_id`'s change onto `base_text` (for reapply); None on conflict."""
        source = self.ledger.get(source_id)
        if source is None or not source.commit or not source.parent_commit:
            return None
        if not (self.ws.is_commit(source.commit) and self.ws.is_commit(source.parent_commit)):
            return None
        theirs = self.ws.file_at(source.commit)
        ancestor = self.ws.file_at(source.parent_commit)
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for name, text in (("ours", base_text), ("base", ancestor), ("theirs", theirs)):
                path = Path(tmp) / name
                path.write_text(text, encoding="utf-8")
                files.append(str(path))
            proc = subprocess.run(["git", "merge-file", "-p", "-q", *files], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 and proc.stdout != base_text else None

    # ---- one experiment -------------------------------------------------------------------------------

    def _experiment(self, item: _Item) -> None:
        parent = self.ws.head()
        base_text = self.ws.file_at(parent)
        proposal = item.proposal
        exp_id = self.ledger.next_id()
        with self._lock:
            self._current = exp_id
        try:
            new_text = self._candidate_text(item, base_text)
            digest = file_hash(new_text)  # also refuses text that is not valid UTF-8 (a lone surrogate)
        except EditError as exc:
            self._consume_queue_item(item)
            self._record_rejected(proposal, str(exc))
            return
        except Exception as exc:  # whatever one proposal holds, it is that proposal's problem, not the loop's
            self._consume_queue_item(item)
            self._record_rejected(
                proposal, f"the proposal cannot be applied: {type(exc).__name__}: {exc}"[:300]
            )
            return
        if not item.force:
            twin = next(
                (e for e in self.ledger.experiments() if e.train_hash == digest and e.status in RAN), None
            )
            if twin is not None:
                self._record_rejected(proposal, f"duplicate: this train.py was already tried as #{twin.id}")
                return
        diff = unified_diff(base_text, new_text)
        with self.ledger.transaction() as conn:
            self.ledger._insert(
                conn,
                exp_id,
                "pending",
                "proposed",
                parent_commit=parent,
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
        if gate:
            reviewed = self._review(exp_id, item, base_text, new_text, diff)
            if reviewed is None:
                return
            new_text, proposal = reviewed
        problem = self._validate_and_commit(exp_id, proposal, new_text)
        if problem:
            self._record_rejected(proposal, problem, exp_id)
            return
        self._resume_experiment(exp_id)

    def _consume_queue_item(self, item: _Item) -> None:
        if item.qid is not None:
            self.ledger.dequeue(item.qid)

    def _review(
        self, exp_id: int, item: _Item, base_text: str, new_text: str, diff: str
    ) -> tuple[str, Proposal] | None:
        """Hold the proposal for the user; returns the (possibly edited) text and proposal, or None if dropped."""
        proposal = item.proposal
        self._set_state("waiting_review")
        self._emit(ReviewRequested(exp_id=exp_id, description=proposal.description, diff=diff))
        deferred: list[tuple[str, Any]] = []
        try:
            with self._stepping("review") as cancel:
                return self._await_review(exp_id, proposal, base_text, new_text, diff, cancel, deferred)
        finally:
            for command in deferred:  # decisions wait until the proposal under review is settled
                self._inbox.put(command)

    def _await_review(
        self,
        exp_id: int,
        proposal: Proposal,
        base_text: str,
        new_text: str,
        diff: str,
        cancel: threading.Event,
        deferred: list[tuple[str, Any]],
    ) -> tuple[str, Proposal] | None:
        while True:
            with self._lock:
                gate = self._review_gate
            if not gate:
                self._emit(Info(message=f"#{exp_id} approved: the review gate was turned off"))
                return new_text, proposal
            if cancel.is_set():
                reason = self._cancel_reason
                if reason == "shutdown":
                    self._interrupt(
                        exp_id, "the engine stopped while the proposal waited for review", requeue=True
                    )
                else:
                    self._finish_unrun(exp_id, "vetoed", "skipped by the user")
                return None
            name, arg = self._inbox.get()
            if name == "approve":
                if arg is None:
                    return new_text, proposal
                edited: Proposal = replace(arg, proposer=arg.proposer or "user")
                try:
                    text = self._candidate_text(_Item(edited), base_text)
                except EditError as exc:
                    self._emit(EngineError(message=f"the edited proposal does not apply: {exc}"))
                    self._emit(ReviewRequested(exp_id=exp_id, description=proposal.description, diff=diff))
                    continue
                new_diff = unified_diff(base_text, text)
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
                return text, edited
            if name == "veto":
                reason = str(arg or "vetoed by the user")
                with self._lock:
                    self._veto_reason = reason
                self._finish_unrun(exp_id, "vetoed", reason)
                return None
            if name in ("override", "reapply"):
                deferred.append((name, arg))
            else:
                self._handle((name, arg))

    def _finish_unrun(self, exp_id: int, status: str, reason: str) -> None:
        self.ledger.update(
            exp_id, status=status, phase="decided", decided_by="user", reason=reason, finished_at=time.time()
        )
        self._emit(
            Decided(
                exp_id=exp_id,
                status=status,
                val_bpb=None,
                best_bpb=self._best_bpb(),
                margin=self._margin(),
                reason=reason,
                by="user",
            )
        )

    def _validate_and_commit(self, exp_id: int, proposal: Proposal, new_text: str) -> str:
        """Commit the candidate; returns a problem (the proposal is refused) or ''."""
        if problems := self.ws.harness_problems():
            self.ws.restore_harness()
            return f"the frozen harness changed ({', '.join(problems)}); restored it and refused the proposal"
        message = (
            f"{proposal.description}\n\nexperiment #{exp_id} by {proposal.proposer or self.proposer.name}"
        )
        if proposal.model:
            message += f" ({proposal.model})"
        self.ws.train_path.write_text(new_text, encoding="utf-8")
        changed = self.ws.changed_tracked_files()
        if set(changed) - {TRAIN} or self.ws.harness_problems():
            self.ws.move_branch(self.ws.head())
            return f"the change touches more than train.py ({', '.join(changed)}); refused"
        commit = self.ws.commit_train(new_text, message)
        crash_point("after_commit", exp_id)
        self.ledger.update(exp_id, commit=commit, phase="committed")
        return ""

    def _resume_experiment(self, exp_id: int) -> None:
        """Run (what is left of) a committed experiment, then decide it."""
        exp = self.ledger.get(exp_id)
        assert exp is not None and exp.commit
        with self._lock:
            self._current = exp_id
        runs = self.ledger.runs(exp_id)
        if not runs:
            result = self._run(exp, n=0, seed=self.config.base_seed)
            if result.outcome == "interrupted":
                self._interrupted_run(exp_id)
                return
            runs = self.ledger.runs(exp_id)
        first = runs[0]
        if first.outcome != "ok" or first.val_bpb is None:
            self._decide(exp_id, first.outcome or "crash", first.reason or "the run failed")
            return
        best, margin = self._best_bpb(), self._margin()
        assert best is not None and margin is not None
        verdict = judge(first.val_bpb, best, margin, self.config.confirm_marginal)
        if verdict.status != "confirm":
            self._decide(exp_id, verdict.status, verdict.reason)
            return
        self._emit(Info(message=f"#{exp_id}: {verdict.reason}"))
        if len(runs) < 2:
            result = self._run(exp, n=1, seed=self.config.base_seed + 1)
            if result.outcome == "interrupted":
                self._interrupted_run(exp_id)
                return
            runs = self.ledger.runs(exp_id)
        second = runs[1]
        if second.outcome != "ok" or second.val_bpb is None:
            self._decide(
                exp_id, "discard", f"{verdict.reason}; the confirmation run failed: {second.outcome}"
            )
            return
        confirmed = judge_confirmed([first.val_bpb, second.val_bpb], best, margin)
        self._decide(exp_id, confirmed.status, confirmed.reason)

    def _interrupted_run(self, exp_id: int) -> None:
        reason = self._cancel_reason or "interrupted"
        words = {
            "stop": "stopped by the user",
            "skip": "skipped by the user",
            "shutdown": "the engine shut down",
        }
        self._interrupt(exp_id, words.get(reason, reason), requeue=reason == "shutdown")

    # ---- running --------------------------------------------------------------------------------------

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

    def _run(self, exp: Experiment, n: int, seed: int) -> RunResult:
        """One training run of `exp` (its commit checked out), recorded before and after."""
        assert exp.commit
        if self.ws.head() != exp.commit:
            self.ws.move_branch(exp.commit)
        run_dir = self.ws.run_dir(exp.id)
        suffix = "" if n == 0 else f"-{n}"
        log_path = run_dir / f"run{suffix}.log"
        memory, address = self._limits()
        env = {"AUTORESEARCH_CACHE": str(paths.cache_dir()), **self.ws.run_env}  # the profile's vocab
        spec = RunSpec(
            workspace=self.ws.path,
            scratch=self.ws.state_dir / "scratch" / f"{exp.id}-{n}",
            exp_id=exp.id,
            seed=seed,
            log_path=log_path,
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
            env=env,
            device_memory_from_summary=self.device.startswith("cuda"),
        )
        containment = self._containment()
        self.ledger.start_run(exp.id, n, seed, str(log_path))
        self._set_state("baseline" if exp.id == 0 else "running", f"#{exp.id} seed {seed}")
        self._emit(
            RunStarted(
                exp_id=exp.id,
                description=exp.description,
                commit=exp.commit,
                seed=seed,
                budget=describe_budget(self.config.budget, self.device),
            )
        )

        def started(pid: int) -> None:
            with self._lock:
                self._run_pgid = pid
            self.ledger.set_run_pid(exp.id, n, pid)
            crash_point("during_run", exp.id)

        try:
            with self._stepping("run") as cancel:
                result = run_training(
                    spec,
                    self._emit,
                    stop=cancel,
                    on_start=started,
                    containment=containment,
                    judge=self._judge_for_runs(),
                )
        finally:
            with self._lock:
                self._run_pgid = None
        result = self._check_after_run(exp, result)
        summary = result.summary
        self.ledger.finish_run(
            exp.id,
            n,
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
                exp_id=exp.id,
                outcome=result.outcome,
                val_bpb=result.val_bpb,
                seconds=result.seconds,
                summary=summary,
                log_tail=result.log_tail,
                judge_seconds=result.judge_seconds,
            )
        )
        crash_point("after_run", exp.id)
        return result

    def _check_after_run(self, exp: Experiment, result: RunResult) -> RunResult:
        """A run that changed the harness or train.py is invalid, whatever it printed; the files are restored."""
        changed = set(self.ws.changed_tracked_files()) | set(self.ws.harness_problems())
        if not changed:
            return result
        assert exp.commit
        self.ws.move_branch(exp.commit)
        if self.ws.harness_problems():
            self.ws.restore_harness()
        if result.outcome == "interrupted":
            return result
        reason = f"the run modified {', '.join(sorted(changed))} (restored): its result cannot be trusted"
        return replace(result, outcome="invalid", val_bpb=None, reason=reason)

    # ---- the baseline ---------------------------------------------------------------------------------

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

    def _ensure_baseline(self) -> bool:
        """Experiment 0: the unmodified train.py, run K times to measure the noise floor. False: stop."""
        exp = self.ledger.get(0)
        if exp is not None and exp.phase == "decided":
            return True
        if exp is None:
            exp = self.ledger.create(
                0,
                "pending",
                "committed",
                parent_commit=None,
                commit=self.ws.head(),
                description="baseline",
                proposer="baseline",
                train_hash=file_hash(self.ws.file_at(self.ws.head())),
            )
        with self._lock:
            self._current = 0
        wanted = [self.config.base_seed + i for i in range(self.seeds)]
        self._emit(
            Info(message=f"baseline: {len(wanted)} run(s) with seeds {wanted} to measure the noise floor")
        )
        for seed in wanted:
            runs = self.ledger.runs(0)
            if any(r.seed == seed and r.outcome == "ok" for r in runs):
                continue
            self._safe_point()
            if self._stopping():
                return False
            result = self._run(exp, n=len(runs), seed=seed)
            if result.outcome == "interrupted":
                self.ledger.update(0, status="interrupted", phase="finished", reason="interrupted")
                if self._cancel_reason == "skip":
                    self._emit(Info(message="the baseline cannot be skipped; it will run again"))
                    return self._ensure_baseline()
                self._safe_point()
                if self._stopping():
                    return False
                return self._ensure_baseline()
            if result.outcome != "ok":
                message = (
                    f"the baseline train.py fails ({result.outcome}: {result.reason}); fix it and run again"
                )
                self.ledger.update(
                    0, status=result.outcome, phase="finished", reason=message, log_tail=result.log_tail
                )
                self.error = message
                self._emit(EngineError(message=message, detail=result.log_tail, fatal=True))
                return False
        runs = [r for r in self.ledger.runs(0) if r.outcome == "ok" and r.seed in wanted]
        values = [r.val_bpb for r in runs if r.val_bpb is not None]
        noise = noise_floor(values, self.config.min_margin, self.config.default_margin)
        self._record_noise(noise)
        reason = f"baseline mean of {len(values)} seed(s); {noise.describe()}"
        with self.ledger.transaction() as conn:
            self.ledger.update(
                0,
                conn,
                status="baseline",
                phase="decided",
                val_bpb=noise.mean,
                peak_memory_mb=max((r.peak_memory_mb or 0.0) for r in runs) or None,
                training_seconds=_mean([r.training_seconds for r in runs]),
                total_seconds=_mean([r.total_seconds for r in runs]),
                log_tail=runs[-1].log_tail,
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
            self.ledger.set_meta("best_exp_id", 0, conn)
            self.ledger.set_meta("best_commit", exp.commit, conn)
            self.ledger.set_meta("baseline_bpb", noise.mean, conn)
            self.ledger.set_meta(
                "baseline_training_seconds", max((r.training_seconds or 0.0) for r in runs), conn
            )
        self.ledger.write_results_tsv(self.ws.results_tsv)
        self._emit(
            Decided(
                exp_id=0,
                status="baseline",
                val_bpb=noise.mean,
                best_bpb=noise.mean,
                margin=noise.margin,
                reason=reason,
            )
        )
        return True

    def _record_noise(self, noise: NoiseFloor) -> None:
        self.ledger.set_meta(
            "noise",
            {
                "values": list(noise.values),
                "std": noise.std,
                "spread": noise.spread,
                "margin": noise.margin,
                "measured": noise.measured,
            },
        )
        self._emit(NoiseFloorEvent(values=noise.values, spread=noise.spread, margin=noise.margin))

    # ---- decisions ------------------------------------------------------------------------------------

    def _best(self) -> Experiment | None:
        best_id = self.ledger.get_meta("best_exp_id")
        return self.ledger.get(best_id) if best_id is not None else None

    def _best_bpb(self) -> float | None:
        best = self._best()
        return best.val_bpb if best else None

    def _margin(self) -> float:
        noise = self.ledger.get_meta("noise")
        return float(noise["margin"]) if noise else self.config.default_margin

    def _decide(self, exp_id: int, status: str, reason: str) -> None:
        """Record the verdict on a finished experiment, then move git to match."""
        runs = [r for r in self.ledger.runs(exp_id) if r.outcome is not None]
        ok = [r for r in runs if r.outcome == "ok" and r.val_bpb is not None]
        exp = self.ledger.get(exp_id)
        assert exp is not None
        values: dict[str, Any] = dict(
            val_bpb=statistics.fmean(r.val_bpb for r in ok if r.val_bpb is not None) if ok else None,
            peak_memory_mb=max((r.peak_memory_mb or 0.0) for r in runs) or None if runs else None,
            training_seconds=_mean([r.training_seconds for r in runs]),
            total_seconds=_mean([r.total_seconds for r in runs]),
            log_tail=runs[-1].log_tail if runs else exp.log_tail,
        )
        if status in FAILED:
            values["val_bpb"] = None
        self._apply_decision(exp, status, reason, "engine", **values)

    def _apply_decision(
        self,
        exp: Experiment,
        status: str,
        reason: str,
        by: str,
        new_best: tuple[int, str] | None = None,
        **values: Any,
    ) -> None:
        """Intent first (ledger, phase deciding), then git, then phase decided; recover() redoes the middle.

        A keep makes `exp` the best; `new_best` (id, commit) names the best explicitly (a discard override).
        """
        previous_best = self._best()
        if new_best is None and status == "keep":
            assert exp.commit
            new_best = (exp.id, exp.commit)
        with self.ledger.transaction() as conn:
            self.ledger.update(
                exp.id,
                conn,
                status=status,
                phase="deciding",
                decided_by=by,
                reason=reason,
                finished_at=time.time(),
                **values,
            )
            if new_best is not None:
                self.ledger.set_meta("best_exp_id", new_best[0], conn)
                self.ledger.set_meta("best_commit", new_best[1], conn)
            if by != "engine":
                self.ledger.record_override(conn, exp.id, exp.status, status, by)
        crash_point("during_decide", exp.id)
        self._settle_git(exp.id)
        self.ledger.update(exp.id, phase="decided")
        crash_point("after_decide", exp.id)
        self.ledger.write_results_tsv(self.ws.results_tsv)
        decided = self.ledger.get(exp.id)
        assert decided is not None
        best = self._best()
        self._emit(
            Decided(
                exp_id=exp.id,
                status=status,
                val_bpb=decided.val_bpb,
                best_bpb=best.val_bpb if best else (previous_best.val_bpb if previous_best else None),
                margin=self._margin(),
                reason=reason,
                by=by,
            )
        )

    def _settle_git(self, exp_id: int) -> None:
        """Make git match the ledger's decision on `exp_id` (idempotent)."""
        exp = self.ledger.get(exp_id)
        assert exp is not None
        if exp.status not in ("keep", "baseline") and exp.commit and self.ws.is_commit(exp.commit):
            self.ws.save_discarded(exp.id, exp.commit)
        best_commit = self.ledger.get_meta("best_commit") or self.ws.initial_commit
        if self.ws.head() != best_commit or self.ws.changed_tracked_files():
            self.ws.move_branch(best_commit)

    def _interrupt(self, exp_id: int, reason: str, requeue: bool) -> None:
        """An experiment that did not finish: recorded as interrupted, the branch back at the best commit."""
        exp = self.ledger.get(exp_id)
        assert exp is not None
        with self.ledger.transaction() as conn:
            self.ledger.update(
                exp_id,
                conn,
                status="interrupted",
                phase="deciding",
                decided_by="engine",
                reason=reason + ("; re-queued" if requeue else ""),
                finished_at=time.time(),
            )
            if requeue and exp.proposal and exp.id != 0:
                self.ledger.enqueue(proposal_from_json(exp.proposal), exp.id, "interrupted", conn)
        self._settle_git(exp_id)
        self.ledger.update(exp_id, phase="decided")
        self.ledger.write_results_tsv(self.ws.results_tsv)
        self._emit(
            Decided(
                exp_id=exp_id,
                status="interrupted",
                val_bpb=None,
                best_bpb=self._best_bpb(),
                margin=self._margin(),
                reason=reason,
            )
        )

    # ---- user decisions -------------------------------------------------------------------------------

    def _override(self, status: str, exp_id: int | None, by: str) -> None:
        if status not in ("keep", "discard"):
            self._emit(EngineError(message=f"override must be keep or discard, not {status!r}"))
            return
        if exp_id is None:
            decided = [
                e
                for e in self.ledger.experiments()
                if e.phase == "decided" and e.status in ("keep", "discard")
            ]
            if not decided:
                self._emit(EngineError(message="there is no keep or discard decision to override"))
                return
            exp: Experiment | None = max(decided, key=lambda e: (e.finished_at or 0.0, e.id))
        else:
            exp = self.ledger.get(exp_id)
        if exp is None or exp.status not in ("keep", "discard") or exp.phase != "decided":
            self._emit(
                EngineError(message=f"experiment {exp_id} has no keep or discard decision to override")
            )
            return
        if exp.status == status:
            self._emit(Info(message=f"#{exp.id} is already {status}"))
            return
        best = self._best()
        best_commit = self.ledger.get_meta("best_commit") or self.ws.initial_commit
        note = f"override by {by} (the engine said {exp.status}): {exp.reason}"
        if status == "discard":
            if exp.commit != best_commit:
                self._emit(
                    EngineError(
                        message=f"#{exp.id} is not the current best; only the last kept change can be "
                        "discarded (later experiments build on it)"
                    )
                )
                return
            parent = self._experiment_at(exp.parent_commit)
            new_best = (parent.id if parent else 0, exp.parent_commit or self.ws.initial_commit)
            self._apply_decision(exp, "discard", note, by, new_best=new_best)
        else:
            if exp.parent_commit != best_commit or exp.val_bpb is None:
                self._emit(
                    EngineError(
                        message=f"#{exp.id} was not made on top of the current best (#"
                        f"{best.id if best else 0}); use reapply {exp.id} instead"
                    )
                )
                return
            self._apply_decision(exp, "keep", note, by)
            with contextlib.suppress(Exception):
                self.ws.repo.git.update_ref("-d", f"refs/autoresearch/discarded/{exp.id}")

    def _experiment_at(self, commit: str | None) -> Experiment | None:
        """The kept (or baseline) experiment whose commit is `commit`."""
        matches = [
            e for e in self.ledger.experiments() if e.commit == commit and e.status in ("keep", "baseline")
        ]
        return matches[-1] if matches else None

    def _queue_reapply(self, exp_id: int) -> None:
        try:
            self._emit(Info(message=queue_reapply(self.ledger, exp_id)))
        except ValueError as exc:
            self._emit(EngineError(message=str(exc)))

    # ---- recovery -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile git, the ledger and results.tsv after a crash or kill -9 (called at the start of run)."""
        notes: list[str] = []
        if removed := self.ws.clear_stale_git_locks():
            notes.append(f"removed stale git locks {removed}")
        in_flight = self.ledger.unfinished()
        for exp in in_flight:
            for run in self.ledger.runs(exp.id):
                if run.outcome is None:
                    if run.pid and kill_stale_run(run.pid, self.ws.state_dir / "scratch"):
                        notes.append(f"killed the orphaned run of #{exp.id} (pid {run.pid})")
                    self.ledger.finish_run(
                        exp.id, run.n, outcome="interrupted", reason="the engine was killed"
                    )
            if exp.id == 0:
                continue  # the baseline reruns its missing seeds
            runs = self.ledger.runs(exp.id)
            if exp.phase == "deciding":
                self._settle_git(exp.id)
                self.ledger.update(exp.id, phase="decided")
                notes.append(f"finished recording the decision on #{exp.id} ({exp.status})")
            elif (
                exp.phase in ("running", "finished")
                and runs
                and all(r.outcome != "interrupted" for r in runs)
            ):
                self._resume_ids.append(exp.id)
                notes.append(f"#{exp.id} finished running before the engine stopped; deciding it now")
            else:
                requeue = self._should_requeue(exp)
                self._interrupt_recovered(exp, requeue)
                notes.append(f"#{exp.id} was interrupted ({exp.phase}){'; re-queued' if requeue else ''}")
        best_commit = self.ledger.get_meta("best_commit") or self.ws.initial_commit
        changed = self.ws.changed_tracked_files()
        if TRAIN in changed and not in_flight:
            # Nobody was running: a person edited train.py by hand. Keep their text before resetting it.
            saved = self.ws.state_dir / f"train.py.{time.strftime('%Y%m%d-%H%M%S')}.uncommitted"
            saved.write_text(self.ws.read_train(), encoding="utf-8")
            notes.append(f"train.py had uncommitted changes: saved them to {saved}")
        if not self._resume_ids and (self.ws.head() != best_commit or changed):
            self.ws.move_branch(best_commit)
            notes.append("moved the branch back to the best kept commit")
        if self.ws.harness_problems():
            self.ws.restore_harness()
            notes.append("restored the frozen harness")
        refs = self.ws.discarded_refs()
        for exp in self.ledger.experiments():
            if (
                exp.phase == "decided"
                and exp.status not in ("keep", "baseline")
                and exp.commit
                and exp.id not in refs
                and self.ws.is_commit(exp.commit)
            ):
                self.ws.save_discarded(exp.id, exp.commit)
        self.ledger.write_results_tsv(self.ws.results_tsv)
        if notes:
            self._emit(Info(message="recovered: " + "; ".join(notes)))

    def _should_requeue(self, exp: Experiment) -> bool:
        """Re-queue an interrupted experiment once; an interrupted re-run is not queued again."""
        if exp.requeued_from is None:
            return True
        source = self.ledger.get(exp.requeued_from)
        return not (source is not None and source.status == "interrupted")

    def _interrupt_recovered(self, exp: Experiment, requeue: bool) -> None:
        reason = f"the engine stopped during phase {exp.phase}" + ("; re-queued" if requeue else "")
        with self.ledger.transaction() as conn:
            self.ledger.update(
                exp.id,
                conn,
                status="interrupted",
                phase="decided",
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
            if requeue and exp.proposal:
                self.ledger.enqueue(proposal_from_json(exp.proposal), exp.id, "interrupted", conn)
        if exp.commit and self.ws.is_commit(exp.commit):
            self.ws.save_discarded(exp.id, exp.commit)


def queue_reapply(ledger: Ledger, exp_id: int) -> str:
    """Queue experiment `exp_id`'s change to run again on top of the best (ValueError if it has none)."""
    exp = ledger.get(exp_id)
    if exp is None or exp_id == 0:
        raise ValueError(f"there is no experiment #{exp_id} to reapply")
    if exp.phase != "decided":
        raise ValueError(f"#{exp_id} is still in flight")
    original = proposal_from_json(exp.proposal)
    if not original.edits:
        raise ValueError(f"#{exp_id} ({exp.status}) has no change to reapply")
    proposal = replace(
        original, description=f"reapply #{exp_id}: {exp.description}", proposer="reapply", key=None
    )
    ledger.enqueue(proposal, exp_id, "reapply")
    return f"#{exp_id} queued again: {exp.description}"


_SKIPPED: Any = _Item(Proposal(description="", edits=()))
"""Returned by _next_item when a proposal was consumed without an experiment to run."""


def _python() -> str:
    import sys

    return sys.executable


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
