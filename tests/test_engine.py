"""The engine on real git with the fake harness (milliseconds per run), and one loop on the real nanogpt."""

from __future__ import annotations

import base64
import re
import threading
from pathlib import Path

import pytest
from engine_fakes import (
    BETTER,
    CRASHES,
    FAKE_METRIC,
    FAKE_TRAIN,
    FLUKE,
    MARGINAL,
    SLOW,
    WORSE,
    BusyMachine,
    Recorder,
    assert_consistent,
    idea,
    make_workspace,
    outside_tmp,
)

from agent import paths
from agent.books import Books
from agent.budget import Budget
from agent.commands import (
    Approve,
    Override,
    Pause,
    Reapply,
    ReloadProgram,
    Resume,
    SetGate,
    Shutdown,
    Skip,
    StopRun,
    UseModel,
    Veto,
)
from agent.config import EngineConfig
from agent.edits import file_hash
from agent.engine import Engine
from agent.events import (
    Decided,
    EngineError,
    Event,
    Info,
    LogLine,
    NoiseMeasured,
    ProposalRejected,
    ReviewRequested,
    RunFinished,
    RunStarted,
    StateChanged,
    Transferred,
)
from agent.ledger import Experiment, Ledger, read_results_tsv
from agent.proposals import Edit, Proposal, ProposalContext, ProposalFailed
from agent.researcher.ideas import IdeaQueue, parse_ideas
from agent.sandbox.spec import JUDGE_MAX_S, JUDGE_MIN_S, judge_deadline
from agent.session import open_engine
from agent.workspace import Workspace, WorkspaceError

FAST = {"seeds": 2, "deadline_s": 60.0}


def _queue(*ideas: dict[str, object]) -> IdeaQueue:
    import json

    return IdeaQueue(parse_ideas("".join(json.dumps(i) + "\n" for i in ideas), Path("ideas.jsonl")))


def _engine(ws: Workspace, *ideas: dict[str, object], **config: object) -> tuple[Engine, Recorder]:
    recorder = Recorder()
    engine = open_engine(ws, _queue(*ideas), EngineConfig(**{**FAST, **config}), recorder)  # type: ignore[arg-type]
    return engine, recorder


def _statuses(ledger: Ledger) -> list[str]:
    return [e.status for e in ledger.experiments()]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path)


def test_full_loop_better_worse_crash(ws: Workspace) -> None:
    engine, events = _engine(ws, BETTER, WORSE, CRASHES)
    engine.run()
    assert engine.error is None
    ledger = assert_consistent(ws)
    baseline, better, worse, crash = ledger.experiments()
    assert _statuses(ledger) == ["baseline", "keep", "discard", "crash"]
    # the branch is at the kept commit, the others are kept under their refs
    assert ws.head() == better.commit
    assert ws.discarded_refs() == {2: worse.commit, 3: crash.commit}
    assert ws.repo.commit(better.commit).message.startswith("lower the learning rate")
    assert "LEARNING_RATE = 0.6" in ws.read_train()
    # lineage: each candidate is built on the best at its time
    assert baseline.commit == ws.initial_commit and baseline.parent_commit is None
    assert better.parent_commit == baseline.commit and worse.parent_commit == better.commit
    # what the ledger holds
    assert baseline.seeds == (1, 2) and baseline.val_bpb == pytest.approx(2.50015)
    assert better.val_bpb == pytest.approx(2.1001) and better.seeds == (1,)
    assert "-LEARNING_RATE = 1.0" in better.diff and "+LEARNING_RATE = 0.6" in better.diff
    assert better.proposer == "ideas" and better.decided_by == "engine"
    assert "margin 0.002000" in better.reason and "2x the margin" in better.reason
    assert crash.val_bpb is None and "RuntimeError: boom" in crash.log_tail
    assert better.peak_memory_mb and better.started_at and better.finished_at  # measured by the runner
    assert Path(better.log_path or "").read_text().startswith("step")
    # results.tsv in autoresearch's format
    assert read_results_tsv(ws.results_tsv) == [
        (baseline.commit[:7], "2.500150", "0.0", "keep", "baseline"),
        (better.commit[:7], "2.100100", "0.0", "keep", "lower the learning rate"),
        (worse.commit[:7], "2.600100", "0.0", "discard", "add a penalty"),
        (crash.commit[:7], "0.000000", "0.0", "crash", "an idea that crashes"),
    ]
    # events: the noise floor, one decision per experiment, the end
    [noise] = events.of(NoiseMeasured)
    assert noise.values == (2.5001, 2.5002) and noise.margin == 0.002
    assert [(d.exp_id, d.status) for d in events.of(Decided)] == [
        (0, "baseline"),
        (1, "keep"),
        (2, "discard"),
        (3, "crash"),
    ]
    assert events.of(StateChanged)[-1].state == "stopped"
    snap = engine.snapshot()
    assert (snap.best_exp_id, snap.n_experiments, snap.margin, snap.state) == (1, 4, 0.002, "stopped")
    assert snap.baseline_bpb == pytest.approx(2.50015) and snap.best_bpb == pytest.approx(2.1001)
    engine.close()


