"""The promotion ladder's side of the engine: what to promote next, its train.py, and its ledger writes.

`agent.promotion` says what the runs mean; this class reads the workspace (the texts at commits, the
leave-one-out variants) and records promotion runs in their own ledger table, never in results.tsv. Like
`agent.books`, it writes the intent before acting (a run's row before its process exists) and has crash points
where the kill -9 tests stop the engine; `recover` marks what a killed engine left as interrupted, to run again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from agent.books import crash_point, run_finished
from agent.candidate import merge3
from agent.edits import file_hash
from agent.events import EventSink, Info, RunStarted, Transferred
from agent.ledger import Ledger, PromotionRun
from agent.promotion import (
    PENDING,
    PROMOTE_META,
    TRANSFERS,
    UNKNOWN,
    WITHOUT_META,
    Job,
    Plan,
    Rung,
    Subject,
    next_job,
    read_plan,
    stored_rungs,
)
from agent.report import transfer_text
from agent.sandbox.spec import Outcome, RunRequest, RunResult
from agent.workspace import Workspace

MAX_LOSSES = 3
"""A promotion run lost this many times in a session (a node that dies on it each time) is recorded as failed."""


class Ladder:
    """The workspace's promotion rungs (`rungs`: asked for now; None: the ones the workspace keeps)."""

    def __init__(self, ws: Workspace, ledger: Ledger, emit: EventSink, rungs: Sequence[Rung] | None) -> None:
        self.ws, self.ledger, self._emit = ws, ledger, emit
        self._asked = None if rungs is None else tuple(rungs)
        self.rungs = self._asked if self._asked is not None else stored_rungs(ledger)
        self._said: set[tuple[int, str]] = set()
        """The verdicts already said in words (each once per engine)."""
        self._losses: dict[tuple[str, str, int], int] = {}
        """Times each promotion run came back without a result in this session."""

    def open(self) -> None:
        """The session starts (the workspace is the engine's): rungs asked for become the workspace's setting,
        and the verdicts so far are said."""
        if self._asked is not None and self._asked != stored_rungs(self.ledger):
            self.ledger.set_meta(PROMOTE_META, [r.factor for r in self._asked])
            names = ", ".join(r.name for r in self._asked) or "off"
            self._emit(Info(message=f"promotion: {names} (kept as this workspace's setting)"))
        self.say("")

    def plan(self) -> Plan | None:
        return read_plan(self.ledger, self.rungs) if self.rungs else None

    def next_job(self, busy: set[tuple[str, str, int]], finishing: bool) -> Job | None:
        """The next promotion run, none training now (`busy`); `finishing`: the session has no more
        experiments, so the leave-one-out pass of the final best is asked for."""
        plan = self.plan()
        if plan is None:
            return None
        if finishing and plan.without is None and plan.steps:
            plan = self._ask_leave_one_out(plan)
        return next_job(plan.jobs(), plan.runs, busy)

    def _ask_leave_one_out(self, plan: Plan) -> Plan:
        """Each keep's change reverted from the final best (a three-way merge; None where it conflicts)."""
        without = {step.exp_id: _hash(self._without(plan.best_id, step.exp_id)) for step in plan.steps}
        self.ledger.set_meta(WITHOUT_META, {"best_id": plan.best_id, "without": without})
        return read_plan(self.ledger, self.rungs) or plan

    def _without(self, best_id: int, keep_id: int) -> str | None:
        """The best's train.py without keep `keep_id`'s change (None: it cannot be reverted alone)."""
        best, keep = self.ledger.get(best_id), self.ledger.get(keep_id)
        if best is None or keep is None or not best.commit or not keep.commit or not keep.parent_commit:
            return None
        return merge3(
            self.ws.file_at(keep.commit), self.ws.file_at(keep.parent_commit), self.ws.file_at(best.commit)
        )

    def text(self, subject: Subject) -> str:
        """The train.py a promotion run trains."""
        if subject.exp_id is not None:
            exp = self.ledger.get(subject.exp_id)
            assert exp is not None and exp.commit
            return self.ws.file_at(exp.commit)
        plan = self.plan()
        assert plan is not None and subject.without_id is not None
        text = self._without(plan.best_id, subject.without_id)
        assert text is not None and file_hash(text) == subject.code_hash
        return text

    def shown_as(self, job: Job) -> int:
        """The experiment a promotion run is shown under: its subject's, the best's for a leave-one-out variant."""
        if job.subject.exp_id is not None:
            return job.subject.exp_id
        best_id = self.ledger.get_meta("best_exp_id")
        return int(best_id) if best_id is not None else 0

    def request(self, job: Job, template: RunRequest) -> RunRequest:
        """`template` (the session's request for a run) made the promotion run's: its train.py, its log, the
        rung's budget, and deadlines that allow the baseline's measured training times the rung's factor."""
        folder = self.ws.runs_dir / "promotions" / job.rung.name
        folder.mkdir(parents=True, exist_ok=True)
        training = template.observed_training_s
        return replace(
            template,
            train_source=self.text(job.subject),
            log_path=folder / f"{job.subject.code_hash[:12]}-seed{job.seed}.log",
            budget=job.rung.budget(template.budget),
            observed_training_s=training * job.rung.factor if training is not None else None,
            probe_against=None,
        )

    # ---- transitions ----------------------------------------------------------------------------------

    def start(self, job: Job, request: RunRequest, slot: int, exp_id: int) -> None:
        """The run's row is written before it starts (a restart marks it interrupted, and it runs again)."""
        subject = job.subject
        self.ledger.start_promotion(
            PromotionRun(
                rung=job.rung.name,
                code_hash=subject.code_hash,
                seed=job.seed,
                exp_id=subject.exp_id,
                without_id=subject.without_id,
                budget=request.budget.text,
                outcome=None,
                val_bpb=None,
                reason="",
                seconds=None,
                log_path=str(request.log_path),
                log_tail="",
                pid=None,
                started_at=time.time(),
                finished_at=None,
            )
        )
        self._emit(
            RunStarted(
                exp_id=exp_id,
                description=f"{subject.describe()} at {job.rung.name} ({request.budget.describe()})",
                commit="",
                seed=job.seed,
                budget=request.budget.describe(),
                slot=slot,
                promotion=job.rung.name,
            )
        )

    def started(self, job: Job, pid: int) -> None:
        self.ledger.set_promotion(*job.key, pid=pid)
        crash_point("during_promotion", _factor(job))

    def finish(self, job: Job, result: RunResult, slot: int, exp_id: int) -> None:
        """How the run ended; an interrupted one runs again later. Says what it measured and the verdicts."""
        self.ledger.set_promotion(
            *job.key,
            outcome=result.outcome,
            val_bpb=result.val_bpb,
            reason=result.reason[:500],
            seconds=result.seconds,
            log_tail=result.log_tail,
            finished_at=time.time(),
        )
        crash_point("after_promotion", _factor(job))
        self._emit(run_finished(exp_id, result, slot, promotion=job.rung.name))
        if result.outcome == Outcome.INTERRUPTED:
            return
        value = f"val_bpb {result.val_bpb:.6f}" if result.val_bpb is not None else f"{result.outcome}"
        self.say(f"promotion {job.rung.name}: {job.subject.describe()} seed {job.seed}: {value}")

    def lose(self, job: Job, reason: str, retry: bool) -> bool:
        """A run that came back without a result: interrupted, to run again when `retry` (its node went away)
        up to MAX_LOSSES times in a session; else recorded as invalid, so that the ladder goes on. Whether it
        runs again."""
        self._losses[job.key] = self._losses.get(job.key, 0) + 1
        again = retry and self._losses[job.key] < MAX_LOSSES
        outcome = Outcome.INTERRUPTED if again else Outcome.INVALID
        self.ledger.set_promotion(*job.key, outcome=outcome, reason=reason, finished_at=time.time())
        return again

    def say(self, message: str) -> None:
        """`message`, and in words each verdict settled since the last time (with everyone's marks)."""
        plan = self.plan()
        if plan is None:
            return
        lines = [message] if message else []
        for found in plan.verdicts().values():
            for v in found:
                if v.state != PENDING and (v.exp_id, v.rung) not in self._said:
                    self._said.add((v.exp_id, v.rung))
                    word = {TRANSFERS: "transfers", UNKNOWN: "cannot be compared"}.get(
                        v.state, "does not transfer"
                    )
                    lines.append(f"#{v.exp_id} {word} at {v.rung}: {v.reason}")
        if not lines:
            return
        self._emit(Transferred(message="\n".join(lines), marks=plan.marks()))

    def recover(self) -> list[tuple[str, int]]:
        """Runs a killed engine left: marked interrupted (they run again); their (what, pid) to kill."""
        stale = []
        for run in self.ledger.promotions():
            if run.outcome is None:
                if run.pid:
                    stale.append((f"promotion {run.rung} seed {run.seed}", run.pid))
                self.ledger.set_promotion(
                    run.rung,
                    run.code_hash,
                    run.seed,
                    outcome=Outcome.INTERRUPTED,
                    reason="the engine was killed",
                )
        return stale

    def summary(self) -> str:
        """The transfer table of the keeps so far (`agent.report.transfer_text`)."""
        plan = self.plan()
        return transfer_text(plan, self.ledger.experiments()) if plan is not None else "no promotion"

    def pending(self, finishing: bool) -> bool:
        """Whether promotion still has runs to make."""
        return self.next_job(set(), finishing) is not None


def _hash(text: str | None) -> str | None:
    return file_hash(text) if text is not None else None


def _factor(job: Job) -> int:
    """A crash point's target: the rung's factor (AUTORESEARCH_CRASH_AT=during_promotion:4)."""
    return round(job.rung.factor)
