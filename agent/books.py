"""The engine's bookkeeping: ledger and git transitions, decisions and recovery, with no threads.

Every state change is written to the ledger before git is moved to match it, so `recover()` can put a killed
engine's workspace back in a consistent state: the branch at the best kept commit, every discarded commit
under refs/autoresearch/discarded/<id>, interrupted experiments recorded as such (and re-queued), results.tsv
regenerated from the ledger. The scheduler (agent.engine) decides *when*; this module records *what*.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import EngineConfig
from agent.decisions import NoiseFloor
from agent.events import Decided, EngineError, EventSink, Info, ProposalRejected
from agent.events import NoiseFloor as NoiseFloorEvent
from agent.ledger import (
    FAILED,
    KEPT,
    Experiment,
    Ledger,
    RunRecord,
    Status,
    proposal_from_json,
    proposal_to_json,
)
from agent.proposals import Proposal
from agent.runner import kill_stale_run
from agent.workspace import TRAIN, Workspace

CRASH_ENV = "AUTORESEARCH_CRASH_AT"
"""Fault injection for tests: `point` or `point:exp_id` makes the engine SIGKILL itself at that point."""
CRASH_POINTS = ("after_propose", "after_commit", "during_run", "after_run", "during_decide", "after_decide")


def crash_point(name: str, exp_id: int | None = None) -> None:
    """Die by SIGKILL here if AUTORESEARCH_CRASH_AT names this point (and experiment)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, target = spec.partition(":")
    if point == name and (not target or (exp_id is not None and target == str(exp_id))):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Recovered:
    """What `Books.recover` found: lines for the user, and experiments whose runs all ended (decide them)."""

    notes: list[str] = field(default_factory=list)
    resume: list[int] = field(default_factory=list)


class Books:
    """The ledger and git of one workspace, moved together."""

    def __init__(self, ws: Workspace, ledger: Ledger, config: EngineConfig, emit: EventSink) -> None:
        self.ws, self.ledger, self.config, self._emit = ws, ledger, config, emit

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
        return float(noise["margin"]) if noise else self.config.default_margin

    def experiment_at(self, commit: str | None) -> Experiment | None:
        """The kept (or baseline) experiment whose commit is `commit`."""
        matches = [e for e in self.ledger.experiments() if e.commit == commit and e.status in KEPT]
        return matches[-1] if matches else None

    def current_runs(self, exp: Experiment) -> list[RunRecord]:
        """The runs of `exp` on its current commit (a change merged onto a newer best trains again)."""
        return [r for r in self.ledger.runs(exp.id) if r.commit_sha in (None, exp.commit)]

    def merge(self, ancestor: str, theirs: str, ours: str) -> str | None:
        """`theirs`'s change from `ancestor` applied to `ours` by a 3-way merge; None on a conflict or when
        it changes nothing."""
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for name, text in (("ours", ours), ("base", ancestor), ("theirs", theirs)):
                path = Path(tmp) / name
                path.write_text(text, encoding="utf-8")
                files.append(str(path))
            proc = subprocess.run(["git", "merge-file", "-p", "-q", *files], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 and proc.stdout != ours else None

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
                "decided",
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
                phase="decided",
                decided_by="engine",
                reason=reason,
                finished_at=time.time(),
            )
        self._emit(ProposalRejected(exp_id=exp_id, reason=reason, replies=proposal.replies))
        self._decided(exp_id, Status.REJECTED, None, reason)
        return exp_id

    def finish_unrun(self, exp_id: int, status: str, reason: str) -> None:
        self.ledger.update(
            exp_id, status=status, phase="decided", decided_by="user", reason=reason, finished_at=time.time()
        )
        self._decided(exp_id, status, None, reason, by="user")

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

    # ---- decisions ------------------------------------------------------------------------------------

    def record_noise(self, noise: NoiseFloor) -> None:
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

    def decide(self, exp_id: int, status: str, reason: str) -> None:
        """Record the verdict on a finished experiment (from the runs of its current commit), then git."""
        exp = self.ledger.get(exp_id)
        assert exp is not None
        runs = [r for r in self.current_runs(exp) if r.outcome is not None]
        ok = [r for r in runs if r.outcome == "ok" and r.val_bpb is not None]
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
        self.settle_git(exp.id)
        self.ledger.update(exp.id, phase="decided")
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
                phase="deciding",
                decided_by="engine",
                reason=reason + ("; re-queued" if requeue else ""),
                finished_at=time.time(),
            )
            if requeue and exp.proposal and exp.id != 0:
                self.ledger.enqueue(proposal_from_json(exp.proposal), exp.id, "interrupted", conn)
        self.settle_git(exp_id)
        self.ledger.update(exp_id, phase="decided")
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
                if e.phase == "decided" and e.status in (Status.KEEP, Status.DISCARD)
            ]
            if not decided:
                self._emit(EngineError(message="there is no keep or discard decision to override"))
                return
            exp: Experiment | None = max(decided, key=lambda e: (e.finished_at or 0.0, e.id))
        else:
            exp = self.ledger.get(exp_id)
        if exp is None or exp.status not in (Status.KEEP, Status.DISCARD) or exp.phase != "decided":
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
                self.ws.repo.git.update_ref("-d", f"refs/autoresearch/discarded/{exp.id}")

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
                    if run.pid and kill_stale_run(run.pid, self.ws.state_dir / "scratch"):
                        notes.append(f"killed the orphaned run of #{exp.id} (pid {run.pid})")
                    self.ledger.finish_run(
                        exp.id, run.n, outcome="interrupted", reason="the engine was killed"
                    )
            if exp.id == 0:
                continue  # the baseline reruns its missing seeds
            runs = self.ledger.runs(exp.id)
            if exp.phase == "deciding":
                self.settle_git(exp.id)
                self.ledger.update(exp.id, phase="decided")
                notes.append(f"finished recording the decision on #{exp.id} ({exp.status})")
            elif (
                exp.phase in ("running", "finished")
                and runs
                and all(r.outcome != "interrupted" for r in runs)
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
                exp.phase == "decided"
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


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