def test_marginal_win_is_confirmed_on_another_seed(ws: Workspace) -> None:
    engine, _ = _engine(ws, MARGINAL)
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "keep"
    assert exp.seeds == (1, 2) and [r.seed for r in ledger.runs(1)] == [1, 2]
    assert exp.val_bpb == pytest.approx((2.4971 + 2.4972) / 2)
    assert "held up" in exp.reason


def test_marginal_fluke_is_discarded(ws: Workspace) -> None:
    engine, _ = _engine(ws, FLUKE)
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "discard" and exp.seeds == (1, 2)
    assert "did not hold up" in exp.reason
    assert ws.head() == ws.initial_commit


def test_single_seed_baseline_uses_the_default_margin(ws: Workspace) -> None:
    engine, events = _engine(ws, BETTER, seeds=1, default_margin=0.5)
    engine.run()
    ledger = assert_consistent(ws)
    assert events.of(NoiseMeasured)[0].margin == 0.5
    assert _statuses(ledger) == ["baseline", "discard"]  # a 0.4 gain is inside a 0.5 margin


@pytest.mark.parametrize(("frozen", "search"), [("prepare.py", "def report("), ("metric.py", "def judge(")])
def test_editing_the_harness_is_refused(ws: Workspace, frozen: str, search: str) -> None:
    tamper = idea("make the metric kinder", search, search.replace("(", "_("), file=frozen)
    before = file_hash((ws.path / frozen).read_text())
    engine, events = _engine(ws, tamper)
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "rejected" and exp.commit is None
    assert frozen in exp.reason and "frozen harness" in exp.reason
    assert file_hash((ws.path / frozen).read_text()) == before
    assert events.of(ProposalRejected)[0].exp_id == 1


def test_a_run_that_rewrites_the_harness_changes_only_its_own_copy(ws: Workspace) -> None:
    forged_judge = "\ndef judge(m, c):\n    return {'status': 'ok', 'val_bpb': 0.1}\n"
    encoded = base64.b64encode(forged_judge.encode()).decode()
    forge = f"base64.b64decode('{encoded}').decode()"
    tamper = idea(  # its prepare.py, and a metric.py of its own beside it: the judge imports neither
        "rewrite the harness at run time",
        "if CRASH:",
        f"import base64\nopen('prepare.py', 'a').write({forge})\nopen('metric.py', 'w').write({forge})\nif CRASH:",
    )
    before = {name: file_hash((ws.path / name).read_text()) for name in ("prepare.py", "metric.py")}
    engine, _ = _engine(ws, tamper)
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    # the judge imported the workspace's frozen copy: the honest number, not the forged one
    assert exp is not None and exp.status == "discard" and exp.val_bpb == pytest.approx(2.5001)
    assert {name: file_hash((ws.path / name).read_text()) for name in before} == before


def test_an_edit_that_does_not_apply_is_rejected(ws: Workspace) -> None:
    engine, _ = _engine(ws, idea("typo", "LEARNING_RAT = 1.0", "LEARNING_RATE = 3.0"))
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "rejected" and "not found" in exp.reason


def test_a_duplicate_train_py_is_rejected(ws: Workspace) -> None:
    twin = idea("the same change, other words", "LEARNING_RATE = 1.0", "LEARNING_RATE = 2.0")
    engine, _ = _engine(ws, idea("lr 2", "LEARNING_RATE = 1.0", "LEARNING_RATE = 2.0"), twin)
    engine.run()
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "discard", "rejected"]
    exp = ledger.get(2)
    assert exp is not None and "duplicate" in exp.reason and "#1" in exp.reason


