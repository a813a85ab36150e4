"""Promotion: keeps trained again at a larger budget, their verdicts, the leave-one-out pass, kill -9 mid-way."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest
from engine_fakes import Recorder, assert_consistent, cli, idea, make_workspace, write_ideas
from test_transfer_report import run as promotion_run

from agent.budget import Budget
from agent.config import EngineConfig
from agent.engine import PROMOTION_RUN
from agent.events import EngineError, EventSink, Info, RunFinished, RunStarted, Transferred
from agent.ledger import Ledger, read_results_tsv
from agent.promotion import (
    FAILS,
    PENDING,
    TRANSFERS,
    UNKNOWN,
    Rung,
    Step,
    additivity,
    next_job,
    parse_rungs,
    read_plan,
    verdict,
    wanted,
)
from agent.researcher.ideas import IdeaQueue, parse_ideas
from agent.sandbox.spec import RunRequest, RunResult
from agent.session import open_engine, trainer_factory
from agent.trainers.base import Trainer, TrainerLost
from agent.workspace import Workspace

SCALED_TRAIN = '''"""Fake train.py whose score depends on the budget: SHORT_ONLY helps at the session's budget only."""
import os

from prepare import report

seed = int(os.environ.get("AUTORESEARCH_SEED", "1"))
budget = float(os.environ["AUTORESEARCH_BUDGET"])

LEARNING_RATE = 1.0

# ---

SHORT_ONLY = 0.0

# ---

EXTRA = 0.0

value = 2.0 + abs(LEARNING_RATE - 0.5) + EXTRA + 0.0001 * (seed % 3)
if budget < 100:
    value -= SHORT_ONLY  # a gain that does not hold when the run trains longer
