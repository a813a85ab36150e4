"""The engine's bookkeeping: every ledger and git transition of a workspace, named, with no threads.

Every state change is written to the ledger before git is moved to match it, so `recover()` can put a killed
engine's workspace back in a consistent state: the branch at the best kept commit, every discarded commit
under refs/autoresearch/discarded/<id>, interrupted experiments recorded as such (and re-queued), results.tsv
regenerated from the ledger. Each transition has a crash point (`CRASH_POINTS`) where the kill -9 tests stop
the engine. The scheduler (agent.engine) decides *when*; this module records *what*, and is the only writer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

from agent.budget import Budget
from agent.candidate import merge3
from agent.decisions import NoiseFloor
from agent.edits import file_hash, unified_diff
from agent.events import Decided, EngineError, EventSink, Info, NoiseMeasured, ProposalRejected, RunFinished
from agent.findings import constant_changes
from agent.ledger import (
    FAILED,
    KEPT,
    RAN,
    Experiment,
    Ledger,
    Phase,
    RunRecord,
    Status,
    proposal_from_json,
    proposal_to_json,
)
from agent.proposals import HistoryRow, Proposal, ProposalContext
from agent.sandbox.spec import Outcome, RunResult
from agent.static_noop import normal_form
from agent.workspace import TRAIN, Workspace, WorkspaceError

CRASH_ENV = "AUTORESEARCH_CRASH_AT"
"""Fault injection for tests: `point` or `point:exp_id` makes the engine SIGKILL itself at that point."""
CRASH_POINTS = (
    "after_propose",
    "after_review_edit",
    "after_commit",
    "during_run",
    "after_run",
    "after_merge",
    "during_decide",
    "after_decide",
    "during_baseline",
    "after_baseline",
    "during_promotion",
    "after_promotion",
)
"""Every transition's point (the baseline's decision has its own two: it is recorded by another path; a promotion
run's two are `agent.ladder`'s, keyed by the rung's factor: during_promotion:4)."""