def test_a_second_run_skips_ideas_already_tried(ws: Workspace) -> None:
    engine, _ = _engine(ws, BETTER, WORSE)
    engine.run()
    engine.close()
    again, events = _engine(ws, BETTER, WORSE, CRASHES)
    again.run()
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "keep", "discard", "crash"]
    assert ledger.get(0) is not None and len(ledger.runs(0)) == 2  # the baseline is not rerun


def test_max_experiments(ws: Workspace) -> None:
    engine, events = _engine(ws, BETTER, WORSE, CRASHES, max_experiments=2)
    engine.run()
    assert _statuses(assert_consistent(ws)) == ["baseline", "keep", "discard"]


def test_a_hanging_candidate_times_out(ws: Workspace) -> None:
    engine, _ = _engine(ws, SLOW, deadline_s=1.5)
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "timeout" and "deadline" in exp.reason


WAITS_FOR_THE_STOP = '''"""Fake train.py: trains until the runner says its budget is spent, then exports for EXPORT s."""
import signal
import time

from prepare import report

told = []
signal.signal(signal.SIGUSR1, lambda *a: told.append(1))
EXPORT = 0.2
while not told:
    time.sleep(0.02)
time.sleep(EXPORT)
report(2.0)
'''


def test_a_run_that_trains_on_after_the_stop_gets_twice_the_baselines_hand_over(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, train=WAITS_FOR_THE_STOP)
    trains_on = idea("train four more seconds after the stop", "EXPORT = 0.2", "EXPORT = 4.0")
    engine, _ = _engine(ws, trains_on, seeds=1, budget=Budget.parse("1"))
    engine.run()
    ledger = assert_consistent(ws)
    assert 0.2 <= ledger.get_meta("baseline_handover_seconds") < 1.0  # measured by the runner
    exp = ledger.get(1)
    assert exp is not None and exp.status == "invalid", (exp.status, exp.reason)
    assert "2.0 s after its budget was spent" in exp.reason


FEELS_THE_MACHINE = '''"""Fake train.py: scores worse when it got less than a core for a second, trains until the stop, and
claims in its summary that the machine was quiet (the runner's own measure stands)."""
import signal
import time

from prepare import report

told = []
signal.signal(signal.SIGUSR1, lambda *a: told.append(1))
wall, cpu = time.monotonic(), time.process_time()
while time.monotonic() - wall < 1.0:
    pass
share = (time.process_time() - cpu) / (time.monotonic() - wall)
EXPORT = 0.2
while not told:
    time.sleep(0.02)
time.sleep(EXPORT)
report(2.0 if share > 0.85 else 2.5)
print("other_load:       0.00")
'''


def test_a_run_the_machine_disturbed_runs_again_and_is_not_decided_on() -> None:
    # Competing busy processes while baseline seed 2 and experiment #1 first train; gone for their reruns. The
    # run prints a quiet machine into its summary; the workspace is where users keep theirs (outside /tmp).
    with outside_tmp("disturbed") as folder:
        ws = make_workspace(folder, train=FEELS_THE_MACHINE)
        same = idea("export a moment longer", "EXPORT = 0.2", "EXPORT = 0.3")
        engine, events = _engine(ws, same, budget=Budget.parse("6"))
        started: dict[tuple[int, int], int] = {}
        machine = BusyMachine()

        def busy_machine(event: Event) -> None:
            if isinstance(event, RunStarted):
                key = (event.exp_id, event.seed)
                started[key] = started.get(key, 0) + 1
                if key in ((0, 2), (1, 1)) and started[key] == 1:
                    machine.start()
            elif isinstance(event, RunFinished):
                machine.stop()

        events.hooks.append(busy_machine)
        try:
            engine.run()
        finally:
            machine.stop()
        assert engine.error is None
        ledger = assert_consistent(ws)
        baseline_runs, runs = ledger.runs(0), ledger.runs(1)
        assert [r.seed for r in baseline_runs] == [1, 2, 2] and [r.seed for r in runs] == [1, 1]
        busy, quiet = baseline_runs[1], [baseline_runs[0], baseline_runs[2], runs[1]]
        assert all(r.other_load is not None and r.other_load < 0.3 for r in quiet), [
            r.other_load for r in quiet
        ]
        assert busy.other_load is not None and busy.other_load > 1.0  # measured, not the 0.00 the run claimed
        assert runs[0].other_load is not None and runs[0].other_load > 1.0
        said = [e.message for e in events.of(Info) if "the machine was busy" in e.message]
        assert len(said) == 2 and said[0].startswith("baseline seed 2:") and said[1].startswith("#1:"), said
        assert "runs again with seed 1" in said[1]
        # The noise floor and the decision come from the quiet runs alone.
        [noise] = events.of(NoiseMeasured)
        assert noise.values == (2.0, 2.0) and baseline_runs[1].val_bpb == 2.5
        exp = ledger.get(1)
        assert exp is not None and exp.status == "discard" and exp.seeds == (1,)
        assert runs[0].val_bpb == 2.5 and runs[1].val_bpb == 2.0  # the busy machine cost the first run
        assert exp.val_bpb == 2.0  # its value is the quiet rerun's, not a mean with the disturbed run


