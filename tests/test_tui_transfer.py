"""The cockpit's promotion view: each keep's marks at scale in the timeline, and promotion runs that show in the
trainers and the log but leave the experiment's row as its own runs made it."""

from __future__ import annotations

from pathlib import Path

from tui_helpers import Notifications, RecordingEngine, async_test, wait_until

from agent.events import Decided, LogLine, RunFinished, RunStarted, StepMetric, Transferred
from agent.ledger import Ledger, PromotionRun
from agent.promotion import PROMOTE_META
from agent.researcher.random_search import RandomSearch
from tui.app import CockpitApp, promotion_marks
from tui.demo import demo_header, recorded_session
from tui.state import CockpitState
from tui.widgets.live import run_title
from tui.widgets.trainers import trainer_line


def kept_three() -> CockpitState:
    """A baseline, then #3 kept with one run of 61.5 s: its row as the session's budget made it."""
    state = CockpitState()
    state.apply_batch(
        [
            RunStarted(exp_id=0, description="baseline", commit="c0", seed=1, budget="60 s"),
            RunFinished(exp_id=0, outcome="ok", val_bpb=2.50, seconds=60.0),
            Decided(exp_id=0, status="baseline", val_bpb=2.50, best_bpb=2.50, margin=0.01, reason=""),
            RunStarted(exp_id=3, description="wider MLP", commit="c3", seed=1, budget="60 s"),
            StepMetric(exp_id=3, step=10, loss=2.9, tokens_per_s=1000.0),
            RunFinished(exp_id=3, outcome="ok", val_bpb=2.40, seconds=61.5),
            Decided(exp_id=3, status="keep", val_bpb=2.40, best_bpb=2.40, margin=0.01, reason=""),
        ]
    )
    return state


def promotion_run(exp_id: int = 3, outcome: str = "ok", val_bpb: float | None = 2.30) -> list:
    return [
        RunStarted(
            exp_id=exp_id, description="wider MLP", commit="c3", seed=1, budget="240 s", promotion="4x"
        ),
        LogLine(exp_id=exp_id, text="step 10 | loss 3.1000 | tok/s 1000"),
        StepMetric(exp_id=exp_id, step=10, loss=3.1, tokens_per_s=1000.0),
        RunFinished(
            exp_id=exp_id, outcome=outcome, val_bpb=val_bpb, seconds=240.0, log_tail="x", promotion="4x"
        ),
    ]


def test_a_promotion_run_leaves_the_experiments_row_and_the_best_curve_alone() -> None:
    state = kept_three()
    row = state.rows[3]
    before = (row.status, row.seeds, row.seconds, row.val_bpb, row.log_tail, row.description)
    best_curve = state.curves[3]
    update = state.apply_batch(promotion_run(outcome="crash", val_bpb=None))
    assert (row.status, row.seeds, row.seconds, row.val_bpb, row.log_tail, row.description) == before
    assert state.header.budget == "60 s"  # the session's budget, not the rung's
    assert state.curves[3] is best_curve  # the 4x curve is not #3's
    assert "timeline" not in update.dirty and {"run", "trainers"} <= update.dirty
    assert update.log.lines[0] == "── 4x promotion: #3 seed 1: wider MLP ──"
    assert not update.notifications  # a failed promotion run is told by its Transferred
    run = state.run
    assert run.promotion == "4x" and run.finished and run.curve.losses == [3.1]


def test_a_promotion_run_says_its_rung_in_the_trainers_and_the_plot() -> None:
    state = kept_three()
    state.apply_batch(promotion_run()[:3])
    trainer = state.trainer_rows()[0]
    assert trainer.promotion == "4x" and trainer.best_loss is None  # another budget: not comparable
    assert "#3 at 4x" in trainer_line(trainer).plain
    title = run_title(state.run, state.best_curve)
    assert title.startswith("#3 at 4x · step 10 loss 3.100") and "best" not in title
    state.apply_batch(promotion_run()[3:])
    assert "finished" in trainer_line(state.trainer_rows()[0]).plain


def test_a_promotion_banner_names_the_trainer_when_there_are_several() -> None:
    state = kept_three()
    state.header.trainers = 2
    start = promotion_run()[0]
    update = state.apply_batch([RunStarted(**{**vars(start), "slot": 1, "where": "node-b"})])
    assert update.log.lines == ["── 4x promotion: #3 seed 1 · trainer 2 on node-b: wider MLP ──"]