def crash_point(name: str, exp_id: int | None = None) -> None:
    """Die by SIGKILL here if AUTORESEARCH_CRASH_AT names this point (and experiment)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, target = spec.partition(":")
    if point == name and (not target or (exp_id is not None and target == str(exp_id))):
        os.kill(os.getpid(), signal.SIGKILL)


def run_finished(exp_id: int, result: RunResult, slot: int, promotion: str = "") -> RunFinished:
    """The event that says how a run of `exp_id` in trainer `slot` ended (a promotion run's: at its rung)."""
    return RunFinished(
        exp_id=exp_id,
        outcome=result.outcome,
        val_bpb=result.val_bpb,
        seconds=result.seconds,
        summary=result.summary,
        log_tail=result.log_tail,
        judge_seconds=result.judge_seconds,
        slot=slot,
        promotion=promotion,
    )


PROBE_TRUST = 3
"""Children of one parent settled by their probes in a row after which the parent's children train in full."""


@dataclass
class Recovered:
    """What `Books.recover` found: lines for the user, experiments whose runs all ended (decide them), and
    the process ids of runs a killed engine left (the trainers kill them, if they still are those runs)."""

    notes: list[str] = field(default_factory=list)
    resume: list[int] = field(default_factory=list)
    stale: list[tuple[int, int]] = field(default_factory=list)
    """(experiment id, pid) of each run that was training when the engine died."""


class Books:
    """The ledger and git of one workspace, moved together."""

    def __init__(self, ws: Workspace, ledger: Ledger, emit: EventSink, default_margin: float) -> None:
        self.ws, self.ledger, self._emit = ws, ledger, emit
        self.default_margin = default_margin
        """The margin (bpb) until the baseline has measured the noise."""
        self._forms: dict[str, str | None] = {}
        """Each tried commit's train.py in normal form (`static_noop.normal_form`), read once."""

    # ---- reading --------------------------------------------------------------------------------------

    def best(self) -> Experiment | None:
        best_id = self.ledger.get_meta("best_exp_id")
        return self.ledger.get(best_id) if best_id is not None else None

    def best_bpb(self) -> float | None:
        best = self.best()
        return best.val_bpb if best else None

    def best_commit(self) -> str:
        return str(self.ledger.get_meta("best_commit") or self.ws.initial_commit)

    def margin(self) -> float:
        noise = self.ledger.get_meta("noise")
        return float(noise["margin"]) if noise else self.default_margin

    def experiment_at(self, commit: str | None) -> Experiment | None:
        """The kept (or baseline) experiment whose commit is `commit`."""
        matches = [e for e in self.ledger.experiments() if e.commit == commit and e.status in KEPT]
        return matches[-1] if matches else None

    def current_runs(self, exp: Experiment) -> list[RunRecord]:
        """The runs of `exp` on its current commit (a change merged onto a newer best trains again)."""
        return [r for r in self.ledger.runs(exp.id) if r.commit_sha in (None, exp.commit)]

    def started_from(self, exp: Experiment) -> Experiment:
        """The kept experiment (or baseline) `exp` was applied to: what it is judged against."""
        parent = self.experiment_at(exp.parent_commit)
        if parent is not None and parent.val_bpb is not None:
            return parent
        best = self.best()
        assert best is not None
        return best

    def may_probe(self, exp: Experiment, parent: Experiment) -> bool:
        """Whether `exp`'s next run may be settled by a probe against `parent`: its first run only, and not once
        PROBE_TRUST of the parent's children in a row were settled by their probes (no-op, crash, hang). A run
        can tell a probe (its clock counts steps), so a kept train.py could make every child look like a no-op
        in one; its children then train in full, as before probes."""
        if self.current_runs(exp):
            return False
        streak = 0
        for child in self.ledger.experiments():
            runs = self.ledger.runs(child.id) if child.id and child.parent_commit == parent.commit else []
            if runs:
                streak = streak + 1 if all("probe_steps" in r.summary for r in runs) else 0
                if streak >= PROBE_TRUST:
                    why = f"probes settled {PROBE_TRUST} of #{parent.id}'s children in a row"
                    self._emit(Info(message=f"#{exp.id} trains in full, unprobed: {why}"))
                    return False
        return True

    def judge_seconds(self, exp: Experiment) -> float | None:
        """The longest the judge took on one of `exp`'s runs, as the runner measured it (None: none judged)."""
        runs = self.ledger.runs(exp.id)
        return max(
            (s for r in runs if (s := _number(r.summary.get("judge_seconds"))) is not None), default=None
        )

    def made_on(
        self, source_exp_id: int | None, base_commit: str | None, parent: str
    ) -> tuple[str | None, str | None]:
        """The train.py a change was made on, where that is not the best `parent`, and the text it gave there
        when that is known: a re-applied experiment's parent and commit, or the older best a proposal was
        made against (None, None: made on the best)."""
        if source_exp_id is not None:
            source = self.ledger.get(source_exp_id)
            if source is None or not (
                self.ws.is_commit(source.commit) and self.ws.is_commit(source.parent_commit)
            ):
                return None, None
            assert source.commit and source.parent_commit
            return self.ws.file_at(source.parent_commit), self.ws.file_at(source.commit)
        if base_commit not in (None, parent) and self.ws.is_commit(base_commit):
            assert base_commit
            return self.ws.file_at(base_commit), None
        return None, None

    def proposal_context(self, program_md: str, budget: str, veto_reason: str | None) -> ProposalContext:
        """What a proposer may look at: the program, the best train.py, the decided history, the margin and
        every train.py already tried (or in flight)."""
        experiments = self.ledger.experiments()
        kept = {e.commit: e.val_bpb for e in experiments if e.status in KEPT and e.commit}
        history = tuple(self._history_row(e, kept) for e in experiments if e.phase == Phase.DECIDED)
        tried = [e for e in experiments if e.train_hash and (e.status in RAN or e.phase != Phase.DECIDED)]
        noise = self.ledger.get_meta("noise")
        return ProposalContext(
            program_md=program_md,
            train_py=self.ws.file_at(self.best_commit()),
            history=history,
            best_bpb=self.best_bpb(),
            noise_margin=noise["margin"] if noise else None,
            budget=budget,
            tried_hashes=frozenset(e.train_hash for e in tried if e.train_hash),
            tried_forms=self._tried_forms(tried),
            veto_reason=veto_reason,
        )

    @staticmethod
    def _history_row(exp: Experiment, kept: dict[str, float | None]) -> HistoryRow:
        parent_bpb = kept.get(exp.parent_commit or "")
        constants, code_changed = constant_changes(exp.diff)
        return HistoryRow(
            exp_id=exp.id,
            description=exp.description,
            status=exp.status,
            val_bpb=exp.val_bpb,
            crash_tail="\n".join(exp.log_tail.splitlines()[-15:]) if exp.status in FAILED else "",
            train_hash=exp.train_hash,
            change=exp.val_bpb - parent_bpb if exp.val_bpb is not None and parent_bpb is not None else None,
            constants=constants,
            code_changed=code_changed,
            reason=exp.reason,
        )

    def _tried_forms(self, tried: list[Experiment]) -> dict[str, str]:
        """Normal form -> the experiment in words, for every train.py tried (read from git once per commit)."""
        forms: dict[str, str] = {}
        for exp in tried:
            if not exp.commit:
                continue
            if exp.commit not in self._forms:
                self._forms[exp.commit] = (
                    normal_form(self.ws.file_at(exp.commit)) if self.ws.is_commit(exp.commit) else None
                )
            form = self._forms[exp.commit]
            if form is not None:
                bpb = f", {exp.val_bpb:.4f}" if exp.val_bpb is not None else ""
                forms.setdefault(form, f'#{exp.id} "{exp.description}" ({exp.status}{bpb})')
        return forms

    def baseline_decided(self) -> bool:
        exp = self.ledger.get(0)
        return exp is not None and exp.phase == Phase.DECIDED

    # ---- the budget -----------------------------------------------------------------------------------

    def settled_budget(self, requested: Budget | None, device: str) -> tuple[Budget, str]:
        """The budget this session's runs get: every run of a workspace uses the one its baseline was measured
        with (results must compare). WorkspaceError when `requested` is another; with a word for the user
        when the baseline's was taken."""
        stored = self._stored_budget(device)
        if stored is None or not self.baseline_decided():
            return requested or Budget.default(device), ""
        if requested is None:
            return stored, f"budget {stored}, as the baseline was measured"
        if requested != stored:
            raise WorkspaceError(
                f"the baseline of {self.ws.path} was measured with budget {stored}, not {requested}: results "
                f"would not compare; run with the same budget (--budget {stored.text}) or in a new workspace"
            )
        return stored, ""

    def _stored_budget(self, device: str) -> Budget | None:
        stored = self.ledger.get_meta("budget", "unset")
        if stored == "unset":
            return None
        return Budget.default(device) if stored is None else Budget.parse(stored)  # None: the old default

    def record_budget(self, budget: Budget) -> None:
        """The budget the baseline is (or will be) measured with; fixed once the baseline is decided."""
        if not self.baseline_decided():
            self.ledger.set_meta("budget", budget.text)

    # ---- proposals that never ran ---------------------------------------------------------------------

    def record_rejected(
        self, proposal: Proposal, reason: str, proposer: str, exp_id: int | None = None
    ) -> int:
        """A proposal that never ran: status rejected, with its replies kept. Returns its id."""
        if exp_id is None:
            exp_id = self.ledger.next_id()
            self.ledger.create(
                exp_id,
                Status.REJECTED,
                Phase.DECIDED,
                parent_commit=self.best_commit(),
                description=proposal.description,
                proposal=proposal_to_json(proposal),
                proposer=proposal.proposer or proposer,
                model=proposal.model,
                temperature=proposal.temperature,
                seed=proposal.seed,
                idea_key=proposal.key,
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
        else:
            self.ledger.update(
                exp_id,
                status=Status.REJECTED,
                phase=Phase.DECIDED,
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
        self._emit(ProposalRejected(exp_id=exp_id, reason=reason, replies=proposal.replies))
        self._decided(exp_id, Status.REJECTED, None, reason)
        return exp_id

    def finish_unrun(self, exp_id: int, status: str, reason: str) -> None:
        """An experiment the user dropped before it ran (vetoed, skipped)."""
        self.ledger.update(
            exp_id,
            status=status,
            phase=Phase.DECIDED,
            decided_by="user",
            reason=reason,
            finished_at=time.time(),
        )
        self._decided(exp_id, status, None, reason, by="user")

    def dequeue(self, qid: int) -> None:
        """A queued proposal taken off the re-run queue without becoming an experiment (it did not apply)."""
        self.ledger.dequeue(qid)

    def _decided(
        self, exp_id: int, status: str, val_bpb: float | None, reason: str, by: str = "engine"
    ) -> None:
        self._emit(
            Decided(
                exp_id=exp_id,
                status=status,
                val_bpb=val_bpb,
                best_bpb=self.best_bpb(),
                margin=self.margin(),
                reason=reason,
                by=by,
            )
        )

    # ---- an experiment, from proposal to its runs -----------------------------------------------------

    def record_proposed(
        self,
        exp_id: int,
        proposal: Proposal,
        text: str,
        parent: str,
        *,
        base_commit: str | None,
        proposer: str,
        qid: int | None = None,
        source_exp_id: int | None = None,
    ) -> str:
        """A new experiment: `proposal`, whose train.py is `text`, on the best `parent` (made on `base_commit`
        where that differs); taken off the re-run queue if it came from there. Returns its diff."""
        base_text = self.ws.file_at(parent)
        diff = unified_diff(base_text, text)
        with self.ledger.transaction() as conn:
            self.ledger.insert(
                conn,
                exp_id,
                Status.PENDING,
                Phase.PROPOSED,
                parent_commit=parent,
                base_commit=base_commit if base_commit not in (None, parent) else None,
                description=proposal.description,
                proposal=proposal_to_json(proposal),
                diff=diff,
                proposer=proposal.proposer or proposer,
                model=proposal.model,
                temperature=proposal.temperature,
                seed=proposal.seed,
                train_hash=file_hash(text),
                idea_key=proposal.key,
                requeued_from=source_exp_id,
            )
            if qid is not None:
                self.ledger.dequeue(qid, conn)
        crash_point("after_propose", exp_id)
        return diff

    def record_review_edit(self, exp_id: int, proposal: Proposal, text: str, base_text: str) -> str:
        """The user's edit of a proposal under review: `proposal` (by the user) gives `text`. Its diff."""
        diff = unified_diff(base_text, text)
        self.ledger.update(
            exp_id,
            description=proposal.description,
            proposal=proposal_to_json(proposal),
            diff=diff,
            proposer=proposal.proposer,
            train_hash=file_hash(text),
        )
        crash_point("after_review_edit", exp_id)
        return diff

    def record_rebased(self, exp_id: int, text: str, parent: str, made_on: str) -> None:
        """A proposal that waited for review while a keep landed: its change, `text`, now on the new best
        `parent` (it was made on `made_on`)."""
        self.ledger.update(
            exp_id,
            parent_commit=parent,
            base_commit=made_on,
            diff=unified_diff(self.ws.file_at(parent), text),
            train_hash=file_hash(text),
        )

    def commit_candidate(
        self, exp_id: int, proposal: Proposal, text: str, parent: str, proposer: str
    ) -> bool:
        """Commit the candidate beside the branch (phase committed). False, and the proposal rejected, when the
        frozen harness changed on disk (it is restored first)."""
        if problems := self.ws.harness_problems():
            self.ws.restore_harness()
            reason = (
                f"the frozen harness changed ({', '.join(problems)}); restored it and refused the proposal"
            )
            self.record_rejected(proposal, reason, proposer, exp_id)
            return False
        message = f"{proposal.description}\n\nexperiment #{exp_id} by {proposal.proposer or proposer}"
        if proposal.model:
            message += f" ({proposal.model})"
        commit = self.ws.commit_candidate(text, parent, message)
        crash_point("after_commit", exp_id)
        self.ledger.update(exp_id, commit=commit, phase=Phase.COMMITTED)
        return True

    def merge_onto_best(self, exp: Experiment) -> Experiment | None:
        """`exp` won against the best it started from, but another keep landed meanwhile: its change merged
        onto the new best and committed there, to be confirmed by a run (the commit it trained is kept under
        refs/autoresearch/merged/<id>). None when the change conflicts with the new best or is in it."""
        assert exp.commit and exp.parent_commit
        best, best_commit = self.best(), self.best_commit()
        assert best is not None
        ours = self.ws.file_at(best_commit)
        merged = merge3(self.ws.file_at(exp.parent_commit), self.ws.file_at(exp.commit), ours)
        if merged is None:
            return None
        self.ws.keep_ref(f"refs/autoresearch/merged/{exp.id}", exp.commit)
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
        crash_point("after_merge", exp.id)
        return self.ledger.get(exp.id)

    def start_run(self, exp_id: int, n: int, seed: int, log_path: str, commit: str) -> None:
        """Run `n` of an experiment starts (phase running), before anything is started."""
        self.ledger.start_run(exp_id, n, seed, log_path, commit=commit)

    def run_started(self, exp_id: int, n: int, pid: int) -> None:
        """The run's process exists here (a restarted engine kills it, should this one be killed)."""
        self.ledger.set_run_pid(exp_id, n, pid)
        crash_point("during_run", exp_id)

    def finish_run(self, exp_id: int, n: int, result: RunResult, slot: int = 0) -> RunResult:
        """How run `n` (in trainer `slot`) ended, once checked (`check_after_run`); the checked result."""
        result = self.check_after_run(result)
        summary = result.summary
        self.ledger.finish_run(
            exp_id,
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
        crash_point("after_run", exp_id)
        self._emit(run_finished(exp_id, result, slot))
        return result

    def lose_run(self, exp_id: int, n: int, reason: str, system_retries: int = 0) -> None:
        """The trainer lost run `n` (its node or worker went away) or the runner failed: interrupted."""
        self.ledger.finish_run(
            exp_id, n, outcome=Outcome.INTERRUPTED, reason=reason, system_retries=system_retries
        )
        self._emit(
            RunFinished(
                exp_id=exp_id, outcome=Outcome.INTERRUPTED, val_bpb=None, seconds=0.0, log_tail=reason
            )
        )

    def check_after_run(self, result: RunResult) -> RunResult:
        """A run that changed the harness or train.py is invalid, whatever it printed; the files are restored."""
        changed = set(self.ws.changed_tracked_files()) | set(self.ws.harness_problems())
        if not changed:
            return result
        self.ws.move_branch(self.best_commit())
        if self.ws.harness_problems():
            self.ws.restore_harness()
        if result.outcome == Outcome.INTERRUPTED:
            return result
        reason = f"the run modified {', '.join(sorted(changed))} (restored): its result cannot be trusted"
        return replace(result, outcome=Outcome.INVALID, val_bpb=None, reason=reason)

    # ---- the baseline ---------------------------------------------------------------------------------

    def baseline(self) -> Experiment:
        """Experiment 0, the unmodified train.py at the branch's head (made on first use)."""
        exp = self.ledger.get(0)
        if exp is not None:
            return exp
        head = self.ws.head()
        return self.ledger.create(
            0,
            Status.PENDING,
            Phase.COMMITTED,
            parent_commit=None,
            commit=head,
            description="baseline",
            proposer="baseline",
            train_hash=file_hash(self.ws.file_at(head)),
        )

    def baseline_run_interrupted(self) -> None:
        """A baseline run was stopped: its seed runs again (the baseline is never skipped)."""
        self.ledger.update(0, status=Status.INTERRUPTED, phase=Phase.FINISHED, reason="interrupted")

    def baseline_failed(self, failed: RunRecord, message: str) -> None:
        """The unmodified train.py does not run: nothing can be compared with it."""
        self.ledger.update(
            0, status=failed.outcome, phase=Phase.FINISHED, reason=message, log_tail=failed.log_tail
        )
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

    def record_baseline(self, runs: list[RunRecord], noise: NoiseFloor) -> None:
        """The baseline's decision from its ok runs: the noise floor, the first best. Intent first (ledger,
        phase deciding), then git, then phase decided, as every decision (`apply_decision`)."""
        exp = self.baseline()
        assert exp.commit
        self.ledger.set_meta("noise", noise.as_dict())
        self._emit(NoiseMeasured(values=noise.values, spread=noise.spread, margin=noise.margin))
        reason = f"baseline mean of {len(noise.values)} seed(s); {noise.describe()}"
        with self.ledger.transaction() as conn:
            self.ledger.update(
                0,
                conn,
                status=Status.BASELINE,
                phase=Phase.DECIDING,
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
            handovers = [h for r in runs if (h := _number(r.summary.get("handover_seconds"))) is not None]
            if handovers:  # measured by the runner: what the baseline needs to stop, export and exit
                self.ledger.set_meta("baseline_handover_seconds", max(handovers), conn)
        crash_point("during_baseline", 0)
        self.settle_git(0)
        self.ledger.update(0, phase=Phase.DECIDED)
        crash_point("after_baseline", 0)
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

    # ---- decisions ------------------------------------------------------------------------------------

    def decide(self, exp_id: int, status: str, reason: str, counted: list[RunRecord] | None = None) -> None:
        """Record the verdict on a finished experiment (its value from the `counted` runs: by default, every
        run of its current commit; the engine leaves out runs the machine disturbed), then git."""
        exp = self.ledger.get(exp_id)
        assert exp is not None
        runs = [r for r in (self.current_runs(exp) if counted is None else counted) if r.outcome is not None]
        ok = [r for r in runs if r.outcome == Outcome.OK and r.val_bpb is not None]
        values: dict[str, Any] = dict(
            val_bpb=statistics.fmean(r.val_bpb for r in ok if r.val_bpb is not None) if ok else None,
            peak_memory_mb=max((r.peak_memory_mb or 0.0) for r in runs) or None if runs else None,
            training_seconds=_mean([r.training_seconds for r in runs]),
            total_seconds=_mean([r.total_seconds for r in runs]),
            log_tail=runs[-1].log_tail if runs else exp.log_tail,
        )
        if status in FAILED:
            values["val_bpb"] = None
        self.apply_decision(exp, status, reason, "engine", **values)

    def apply_decision(
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
        previous_best = self.best()
        if new_best is None and status == Status.KEEP:
            assert exp.commit
            new_best = (exp.id, exp.commit)
        with self.ledger.transaction() as conn:
            self.ledger.update(
                exp.id,
                conn,
                status=status,
                phase=Phase.DECIDING,
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
        self.settle_git(exp.id)
        self.ledger.update(exp.id, phase=Phase.DECIDED)
        crash_point("after_decide", exp.id)
        self.ledger.write_results_tsv(self.ws.results_tsv)
        decided = self.ledger.get(exp.id)
        assert decided is not None
        best = self.best()
        self._emit(
            Decided(
                exp_id=exp.id,
                status=status,
                val_bpb=decided.val_bpb,
                best_bpb=best.val_bpb if best else (previous_best.val_bpb if previous_best else None),
                margin=self.margin(),
                reason=reason,
                by=by,
            )
        )

    def settle_git(self, exp_id: int) -> None:
        """Make git match the ledger's decision on `exp_id` (idempotent)."""
        exp = self.ledger.get(exp_id)
        assert exp is not None
        if exp.status not in KEPT and exp.commit and self.ws.is_commit(exp.commit):
            self.ws.save_discarded(exp.id, exp.commit)
        best_commit = self.best_commit()
        if self.ws.head() != best_commit or self.ws.changed_tracked_files():
            self.ws.move_branch(best_commit)

    def interrupt(self, exp_id: int, reason: str, requeue: bool) -> None:
        """An experiment that did not finish: recorded as interrupted (and re-queued), git at the best."""
        exp = self.ledger.get(exp_id)
        assert exp is not None
        with self.ledger.transaction() as conn:
            self.ledger.update(
                exp_id,
                conn,
                status=Status.INTERRUPTED,
                phase=Phase.DECIDING,
                decided_by="engine",
                reason=reason + ("; re-queued" if requeue else ""),
                finished_at=time.time(),
            )
            if requeue and exp.proposal and exp.id != 0:
                self.ledger.enqueue(proposal_from_json(exp.proposal), exp.id, "interrupted", conn)
        self.settle_git(exp_id)
        self.ledger.update(exp_id, phase=Phase.DECIDED)
        self.ledger.write_results_tsv(self.ws.results_tsv)
        self._decided(exp_id, Status.INTERRUPTED, None, reason)

    # ---- user decisions -------------------------------------------------------------------------------

    def override(self, status: str, exp_id: int | None, by: str) -> None:
        if status not in (Status.KEEP, Status.DISCARD):
            self._emit(EngineError(message=f"override must be keep or discard, not {status!r}"))
            return
        if exp_id is None:
            decided = [
                e
                for e in self.ledger.experiments()
                if e.phase == Phase.DECIDED and e.status in (Status.KEEP, Status.DISCARD)
            ]
            if not decided:
                self._emit(EngineError(message="there is no keep or discard decision to override"))
                return
            exp: Experiment | None = max(decided, key=lambda e: (e.finished_at or 0.0, e.id))
        else:
            exp = self.ledger.get(exp_id)
        if exp is None or exp.status not in (Status.KEEP, Status.DISCARD) or exp.phase != Phase.DECIDED:
            self._emit(
                EngineError(message=f"experiment {exp_id} has no keep or discard decision to override")
            )
            return
        if exp.status == status:
            self._emit(Info(message=f"#{exp.id} is already {status}"))
            return
        best = self.best()
        best_commit = self.best_commit()
        note = f"override by {by} (the engine said {exp.status}): {exp.reason}"
        if status == Status.DISCARD:
            if exp.commit != best_commit:
                self._emit(
                    EngineError(
                        message=f"#{exp.id} is not the current best; only the last kept change can be "
                        "discarded (later experiments build on it)"
                    )
                )
                return
            parent = self.experiment_at(exp.parent_commit)
            new_best = (parent.id if parent else 0, exp.parent_commit or self.ws.initial_commit)
            self.apply_decision(exp, Status.DISCARD, note, by, new_best=new_best)
        else:
            if exp.parent_commit != best_commit or exp.val_bpb is None:
                self._emit(
                    EngineError(
                        message=f"#{exp.id} was not made on top of the current best (#"
                        f"{best.id if best else 0}); use reapply {exp.id} instead"
                    )
                )
                return
            self.apply_decision(exp, Status.KEEP, note, by)
            with contextlib.suppress(Exception):
                self.ws.drop_ref(f"refs/autoresearch/discarded/{exp.id}")

    def reapply(self, exp_id: int) -> str:
        """Queue experiment `exp_id`'s change to run again on top of the best (ValueError if it has none)."""
        return self.ledger.queue_reapply(exp_id)

    # ---- recovery -------------------------------------------------------------------------------------

    def recover(self) -> Recovered:
        """Reconcile git, the ledger and results.tsv after a crash or kill -9 (the engine's first step)."""
        found = Recovered()
        notes = found.notes
        if removed := self.ws.clear_stale_git_locks():
            notes.append(f"removed stale git locks {removed}")
        in_flight = self.ledger.unfinished()
        for exp in in_flight:
            for run in self.ledger.runs(exp.id):
                if run.outcome is None:
                    if run.pid:
                        found.stale.append((exp.id, run.pid))
                    self.ledger.finish_run(
                        exp.id, run.n, outcome=Outcome.INTERRUPTED, reason="the engine was killed"
                    )
            if exp.id == 0:
                if exp.phase == Phase.DECIDING:  # the baseline's decision was written, git not yet moved
                    self.settle_git(0)
                    self.ledger.update(0, phase=Phase.DECIDED)
                    notes.append("finished recording the baseline's decision")
                continue  # else the baseline reruns its missing seeds
            runs = self.ledger.runs(exp.id)
            if exp.phase == Phase.DECIDING:
                self.settle_git(exp.id)
                self.ledger.update(exp.id, phase=Phase.DECIDED)
                notes.append(f"finished recording the decision on #{exp.id} ({exp.status})")
            elif (
                exp.phase in (Phase.RUNNING, Phase.FINISHED)
                and runs
                and all(r.outcome != Outcome.INTERRUPTED for r in runs)
            ):
                found.resume.append(exp.id)
                notes.append(f"#{exp.id} finished running before the engine stopped; deciding it now")
            else:
                requeue = self.should_requeue(exp)
                self._interrupt_recovered(exp, requeue)
                notes.append(f"#{exp.id} was interrupted ({exp.phase}){'; re-queued' if requeue else ''}")
        best_commit = self.best_commit()
        changed = self.ws.changed_tracked_files()
        if TRAIN in changed and not in_flight:
            # Nobody was running: a person edited train.py by hand. Keep their text before resetting it.
            saved = self.ws.state_dir / f"train.py.{time.strftime('%Y%m%d-%H%M%S')}.uncommitted"
            saved.write_text(self.ws.read_train(), encoding="utf-8")
            notes.append(f"train.py had uncommitted changes: saved them to {saved}")
        if self.ws.head() != best_commit or changed:
            self.ws.move_branch(best_commit)
            notes.append("moved the branch back to the best kept commit")
        if self.ws.harness_problems():
            self.ws.restore_harness()
            notes.append("restored the frozen harness")
        refs = self.ws.discarded_refs()
        for exp in self.ledger.experiments():
            if (
                exp.phase == Phase.DECIDED
                and exp.status not in KEPT
                and exp.commit
                and exp.id not in refs
                and self.ws.is_commit(exp.commit)
            ):
                self.ws.save_discarded(exp.id, exp.commit)
        self.ledger.write_results_tsv(self.ws.results_tsv)
        return found

    def should_requeue(self, exp: Experiment) -> bool:
        """Re-queue an interrupted experiment once; an interrupted re-run is not queued again."""
        if exp.requeued_from is None:
            return True
        source = self.ledger.get(exp.requeued_from)
        return not (source is not None and source.status == Status.INTERRUPTED)

    def _interrupt_recovered(self, exp: Experiment, requeue: bool) -> None:
        reason = f"the engine stopped during phase {exp.phase}" + ("; re-queued" if requeue else "")
        with self.ledger.transaction() as conn:
            self.ledger.update(
                exp.id,
                conn,
                status=Status.INTERRUPTED,
                phase=Phase.DECIDED,
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
            if requeue and exp.proposal:
                self.ledger.enqueue(proposal_from_json(exp.proposal), exp.id, "interrupted", conn)
        if exp.commit and self.ws.is_commit(exp.commit):
            self.ws.save_discarded(exp.id, exp.commit)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values there are (None where none is)."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