def test_the_judge_gets_ten_times_the_parents_judging_at_least_30_s(tmp_path: Path) -> None:
    """The deadline reaches the judge in the claims it reads (the engine's word, not the run's): this judge
    scores a model by the deadline it was given."""
    says_its_deadline = FAKE_METRIC.replace(
        '"val_bpb": model["val_bpb"]', '"val_bpb": claims["judge_deadline_s"] / 1000'
    )
    assert says_its_deadline != FAKE_METRIC
    ws = make_workspace(tmp_path, metric=says_its_deadline)
    engine, _ = _engine(ws, BETTER, seeds=1)
    engine.run()
    ledger = assert_consistent(ws)
    baseline, child = ledger.get(0), ledger.get(1)
    assert baseline is not None and child is not None
    judged = ledger.runs(0)[0].summary["judge_seconds"]  # measured by the runner
    assert 0 < judged < 3
    assert baseline.val_bpb == pytest.approx(JUDGE_MAX_S / 1000)  # no parent: all of it
    assert child.val_bpb == pytest.approx(judge_deadline(judged) / 1000)
    assert judge_deadline(judged) == max(JUDGE_MIN_S, 10 * judged) and judge_deadline(100.0) == JUDGE_MAX_S


def test_a_broken_baseline_stops_the_engine(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, train="raise SystemExit('no data')\n")
    engine, events = _engine(ws, BETTER)
    engine.run()
    assert engine.error is not None and "baseline" in engine.error
    assert any(e.fatal for e in events.of(EngineError))
    exp = Ledger(ws.ledger_path).get(0)
    assert exp is not None and exp.status == "crash" and exp.phase == "finished"


def test_the_budget_must_match_the_baseline(ws: Workspace) -> None:
    engine, _ = _engine(ws, budget=Budget.parse("5"))
    engine.run()
    engine.close()
    with pytest.raises(
        WorkspaceError, match="measured with budget 5 s, not 7 s"
    ):  # settled before it is built
        _engine(ws, budget=Budget.parse("7"))
    same, events = _engine(ws)  # no budget given: the baseline's, said
    same.run()
    assert same.error is None and same.budget == Budget.parse("5")
    assert any(
        isinstance(e, Info) and e.message == "budget 5 s, as the baseline was measured" for e in events.events
    )


def test_data_that_cannot_be_prepared_ends_the_session_with_the_reason(tmp_path: Path) -> None:
    """Preparing the data happens in the trainer, at its first run (a Ray driver prepares nothing): when it fails,
    nothing can train, and the engine stops with the harness's own words instead of retrying for ever."""
    broken = FAKE_METRIC + "\n\ndef prepare_for_runs():\n    raise RuntimeError('the corpus is gone')\n"
    ws = make_workspace(tmp_path, metric=broken)
    engine, events = _engine(ws, BETTER)
    engine.run()
    assert engine.error is not None and engine.error.startswith("the data could not be prepared: ")
    assert "the corpus is gone" in engine.error
    assert [e.message for e in events.of(EngineError) if e.fatal] == [engine.error]
    [run] = Ledger(ws.ledger_path).runs(0)
    assert run.outcome == "interrupted" and "the corpus is gone" in run.reason  # recorded, nothing trained


def test_a_broken_display_does_not_stop_the_engine(ws: Workspace) -> None:
    def sink(event: Event) -> None:
        raise RuntimeError("the UI fell over")

    engine = open_engine(ws, _queue(BETTER), EngineConfig(**FAST), sink)  # type: ignore[arg-type]
    engine.run()
    assert engine.error is None
    assert _statuses(assert_consistent(ws)) == ["baseline", "keep"]


# ---- the control API ---------------------------------------------------------------------------------