def test_transferred_replaces_the_marks_and_tells_its_message() -> None:
    state = kept_three()
    assert state.marks == {}
    update = state.apply_batch([Transferred(message="#3 transfers at 4x", marks={3: "…", 5: "…"})])
    assert state.marks == {3: "…", 5: "…"}
    assert update.notifications == [("#3 transfers at 4x", "information")]
    assert "timeline" in update.dirty
    state.apply_batch([Transferred(message="#5 does not transfer at 4x", marks={3: "✓"})])
    assert state.marks == {3: "✓"}  # the whole mapping, not a merge


def keep(ledger: Ledger, exp_id: int, parent: str, val_bpb: float, status: str = "keep") -> None:
    ledger.create(
        exp_id,
        status,
        "decided",
        commit=f"c{exp_id}",
        parent_commit=parent,
        train_hash=f"h{exp_id}",
        val_bpb=val_bpb,
        seeds=[1],
        description=f"idea {exp_id}",
    )


def promoted(ledger: Ledger, code_hash: str, seed: int, val_bpb: float) -> None:
    ledger.start_promotion(
        PromotionRun("4x", code_hash, seed, None, None, "240", "ok", val_bpb, "", 1.0, "", "", None, 0.0, 1.0)
    )


def ledger_with_a_promotion(tmp_path: Path) -> Ledger:
    """#1 kept on the baseline and measured at 4x (transfers: +0.05 against a margin of 0.01); #2 on #1 not
    yet."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.create(
        0, "baseline", "decided", commit="c0", train_hash="h0", val_bpb=2.5, seeds=[1, 2], description="base"
    )
    keep(ledger, 1, "c0", 2.4)
    keep(ledger, 2, "c1", 2.3)
    ledger.set_meta(PROMOTE_META, [4.0])
    ledger.set_meta("best_exp_id", 2)
    promoted(ledger, "h0", 3, 2.400)  # a rung's seeds follow the baseline's (1, 2): 3 and 4
    promoted(ledger, "h0", 4, 2.401)
    promoted(ledger, "h1", 3, 2.350)
    return ledger


def test_the_marks_come_from_the_ledger_on_open(tmp_path: Path) -> None:
    ledger = ledger_with_a_promotion(tmp_path)
    assert promotion_marks(ledger) == {1: "✓", 2: "…"}
    ledger.set_meta(PROMOTE_META, [])
    assert promotion_marks(ledger) == {}  # no promotion: no marks
    assert promotion_marks(RecordingEngine(RandomSearch()).ledger) == {}  # not a real ledger


def columns(app: CockpitApp) -> list[str | None]:
    return [column.key.value for column in app.main.timeline.ordered_columns]


@async_test
async def test_the_timeline_shows_the_marks_column_only_while_there_are_marks() -> None:
    app = CockpitApp(header=demo_header())
    said = Notifications()
    async with app.run_test(size=(120, 40), message_hook=said) as pilot:
        await pilot.pause()
        app.feed(recorded_session())
        app.drain_events()
        await pilot.pause()
        timeline = app.main.timeline
        assert "transfer" not in columns(app)
        timeline.move_cursor(row=timeline.shown_ids.index(4), animate=False)
        app.feed([Transferred(message="#4 does not transfer at 4x", marks={2: "✓", 4: "✗…"})])
        app.drain_events()
        await pilot.pause()
        assert columns(app)[:3] == ["id", "status", "transfer"]
        assert str(timeline.get_cell("4", "transfer")) == "✗…"
        assert str(timeline.get_cell("3", "transfer")) == ""
        assert timeline.selected_id == 4  # the cursor stays on its row while the columns change
        assert said.said("#4 does not transfer at 4x")
        app.feed([Transferred(message="promotion off", marks={})])
        app.drain_events()
        await pilot.pause()
        assert "transfer" not in columns(app)


@async_test
async def test_opening_a_workspace_reads_its_marks(tmp_path: Path) -> None:
    app = CockpitApp(header=demo_header())
    engine = RecordingEngine(RandomSearch())
    engine.ledger = ledger_with_a_promotion(tmp_path)  # type: ignore[assignment]
    async with app.run_test(size=(120, 40)) as pilot:
        app.engine = engine
        app._read_ledger()
        await wait_until(pilot, lambda: app.state.marks == {1: "✓", 2: "…"}, 30, "the marks read")
        await pilot.pause()
        assert str(app.main.timeline.get_cell("1", "transfer")) == "✓"