print("step     0 | loss 2.5000 | lr 1.00e+00 | tok/s 1000 | 0.0s", flush=True)
report(value)
'''
"""Session budget 60 (wall s, the runs take milliseconds); a 2x rung trains at 120."""

TRANSFERS_IDEA = idea("lower the learning rate", "LEARNING_RATE = 1.0", "LEARNING_RATE = 0.6")
SHORT_IDEA = idea("a gain at 60 s only", "SHORT_ONLY = 0.0", "SHORT_ONLY = 0.3")
WORSE_IDEA = idea("add a penalty", "EXTRA = 0.0", "EXTRA = 0.5")


def _queue(*ideas: dict[str, object]) -> IdeaQueue:
    import json

    return IdeaQueue(parse_ideas("".join(json.dumps(i) + "\n" for i in ideas), Path("ideas.jsonl")))


def _run(ws: Workspace, *ideas: dict[str, object], **config: object) -> tuple[Recorder, Ledger]:
    recorder = Recorder()
    settings: dict[str, object] = {"seeds": 2, "deadline_s": 60.0, "promote": (2.0,), **config}
    engine = open_engine(ws, _queue(*ideas), EngineConfig(**settings), recorder)  # type: ignore[arg-type]
    engine.run()
    engine.close()
    assert engine.error is None, engine.error
    return recorder, assert_consistent(ws)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path, train=SCALED_TRAIN)


# ---- the rules, without an engine ---------------------------------------------------------------------


def test_rungs_are_factors_above_one_smallest_first() -> None:
    assert parse_rungs("4x") == (Rung(4.0),)
    assert [r.name for r in parse_rungs("4x, 16X")] == ["4x", "16x"]
    assert parse_rungs("off") == ()
    for bad in ("4", "1x", "0.5x", "16x,4x", "4x,4x", "fast"):
        with pytest.raises(ValueError, match="budget factors above 1"):
            parse_rungs(bad)


def test_each_configuration_is_wanted_once_per_rung_and_seed_in_the_order_that_settles_verdicts() -> None:
    steps = [Step(1, "k1", 0, "base", 0.4), Step(2, "k2", 1, "k1", 0.3)]
    jobs = wanted([Rung(2.0), Rung(4.0)], [1, 2], "base", steps, {1: "v1", 2: "k1"})
    keys = [(j.rung.name, j.subject.code_hash, j.seed) for j in jobs]
    # the baseline's seeds (the rung's noise), each keep after its parent, one run each; the leave-one-out
    # variants at the largest rung only, a variant equal to a configuration already measured not again
    assert keys == [
        ("2x", "base", 1), ("2x", "base", 2), ("2x", "k1", 1), ("2x", "k2", 1),
        ("4x", "base", 1), ("4x", "base", 2), ("4x", "k1", 1), ("4x", "k2", 1), ("4x", "v1", 1),
    ]  # fmt: skip
    assert wanted([Rung(2.0)], [1, 2], "base", [], None) == []  # nothing kept: nothing to verify
    done = [promotion_run("2x", "base", 2.5, 1), promotion_run("2x", "base", 2.5, 2, outcome="interrupted")]
    job = next_job(jobs, done, busy=set())
    assert job is not None and job.key == ("2x", "base", 2)  # an interrupted run runs again
    job = next_job(jobs, done, busy={("2x", "base", 2)})
    assert job is not None and job.key == ("2x", "k1", 1)  # one training now is not started twice


def test_a_keep_transfers_when_its_gain_at_the_rung_beats_the_rungs_margin() -> None:
    from agent.decisions import noise_floor

    step = Step(2, "k2", 1, "k1", 0.05)
    noise = noise_floor([2.50, 2.51], 0.002, 0.01)  # std 0.00707: margin 0.0141
    runs = [promotion_run("2x", "k1", 2.40, 1), promotion_run("2x", "k2", 2.38, 1)]
    found = verdict(step, "2x", runs, noise, 1)
    assert found.state == TRANSFERS and found.gain == pytest.approx(0.02)
    runs = [promotion_run("2x", "k1", 2.40, 1), promotion_run("2x", "k2", 2.39, 1)]
    found = verdict(step, "2x", runs, noise, 1)
    assert (
        found.state == FAILS
        and found.gain == pytest.approx(0.01)
        and "inside the rung's noise" in found.reason
    )
    assert verdict(step, "2x", runs, None, 1).state == PENDING  # the rung's margin is not measured yet
    assert verdict(step, "2x", runs[:1], noise, 1).state == PENDING
    crashed = [promotion_run("2x", "k1", 2.40, 1), promotion_run("2x", "k2", None, 1, outcome="oom")]
    assert verdict(step, "2x", crashed, noise, 1).state == FAILS  # it does not even train at that scale


def test_the_leave_one_out_contributions_and_their_sum() -> None:
    runs = [
        promotion_run("2x", "base", 2.5, 1),
        promotion_run("2x", "best", 2.0, 1),
        promotion_run("2x", "w1", 2.3, 1),
        promotion_run("2x", "w2", 2.1, 1),
    ]
    found = additivity("2x", runs, "base", 2, "best", {1: "w1", 2: "w2", 3: None}, 1)
    assert found.total == pytest.approx(0.5)
    parts = {c.exp_id: c.contribution for c in found.contributions}
    assert parts[1] == pytest.approx(0.3) and parts[2] == pytest.approx(0.1) and parts[3] is None
    assert found.summed is None  # one keep cannot be removed alone: the sum is not known
    found = additivity("2x", runs, "base", 2, "best", {1: "w1", 2: "w2"}, 1)
    assert found.summed == pytest.approx(0.4)  # 0.4 of the 0.5: the keeps help more together


# ---- the engine ---------------------------------------------------------------------------------------


def test_a_keep_that_transfers_and_one_that_does_not(ws: Workspace) -> None:
    events, ledger = _run(ws, TRANSFERS_IDEA, SHORT_IDEA)
    baseline, lowered, short = ledger.experiments()
    assert [e.status for e in (baseline, lowered, short)] == ["baseline", "keep", "keep"]
    assert [row[3] for row in read_results_tsv(ws.results_tsv)] == ["keep", "keep", "keep"]  # rows as before
    runs = ledger.promotions()
    assert all(r.outcome == "ok" and r.budget == "120" for r in runs)
    # the baseline's 2 seeds, each keep once (the first keep is the second's parent), and the one leave-one-out
    # variant not measured yet: the best without the lowered learning rate (without the short gain is #1)
    # at seeds no candidate was chosen on (3, 4; the keeps won on seed 1)
    assert [(r.exp_id, r.without_id, r.seed) for r in runs] == [
        (0, None, 3), (0, None, 4), (1, None, 3), (2, None, 3), (None, 1, 3)
    ]  # fmt: skip
    assert len({(r.code_hash, r.seed) for r in runs}) == len(runs)
    plan = read_plan(ledger)
    assert plan is not None
    verdicts = {exp_id: found[0] for exp_id, found in plan.verdicts().items()}
    assert verdicts[1].state == TRANSFERS and verdicts[1].gain == pytest.approx(0.4)
    assert verdicts[2].state == FAILS and verdicts[2].gain == pytest.approx(0.0)
    loo = plan.additivity()
    assert loo is not None and loo.total == pytest.approx(0.4)
    parts = {c.exp_id: c.contribution for c in loo.contributions}
    assert (
        parts[1] == pytest.approx(0.4) and parts[2] == pytest.approx(0.0) and loo.summed == pytest.approx(0.4)
    )
    # said as it went, and at the end
    assert events.of(Transferred)[-1].marks == {1: "✓", 2: "✗"}
    said = "\n".join(e.message for e in events.of(Transferred))
    assert "#1 transfers at 2x" in said and "#2 does not transfer at 2x" in said
    started = [e for e in events.of(RunStarted) if e.promotion]
    assert len(started) == 5 and all(e.promotion == "2x" and e.budget == "120 s" for e in started)
    assert len([e for e in events.of(RunFinished) if e.promotion]) == 5
    # the experiments themselves are untouched: no run of theirs added
    assert [len(ledger.runs(e.id)) for e in ledger.experiments()] == [2, 1, 1]
    assert any("promotion took" in e.message for e in events.of(Info))


def test_with_share_zero_promotion_never_takes_a_slot_a_proposal_waits_for(ws: Workspace) -> None:
    again = idea("penalty 0.7", "EXTRA = 0.0", "EXTRA = 0.7")
    _, ledger = _run(ws, TRANSFERS_IDEA, WORSE_IDEA, SHORT_IDEA, again, promote_share=0.0)
    experiments = ledger.experiments()
    last_decided = max(e.finished_at or 0.0 for e in experiments)
    assert ledger.promotions() and min(r.started_at for r in ledger.promotions()) >= last_decided


def test_a_share_of_the_trainers_time_lets_promotion_run_while_proposals_wait(ws: Workspace) -> None:
    more = [idea(f"penalty {i}", "EXTRA = 0.0", f"EXTRA = 0.{i}") for i in range(1, 6)]
    _, ledger = _run(ws, TRANSFERS_IDEA, *more, promote_share=0.5)
    last_decided = max(e.finished_at or 0.0 for e in ledger.experiments())
    assert min(r.started_at for r in ledger.promotions()) < last_decided


def test_promote_on_a_finished_session_and_the_setting_is_the_workspaces(ws: Workspace) -> None:
    _run(ws, TRANSFERS_IDEA, promote=())
    ledger = Ledger(ws.ledger_path)
    assert ledger.promotions() == [] and read_plan(ledger) is None
    ledger.close()
    proc = cli("promote", "--workspace", str(ws.path), "--promote", "3x")
    assert proc.returncode == 0, proc.stderr
    assert "#1 transfers at 3x" in proc.stdout
    ledger = Ledger(ws.ledger_path)
    assert {r.rung for r in ledger.promotions()} == {"3x"} and len(ledger.experiments()) == 2
    ledger.close()
    again = cli("promote", "--workspace", str(ws.path))  # the workspace's rungs; everything measured already
    assert again.returncode == 0, again.stderr
    assert "promotion 3x" not in again.stdout  # nothing trained twice
    status = cli("status", "--workspace", str(ws.path))
    assert "promotion  3x: #1 ✓" in status.stdout
    report = cli("report", "--workspace", str(ws.path))
    assert report.returncode == 0 and (ws.path / "transfer.png").stat().st_size > 0
    bad = cli("promote", "--workspace", str(ws.path), "--promote", "0.5x")
    assert bad.returncode == 2 and "budget factors above 1" in bad.stderr
    fresh = ws.path.parent / "fresh"
    bad = cli("run", "--headless", "--workspace", str(fresh), "--promote-share", "2")
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr and not fresh.exists()  # refused first


@pytest.mark.parametrize("point", ["during_promotion:2", "after_promotion:2"])
def test_kill_mid_promotion_then_resume_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, point: str
) -> None:
    ws = make_workspace(tmp_path, train=SCALED_TRAIN)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [TRANSFERS_IDEA, SHORT_IDEA])
    args = ("run", "--headless", "--workspace", str(ws.path), "--ideas", str(ideas), "--seeds", "2")
    killed = cli(*args, "--promote", "2x", env={"AUTORESEARCH_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    ledger = Ledger(ws.ledger_path)
    before = {(r.code_hash, r.seed): r for r in ledger.promotions() if r.outcome == "ok"}
    ledger.close()
    resumed = cli(*args)  # the workspace remembers --promote 2x
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    ledger = assert_consistent(ws)
    runs = {(r.code_hash, r.seed): r for r in ledger.promotions()}
    assert len(runs) == 5 and all(r.outcome == "ok" for r in runs.values())
    for key, run in before.items():  # measured before the kill: kept, not trained again
        assert runs[key].finished_at == run.finished_at
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep", "keep"]
    plan = read_plan(ledger)
    assert plan is not None and plan.marks() == {1: "✓", 2: "✗"}


class _FailsPromotions:
    """The real local trainers, except that promotion runs of the baseline fail: the first `lost` of them as a
    Ray node that goes away, then (`broken`) as a runner that fails on them every time."""

    def __init__(self, real: Trainer, lost: int, broken: bool) -> None:
        self.real, self.to_lose, self.broken, self.lost = real, lost, broken, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def run(self, slot: int, request: RunRequest, *args: object, **kwargs: object) -> RunResult:
        if request.n >= PROMOTION_RUN and request.exp_id == 0 and request.seed == 3:
            if self.lost < self.to_lose:
                self.lost += 1
                raise TrainerLost("the node went away")
            if self.broken:
                raise RuntimeError("the runner broke")
        return self.real.run(slot, request, *args, **kwargs)  # type: ignore[arg-type]


def _failing(ws: Workspace, lost: int, broken: bool) -> tuple[_FailsPromotions, Recorder, Ledger]:
    config = EngineConfig(seeds=2, deadline_s=60.0, promote=(2.0,))
    real = trainer_factory(ws, replace(config, budget=Budget.parse("60")))
    made: list[_FailsPromotions] = []

    def make(slots: int, ray: str | None, emit: EventSink) -> Trainer:
        made.append(_FailsPromotions(real(slots, ray, emit), lost, broken))
        return made[-1]  # type: ignore[return-value]

    events = Recorder()
    engine = open_engine(ws, _queue(TRANSFERS_IDEA), config, events, make)
    engine.run()
    engine.close()
    assert engine.error is None
    return made[0], events, assert_consistent(ws)


def test_a_failing_promotion_run_is_recorded_not_tried_for_ever(ws: Workspace) -> None:
    trainer, events, ledger = _failing(ws, lost=5, broken=False)
    assert trainer.lost == 3  # a node that dies on it every time: given up after 3 losses
    runs = {(r.exp_id, r.seed): r for r in ledger.promotions()}
    assert runs[0, 3].outcome == "invalid" and "the node went away" in runs[0, 3].reason
    assert any("recorded as failed" in e.message for e in events.of(Info))
    plan = read_plan(ledger)
    assert plan is not None and plan.marks() == {
        1: "?"
    }  # its parent, the baseline, failed at 2x with that seed


def test_a_runner_that_fails_on_a_promotion_run_is_said_and_recorded(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, train=SCALED_TRAIN)
    trainer, events, ledger = _failing(ws, lost=0, broken=True)
    assert any("the runner broke" in e.message for e in events.of(EngineError))
    assert {(r.exp_id, r.seed): r.outcome for r in ledger.promotions()}[0, 3] == "invalid"


def test_a_lost_promotion_run_runs_again_like_any_run(ws: Workspace) -> None:
    trainer, events, ledger = _failing(ws, lost=1, broken=False)
    assert trainer.lost == 1
    assert any("the node went away; it runs again" in e.message for e in events.of(Info))
    assert [(r.exp_id, r.seed, r.outcome) for r in ledger.promotions()] == [
        (0, 3, "ok"),
        (0, 4, "ok"),
        (1, 3, "ok"),
    ]
    plan = read_plan(ledger)
    assert plan is not None and plan.marks() == {1: "✓"}


def test_a_gain_that_lives_in_one_seed_does_not_climb_the_ladder(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt: a change better only with the seed candidates are chosen on is kept at the session's budget
    (a clear win there: no confirming run); promoted with that seed it would transfer as well. The rung's seeds
    are ones no candidate was chosen on, so it does not."""
    fluke = idea("a gain on seed 1 only", "EXTRA = 0.0", "EXTRA = -0.3 if seed == 1 else 0.0")
    _, ledger = _run(ws, fluke)
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep"]
    plan = read_plan(ledger)
    assert plan is not None and plan.seeds == (3, 4) and plan.marks() == {1: "✗"}
    ledger.close()

    import agent.promotion

    monkeypatch.setattr(agent.promotion, "rung_seeds", lambda seeds: tuple(sorted(seeds)))  # the door, open
    again = make_workspace(ws.path.parent / "again", train=SCALED_TRAIN)
    _, ledger = _run(again, fluke)
    plan = read_plan(ledger)
    assert plan is not None and plan.marks() == {1: "✓"}  # fooled


def test_a_keep_whose_parent_fails_at_the_rung_is_said_unknown_not_left_pending() -> None:
    from agent.decisions import noise_floor

    step = Step(2, "k2", 1, "k1", 0.05)
    runs = [promotion_run("2x", "k1", None, 1, outcome="oom"), promotion_run("2x", "k2", 2.38, 1)]
    found = verdict(step, "2x", runs, noise_floor([2.5, 2.5], 0.002, 0.01), 1)
    assert found.state == UNKNOWN and found.mark == "?" and "its parent failed at 2x (oom)" in found.reason
    from agent.promotion import rung_noise

    failed = [
        promotion_run("2x", "base", None, 3, outcome="oom"),
        promotion_run("2x", "base", None, 4, outcome="oom"),
    ]
    noise = rung_noise(failed, "2x", "base", [3, 4], 0.002, 0.01)
    assert noise is not None and noise.margin == 0.01 and not noise.measured  # not pending for ever
    assert rung_noise(failed[:1], "2x", "base", [3, 4], 0.002, 0.01) is None