class Recording:
    """A proposer around an idea queue that remembers every context it was given."""

    def __init__(self, queue: IdeaQueue) -> None:
        self.queue = queue
        self.name = "recording"
        self.contexts: list[ProposalContext] = []

    def propose(self, context: ProposalContext, emit: object, cancel: threading.Event) -> Proposal | None:
        self.contexts.append(context)
        return self.queue.propose(context, emit, cancel)  # type: ignore[arg-type]


def test_review_gate_approve_veto_edit(ws: Workspace) -> None:
    recorder = Recorder()
    proposer = Recording(_queue(BETTER, WORSE, CRASHES))
    engine = open_engine(ws, proposer, EngineConfig(review_gate=True, **FAST), recorder)  # type: ignore[arg-type]
    edited = Proposal("edited: lr 0.7", (Edit("LEARNING_RATE = 0.6", "LEARNING_RATE = 0.7"),))

    def review(event: Event) -> None:
        if isinstance(event, ReviewRequested):
            if event.exp_id == 1:
                engine.send(Approve())
            elif event.exp_id == 2:
                engine.send(Veto("no penalties, please"))
            else:
                engine.send(Approve(edited))

    recorder.hooks.append(review)
    engine.run()
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "keep", "vetoed", "discard"]
    vetoed, changed = ledger.get(2), ledger.get(3)
    assert vetoed is not None and vetoed.reason == "no penalties, please" and vetoed.decided_by == "user"
    assert changed is not None and changed.description == "edited: lr 0.7" and changed.proposer == "user"
    assert "+LEARNING_RATE = 0.7" in changed.diff
    assert proposer.contexts[2].veto_reason == "no penalties, please"
    assert proposer.contexts[3].veto_reason is None


def test_pause_takes_effect_after_the_run_and_resume_goes_on(ws: Workspace) -> None:
    engine, events = _engine(ws, BETTER, WORSE)
    events.hooks.append(
        lambda e: engine.send(Pause()) if isinstance(e, RunStarted) and e.exp_id == 1 else None
    )
    engine.start()
    events.wait_for(lambda e: isinstance(e, StateChanged) and e.state == "paused")
    decided = [d.exp_id for d in events.of(Decided)]
    assert decided == [0, 1]  # the run in flight finished and was decided
    assert not [r for r in events.of(RunStarted) if r.exp_id == 2]
    assert engine.snapshot().state == "paused"
    engine.send(Resume())
    engine.join(60)
    assert engine.finished
    assert _statuses(assert_consistent(ws)) == ["baseline", "keep", "discard"]


def test_stop_run_kills_records_and_pauses(ws: Workspace) -> None:
    engine, events = _engine(ws, SLOW, BETTER)
    events.hooks.append(
        lambda e: engine.send(StopRun()) if isinstance(e, LogLine) and e.text == "sleeping" else None
    )
    engine.start()
    events.wait_for(lambda e: isinstance(e, StateChanged) and e.state == "paused")
    [finished] = [r for r in events.of(RunFinished) if r.exp_id == 1]
    assert finished.outcome == "interrupted" and finished.seconds < 30
    engine.send(Shutdown())
    engine.join(60)
    assert engine.finished
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "interrupted" and "stopped by the user" in exp.reason
    assert ledger.queued() == []  # a deliberate stop is not re-queued
    assert ledger.get(2) is None  # shut down while paused: the next idea never started


def test_skip_drops_the_run_and_goes_on(ws: Workspace) -> None:
    engine, events = _engine(ws, SLOW, BETTER)
    events.hooks.append(
        lambda e: engine.send(Skip()) if isinstance(e, LogLine) and e.text == "sleeping" else None
    )
    engine.start()
    engine.join(60)
    assert engine.finished
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "interrupted", "keep"]
    exp = ledger.get(1)
    assert exp is not None and "skipped" in exp.reason


def test_shutdown_during_a_run_requeues_it(ws: Workspace, tmp_path: Path) -> None:
    flag = tmp_path / "slow.flag"
    flag.write_text("1")
    slow_once = idea(
        "slow while the flag exists",
        "CRASH = False",
        f"CRASH = False\nimport os, time\nprint('sleeping', flush=True)\nif os.path.exists({str(flag)!r}):\n"
        "    time.sleep(60)\nLEARNING_RATE = 0.7",
    )
    engine, events = _engine(ws, slow_once)
    events.hooks.append(
        lambda e: engine.send(Shutdown()) if isinstance(e, LogLine) and e.text == "sleeping" else None
    )
    engine.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(1)
    assert exp is not None and exp.status == "interrupted" and "re-queued" in exp.reason
    [queued] = ledger.queued()
    assert queued.source_exp_id == 1
    engine.close()
    flag.unlink()
    again, _ = _engine(ws, slow_once)  # the same ideas file: its idea is queued, not proposed twice
    again.run()
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "interrupted", "keep"]
    rerun = ledger.get(2)
    assert rerun is not None and rerun.requeued_from == 1 and ledger.queued() == []


