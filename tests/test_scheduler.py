"""The scheduler with several trainer slots on real git and the fast harness: runs in parallel, decisions
while other runs are out (merge onto the new best and confirm, conflict), proposing while training, kill -9
with two runs in flight."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
from engine_fakes import SLOW_TRAIN, Recorder, assert_consistent, cli, make_workspace, write_ideas

from agent.commands import (
    SetTrainers,
    Shutdown,
)
from agent.config import EngineConfig
from agent.engine import Engine
from agent.events import Decided, EngineError, Event, EventSink, Info, RunFinished, RunStarted
from agent.ledger import Ledger
from agent.proposals import Proposal, ProposalContext
from agent.researcher.ideas import IdeaQueue, parse_ideas
from agent.session import open_engine, trainer_factory
from agent.trainers.base import Trainer
from agent.workspace import Workspace

FAST = {"seeds": 2, "deadline_s": 60.0, "trainers": 2}
QUICK_WIN = {
    "description": "lower the learning rate",
    "edits": [{"search": "LEARNING_RATE = 1.0", "replace": "LEARNING_RATE = 0.6"}],
}


def _slow(description: str, lr: str, extra: str) -> dict[str, object]:
    """An idea whose run takes 2 s (so it is still out when the quick one is decided)."""
    search = "LEARNING_RATE = 1.0\n\n# ---\n\nEXTRA = 0.0\n\n# ---\n\nSLEEP = 0.2"
    replace = f"LEARNING_RATE = {lr}\n\n# ---\n\nEXTRA = {extra}\n\n# ---\n\nSLEEP = 2.0"
    return {"description": description, "edits": [{"search": search, "replace": replace}]}


def _queue(*ideas: dict[str, object]) -> IdeaQueue:
    return IdeaQueue(parse_ideas("".join(json.dumps(i) + "\n" for i in ideas), Path("ideas.jsonl")))


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path, train=SLOW_TRAIN)


def _ran_together(events: list[Event], first: int, second: int) -> bool:
    """Whether experiment `second` started training before experiment `first` finished."""
    order = [(type(e), getattr(e, "exp_id", None)) for e in events]
    return order.index((RunStarted, second)) < order.index((RunFinished, first))


@pytest.mark.parametrize(
    ("slow", "status", "val_bpb", "reason"),
    [
        # Beats the baseline it started from; merged onto the new best (LR 0.6) it is confirmed: 2.1 - 0.3.
        (_slow("a penalty off", "1.0", "-0.3"), "keep", 1.8, "merged onto the new best #1"),
        # Its change is worth 0.3 only at LR 1.0: merged onto the new best it scores 2.3 > 2.1: discarded.
        (
            _slow("a fragile gain", "1.0", "-0.3 if LEARNING_RATE == 1.0 else 0.2"),
            "discard",
            2.3,
            "not better",
        ),
        # It changed the same line as the keep that landed first: a conflict, discarded with the reason.
        (_slow("a rival learning rate", "0.45", "0.0"), "discard", 2.05, "conflicts with the new best #1"),
    ],
)
def test_a_win_that_lands_after_another_keep_is_merged_and_confirmed(
    ws: Workspace, slow: dict[str, object], status: str, val_bpb: float, reason: str
) -> None:
    events = Recorder()
    engine = open_engine(ws, _queue(QUICK_WIN, slow), EngineConfig(**FAST), events)  # type: ignore[arg-type]
    engine.run()
    assert engine.error is None
    ledger = assert_consistent(ws)
    baseline, quick, late = ledger.experiments()
    assert (quick.status, late.status) == ("keep", status)
    assert _ran_together(events.events, 1, 2), "the two experiments did not train at once"
    assert {e.slot for e in events.of(RunStarted) if e.exp_id in (1, 2)} == {0, 1}
    assert late.val_bpb == pytest.approx(val_bpb) and reason in late.reason
    assert "beat #0, the best it started from" in late.reason
    runs = ledger.runs(2)
    if status == "keep" or reason == "not better":  # merged: a second run on the merged commit
        assert late.base_commit == baseline.commit and late.parent_commit == quick.commit
        assert [r.commit_sha for r in runs][1] == late.commit != runs[0].commit_sha
        assert ws.repo.commit(late.commit).parents[0].hexsha == quick.commit
        assert ws.file_at(late.commit).count("SLEEP = 2.0") == 1 and "LEARNING_RATE = 0.6" in ws.file_at(
            late.commit
        )
        assert ws.repo.git.rev_parse("refs/autoresearch/merged/2") == runs[0].commit_sha
    else:
        assert len(runs) == 1 and late.parent_commit == baseline.commit and late.base_commit is None
    best = ledger.get(ledger.get_meta("best_exp_id"))
    assert best is not None and best.id == (2 if status == "keep" else 1)
    assert [row[3] for row in ledger.results_rows()] == ["keep", "keep", status]


def test_the_baseline_seeds_train_in_parallel(ws: Workspace) -> None:
    events = Recorder()
    engine = open_engine(ws, _queue(), EngineConfig(**FAST), events)  # type: ignore[arg-type]
    engine.run()
    starts = [e for e in events.of(RunStarted) if e.exp_id == 0]
    assert sorted(e.seed for e in starts) == [1, 2] and {e.slot for e in starts} == {0, 1}
    order = [type(e) for e in events.events if isinstance(e, RunStarted | RunFinished)]
    assert order[:2] == [RunStarted, RunStarted]
    assert_consistent(ws)


class _Watching:
    """An idea queue that notes, at each proposal, which runs were training."""

    name = "ideas"

    def __init__(self, queue: IdeaQueue) -> None:
        self.queue = queue
        self.engine: Engine | None = None
        self.seen: list[tuple[int, ...]] = []

    def propose(self, context: ProposalContext, emit: object, cancel: threading.Event) -> Proposal | None:
        assert self.engine is not None
        self.seen.append(self.engine.snapshot().in_flight)
        return self.queue.propose(context, emit, cancel)  # type: ignore[arg-type]


@pytest.mark.parametrize("overlap", [True, False])
def test_the_next_proposal_is_made_while_a_run_trains(ws: Workspace, overlap: bool) -> None:
    slow_then_win = [
        {"description": "slower", "edits": [{"search": "SLEEP = 0.2", "replace": "SLEEP = 1.0"}]},
        QUICK_WIN,
    ]
    proposer = _Watching(_queue(*slow_then_win))
    events = Recorder()
    config = EngineConfig(**{**FAST, "trainers": 1, "overlap": overlap})
    engine = open_engine(ws, proposer, config, events)  # type: ignore[arg-type]
    proposer.engine = engine
    engine.run()
    assert engine.error is None
    ledger = assert_consistent(ws)
    assert [e.status for e in ledger.experiments()] == ["baseline", "discard", "keep"]
    busy = [seen for seen in proposer.seen if seen]
    if overlap:
        assert busy and busy[0] == (1,), proposer.seen  # the second idea was thought of while #1 trained
    else:
        assert not busy, proposer.seen
    assert engine.snapshot().trainers == 1


def test_a_proposal_made_before_a_keep_is_applied_to_the_new_best(ws: Workspace) -> None:
    """Proposed while #1 trained (overlap), the edit still applies after #1 is kept: it runs on #1's commit."""
    ideas = [
        QUICK_WIN,
        {"description": "a penalty off", "edits": [{"search": "EXTRA = 0.0", "replace": "EXTRA = -0.3"}]},
    ]
    events = Recorder()
    config = EngineConfig(**{**FAST, "trainers": 1, "overlap": True})
    engine = open_engine(ws, _queue(*ideas), config, events)  # type: ignore[arg-type]
    engine.run()
    ledger = assert_consistent(ws)
    _, first, second = ledger.experiments()
    assert (first.status, second.status) == ("keep", "keep")
    assert second.parent_commit == first.commit and second.val_bpb == pytest.approx(1.8)
    assert second.base_commit in (None, ledger.get(0).commit)  # type: ignore[union-attr]