def test_override_keep_then_discard(ws: Workspace) -> None:
    engine, _ = _engine(ws, BETTER, idea("a bit worse", "EXTRA = 0.0", "EXTRA = 0.001"))
    engine.run()
    engine.close()
    ledger = Ledger(ws.ledger_path)
    better, worse = ledger.get(1), ledger.get(2)
    assert better is not None and worse is not None and worse.status == "discard"

    forced, events = _engine(ws)
    forced.send(Override("keep"))  # the last decision: #2
    forced.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(2)
    assert exp is not None and exp.status == "keep" and exp.decided_by == "user"
    assert "override by user" in exp.reason
    assert ws.head() == worse.commit and 2 not in ws.discarded_refs()
    assert read_results_tsv(ws.results_tsv)[-1][3] == "keep"
    [decided] = [d for d in events.of(Decided) if d.by == "user"]
    assert decided.exp_id == 2 and decided.status == "keep"

    undo, events = _engine(ws)
    undo.send(Override("discard", 1))  # not the current best: refused
    undo.send(Override("discard", 2))
    undo.run()
    assert any("not the current best" in e.message for e in events.of(EngineError))
    ledger = assert_consistent(ws)
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep", "discard"]
    assert ws.head() == better.commit
    assert [(o["exp_id"], o["old_status"], o["new_status"], o["decided_by"]) for o in ledger.overrides()] == [
        (2, "discard", "keep", "user"),
        (2, "keep", "discard", "user"),
    ]


def test_reapply_runs_a_discarded_change_again(ws: Workspace) -> None:
    engine, _ = _engine(ws, WORSE, BETTER)
    engine.run()
    engine.close()
    again, _ = _engine(ws)
    again.send(Reapply(1))
    again.run()
    ledger = assert_consistent(ws)
    exp = ledger.get(3)
    assert exp is not None and exp.proposer == "reapply" and exp.requeued_from == 1
    assert exp.description == "reapply #1: add a penalty"
    assert exp.status == "discard"  # still worse, now on top of the kept change
    assert exp.parent_commit == ledger.get(2).commit  # type: ignore[union-attr]


def test_reload_program_and_snapshot(ws: Workspace) -> None:
    (ws.path / "program.md").write_text("# new instructions\n")
    recorder = Recorder()
    proposer = Recording(_queue(BETTER))
    engine = open_engine(ws, proposer, EngineConfig(**FAST), recorder)  # type: ignore[arg-type]
    snap = engine.snapshot()
    assert (snap.state, snap.branch, snap.n_experiments, snap.best_bpb) == (
        "idle",
        "autoresearch/test",
        0,
        None,
    )
    assert snap.device.startswith(("cpu", "cuda")) and snap.review_gate is False
    engine.send(ReloadProgram())
    engine.send(SetGate(False))
    engine.run()
    assert proposer.contexts[0].program_md == "# new instructions\n"
    assert proposer.contexts[0].best_bpb == pytest.approx(2.50015)
    assert proposer.contexts[0].noise_margin == 0.002
    assert proposer.contexts[0].train_py == FAKE_TRAIN


# ---- the real harness ------------------------------------------------------------------------------------


def _real_idea(text: str, name: str, description: str, new: str) -> dict[str, object]:
    match = re.search(rf"^{name} = [^\n#]+", text, re.MULTILINE)
    assert match, f"{name} is not a constant of nanogpt/train.py any more"
    return idea(description, match.group(0).rstrip(), f"{name} = {new}")