def test_kill_9_with_two_runs_in_flight_then_resume(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, train=SLOW_TRAIN)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [QUICK_WIN, _slow("a penalty off", "1.0", "-0.3")])
    args = [
        "run",
        "--headless",
        "--workspace",
        str(ws.path),
        "--ideas",
        str(ideas),
        "--seeds",
        "2",
        "--trainers",
        "2",
    ]
    proc = cli(*args, env={"AUTORESEARCH_CRASH_AT": "during_run:2"})
    assert proc.returncode == -signal.SIGKILL, (proc.stdout, proc.stderr)
    ledger = Ledger(ws.ledger_path)
    assert [r.outcome for r in ledger.runs(2)] == [None]  # killed with #2 (and perhaps #1) training
    ledger.close()
    proc = cli(*args)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    ledger = assert_consistent(ws)
    experiments = ledger.experiments()
    kept = [e.description for e in experiments if e.status == "keep"]
    assert sorted(kept) == ["a penalty off", "lower the learning rate"]  # each kept exactly once
    lost = [e for e in experiments if e.status == "interrupted"]
    assert lost and all("re-queued" in e.reason for e in lost)
    assert ledger.queued() == [] and not [
        r for e in experiments for r in ledger.runs(e.id) if r.outcome is None
    ]
    best = ledger.get(ledger.get_meta("best_exp_id"))
    assert best is not None and best.val_bpb == pytest.approx(1.8)