@pytest.mark.slow
def test_full_loop_on_the_real_nanogpt(tmp_path: Path) -> None:
    """Baseline + better, worse and crashing ideas, on the real train.py with a tiny FLOPs budget (1 to 1.5 min).

    One baseline seed keeps it under a minute; the measured noise floor is covered by the fake-harness tests.
    A FLOPs budget makes the runs deterministic on a loaded machine, where a time budget would not be.
    """
    source = paths.nanogpt_dir()
    text = (source / "train.py").read_text()
    batch = int(re.search(r"^BATCH_SIZE = (\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    heads = int(re.search(r"^N_HEAD = (\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    better = _real_idea(text, "BATCH_SIZE", "smaller batches: 4x the steps", str(max(1, batch // 4)))
    worse = _real_idea(text, "LEARNING_RATE", "a learning rate far too small", "1e-5")
    crash = _real_idea(text, "N_HEAD", "heads that do not divide the width", str(heads - 1))
    ws = Workspace.init(tmp_path / "ws", tag="real")
    engine, events = _engine(
        ws, better, worse, crash, budget=Budget.parse("1e11flops"), deadline_s=None, seeds=1, promote=(2.0,)
    )
    engine.run()
    assert engine.error is None, engine.error
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "keep", "discard", "crash"]
    # Promoted at 2x the budget: the baseline and the keep trained again, contained and judged, once each.
    promoted = ledger.promotions()
    assert [(r.exp_id, r.seed, r.budget, r.outcome) for r in promoted] == [
        (0, 2, "2e+11flops", "ok"), (1, 2, "2e+11flops", "ok")
    ]  # fmt: skip
    assert all(r.val_bpb is not None and "[judge] ok" in Path(r.log_path).read_text() for r in promoted)
    assert set(events.of(Transferred)[-1].marks) == {1}
    baseline, kept, discarded, crashed = ledger.experiments()
    assert len(ledger.runs(0)) == 1 and events.of(NoiseMeasured)[0].margin == EngineConfig().default_margin
    assert kept.val_bpb is not None and baseline.val_bpb is not None and kept.val_bpb < baseline.val_bpb
    assert ws.head() == kept.commit
    assert set(ws.discarded_refs()) == {2, 3}
    assert "RuntimeError" in crashed.log_tail
    assert [row[3] for row in read_results_tsv(ws.results_tsv)] == ["keep", "keep", "discard", "crash"]


def test_turning_the_review_gate_off_releases_the_waiting_proposal(ws: Workspace) -> None:
    engine, events = _engine(ws, BETTER, review_gate=True)
    events.hooks.append(lambda e: engine.send(SetGate(False)) if isinstance(e, ReviewRequested) else None)
    engine.run()
    assert _statuses(assert_consistent(ws)) == ["baseline", "keep"]
    assert engine.snapshot().review_gate is False


def test_an_override_sent_during_review_waits_for_the_review(ws: Workspace) -> None:
    engine, events = _engine(ws, WORSE, BETTER, review_gate=True)

    def review(event: Event) -> None:
        if isinstance(event, ReviewRequested) and event.exp_id == 1:
            engine.send(Approve())
        elif isinstance(event, ReviewRequested) and event.exp_id == 2:
            engine.send(Override("keep", 1))  # would move the branch under the proposal; it must wait
            engine.send(Veto("not now"))

    events.hooks.append(review)
    engine.run()
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "keep", "vetoed"]
    exp = ledger.get(1)
    assert exp is not None and exp.decided_by == "user"


class Switchable(Recording):
    """A proposer with models."""

    def __init__(self, queue: IdeaQueue) -> None:
        super().__init__(queue)
        self.model_name: str | None = "small"

    def use_model(self, name: str, emit: object) -> None:
        if name == "missing":
            raise ValueError("no such model")
        self.model_name = name


def test_use_model_between_proposals(ws: Workspace) -> None:
    recorder = Recorder()
    proposer = Switchable(_queue(BETTER))
    engine = open_engine(ws, proposer, EngineConfig(**FAST), recorder)  # type: ignore[arg-type]
    engine.send(UseModel("missing"))
    engine.send(UseModel("big"))
    engine.run()
    assert proposer.model_name == "big" and engine.snapshot().model == "big"
    assert any("cannot switch to model missing" in e.message for e in recorder.of(EngineError))

    plain, events = _engine(ws)
    plain.send(UseModel("big"))
    plain.run()
    assert any("has no model to switch" in e.message for e in events.of(EngineError))


class Thinking:
    """A proposer that thinks until cancelled, then fails as a model would."""

    name = "thinking"
    model_name = None

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = False

    def propose(self, context: ProposalContext, emit: object, cancel: threading.Event) -> Proposal | None:
        self.calls += 1
        if self.calls > 1:
            return None
        self.cancelled = cancel.wait(30)
        raise ProposalFailed("aborted mid-reply")


def test_skip_while_proposing_drops_the_proposal(ws: Workspace) -> None:
    recorder = Recorder()
    thinking = Thinking()
    engine = open_engine(ws, thinking, EngineConfig(**FAST), recorder)  # type: ignore[arg-type]
    recorder.hooks.append(
        lambda e: (
            engine.send(Skip()) if type(e).__name__ == "ProposalStarted" and thinking.calls == 0 else None
        )
    )
    engine.run()
    assert thinking.cancelled and thinking.calls == 2
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline"]  # nothing recorded as rejected: the user dropped it
    assert not recorder.of(EngineError)


@pytest.mark.slow
def test_no_ops_are_recorded_without_a_run_on_the_real_nanogpt(tmp_path: Path) -> None:
    """A comment (the same syntax tree) and a logging interval (the same model after the probe's steps) are
    no-ops: recorded as such, never trained; the crash is caught by the probe, in seconds."""
    text = (paths.nanogpt_dir() / "train.py").read_text()
    comment = idea("say what the width is", "N_EMBD = 128", "N_EMBD = 128  # the model's width")
    logging = _real_idea(text, "LOG_EVERY", "log twice as often", "12")
    heads = int(re.search(r"^N_HEAD = (\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    crash = _real_idea(text, "N_HEAD", "heads that do not divide the width", str(heads - 1))
    ws = Workspace.init(tmp_path / "ws", tag="noop")
    engine, events = _engine(
        ws, comment, logging, crash, budget=Budget.parse("1e11flops"), deadline_s=None, seeds=1
    )
    engine.run()
    assert engine.error is None, engine.error
    ledger = assert_consistent(ws)
    assert _statuses(ledger) == ["baseline", "noop", "noop", "crash"]
    _, commented, logged, crashed = ledger.experiments()
    assert commented.reason.startswith("no-op") and not ledger.runs(1) and commented.commit is None
    assert logged.reason == "no-op: same computation as #0 in 4 probe steps"
    assert [r.outcome for r in ledger.runs(2)] == ["noop"] and logged.val_bpb is None
    assert "probe" in crashed.reason and "RuntimeError" in crashed.log_tail
    [crash_run] = ledger.runs(3)
    assert crash_run.seconds is not None and crash_run.seconds < 60
    assert [row[3] for row in ledger.results_rows()] == ["keep", "crash"]  # no-ops never trained: not rows
    started = [e.exp_id for e in events.of(RunStarted)]
    assert started.count(2) == 1 and 1 not in started


def test_probes_stop_settling_a_parents_children_after_three_in_a_row(tmp_path: Path) -> None:
    """A run can tell a probe, so a kept train.py could make every child look like a no-op (or a crash, or a hang)
    in one. After PROBE_TRUST children of one parent in a row were settled by their probes, the rest train in
    full, as before probes; a child that trained in full breaks the streak."""
    ws = make_workspace(tmp_path)
    ledger = Ledger(ws.ledger_path)
    recorder = Recorder()
    books = Books(ws, ledger, recorder, 0.01)
    parent = ledger.create(0, "baseline", "decided", commit="p0", val_bpb=2.0)
    other = ledger.create(1, "keep", "decided", commit="p1", parent_commit="p0", val_bpb=1.9)

    def child(exp_id: int, settled_by_probe: bool, parent_commit: str = "p0") -> Experiment:
        exp = ledger.create(exp_id, "discard", "decided", commit=f"c{exp_id}", parent_commit=parent_commit)
        ledger.start_run(exp_id, 0, 1, "log")
        ledger.finish_run(exp_id, 0, summary={"probe_steps": 4} if settled_by_probe else {"val_bpb": 2.1})
        return exp

    new = ledger.create(99, "pending", "committed", commit="c99", parent_commit="p0")
    ledger.start_run(1, 0, 1, "log")
    ledger.finish_run(1, 0, summary={"val_bpb": 1.9})
    child(2, True)
    child(3, True)
    child(4, False)  # trained in full: the streak starts again
    child(5, True)
    child(6, True, parent_commit="p1")  # another parent's
    assert books.may_probe(new, parent)
    child(7, True)
    assert books.may_probe(new, parent)  # two in a row
    child(8, True)
    assert not books.may_probe(new, parent) and books.may_probe(new, other)
    assert any(
        "#99 trains in full, unprobed: probes settled 3 of #0's" in e.message for e in recorder.of(Info)
    )
    ledger.start_run(99, 0, 1, "log")
    assert not books.may_probe(new, other)  # a probe is for a first run only