def test_the_snapshot_counts_busy_trainers(ws: Workspace) -> None:
    events = Recorder()
    seen: list[tuple[int, ...]] = []
    engine = open_engine(
        ws, _queue(QUICK_WIN, _slow("a penalty off", "1.0", "-0.3")), EngineConfig(**FAST), events
    )  # type: ignore[arg-type]
    events.hooks.append(
        lambda e: seen.append(engine.snapshot().in_flight) if isinstance(e, RunStarted) else None
    )
    engine.run()
    assert max(len(s) for s in seen) == 2
    snap = engine.snapshot()
    assert snap.trainers == 2 and snap.in_flight == ()
    assert snap.busy_share is not None and 0.2 < snap.busy_share <= 1.0
    assert snap.experiments_per_hour is not None and snap.experiments_per_hour > 0
    assert any(isinstance(e, Info) and e.message == "training on 2 local trainers" for e in events.events)
    last = [e.message for e in events.of(Info)][-1]
    assert last.startswith("this session: 2 experiment(s) decided in ") and "2 trainer(s) busy " in last
    assert [d.status for d in events.of(Decided)][-1] == "keep"


def test_shutdown_with_runs_waiting_for_a_slot_ends_at_once(ws: Workspace) -> None:
    """One slot, three baseline seeds: seed 1 trains, 2 and 3 wait for the slot; shutdown ends the loop."""
    events = Recorder()
    config = EngineConfig(**{**FAST, "trainers": 1, "seeds": 3})
    engine = open_engine(ws, _queue(QUICK_WIN), config, events)  # type: ignore[arg-type]
    events.hooks.append(lambda e: engine.send(Shutdown()) if isinstance(e, RunStarted) else None)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the engine did not end"
    assert engine.error is None
    ledger = Ledger(ws.ledger_path)
    assert [r.outcome for r in ledger.runs(0)] == ["interrupted"]  # the waiting seeds never started
    assert len(events.of(RunStarted)) == 1


def test_the_trainers_change_once_the_runs_in_flight_end(ws: Workspace) -> None:
    """One slot, two baseline seeds: while seed 1 trains the user asks for two trainers; seed 2 waits for the
    change (nothing new starts on the old setup), then the two ideas train at once on slots 0 and 1."""
    events = Recorder()
    config = EngineConfig(**{**FAST, "trainers": 1})
    engine = open_engine(ws, _queue(QUICK_WIN, _slow("a penalty off", "1.0", "-0.3")), config, events)  # type: ignore[arg-type]
    asked: list[bool] = []

    def ask(event: Event) -> None:
        if isinstance(event, RunStarted) and not asked:
            asked.append(True)
            engine.send(SetTrainers(2))

    events.hooks.append(ask)
    engine.run()
    assert engine.error is None
    infos = [e.message for e in events.of(Info)]
    first, second = infos.index("training on 1 local trainer"), infos.index("training on 2 local trainers")
    assert (
        first < infos.index("training on 2 trainer(s) on this machine once the runs in flight end") < second
    )
    starts = [(e.exp_id, e.seed, e.slot) for e in events.of(RunStarted)]
    assert starts[:2] == [(0, 1, 0), (0, 2, 0)]  # the second seed waited for the change, not for a slot 1
    second_seed = next(i for i, e in enumerate(events.events) if isinstance(e, RunStarted) and e.seed == 2)
    first_done = next(i for i, e in enumerate(events.events) if isinstance(e, RunFinished))
    assert second_seed > first_done
    assert _ran_together(events.events, 1, 2)
    assert {slot for exp_id, _, slot in starts if exp_id in (1, 2)} == {0, 1}
    snap = engine.snapshot()
    assert snap.trainers == 2 and snap.ray is None
    assert snap.busy_share is not None and 0.2 < snap.busy_share <= 1.0
    assert_consistent(ws)


def test_trainers_that_cannot_start_leave_the_old_ones(ws: Workspace) -> None:
    config = EngineConfig(**{**FAST, "trainers": 1})
    local = trainer_factory(ws, config)

    def no_cluster(slots: int, ray: str | None, emit: EventSink) -> Trainer:
        if ray:
            raise ConnectionError(f"no Ray cluster at {ray}")
        return local(slots, ray, emit)

    events = Recorder()
    engine = open_engine(ws, _queue(QUICK_WIN), config, events, no_cluster)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        engine.send(SetTrainers(0))
    engine.send(SetTrainers(3, " 10.0.0.9:6379 "))
    engine.run()
    assert engine.error is None
    errors = [e.message for e in events.of(EngineError)]
    assert errors == [
        "cannot start training on 3 trainer(s) on Ray at 10.0.0.9:6379: no Ray cluster at 10.0.0.9:6379"
    ]
    assert [e.message for e in events.of(Info)].count("training on 1 local trainer") == 2
    assert engine.snapshot().trainers == 1 and engine.snapshot().ray is None
    assert [e.status for e in assert_consistent(ws).experiments()] == ["baseline", "keep"]
