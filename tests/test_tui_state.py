"""The cockpit's pure parts: the event reducer, the batching bridge, the formatting."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.events import (
    Decided,
    EngineError,
    EngineSnapshot,
    EngineState,
    LogLine,
    ModelLoaded,
    ModelLoading,
    NoiseMeasured,
    ProposalReady,
    ProposalRejected,
    ProposalStarted,
    ProposalToken,
    ReviewRequested,
    RunFinished,
    RunStarted,
    StateChanged,
    StepMetric,
)
from agent.ledger import Experiment
from agent.printer import format_event
from tui import format as fmt
from tui.bridge import EventBridge
from tui.state import MAX_CURVE_POINTS, CockpitState, Curve, HeaderInfo, parse_curve, row_from_experiment


def run_events(exp_id: int, val_bpb: float, status: str, best: float, steps: int = 5) -> list:
    events: list = [RunStarted(exp_id=exp_id, description=f"idea {exp_id}", commit="c", seed=1, budget="5 s")]
    for step in range(steps):
        events.append(LogLine(exp_id=exp_id, text=f"step {step} | loss {3 - step * 0.1:.4f} | tok/s 1000"))
        events.append(StepMetric(exp_id=exp_id, step=step, loss=3 - step * 0.1, tokens_per_s=1000.0))
    events.append(RunFinished(exp_id=exp_id, outcome="ok", val_bpb=val_bpb, seconds=5.5))
    events.append(
        Decided(exp_id=exp_id, status=status, val_bpb=val_bpb, best_bpb=best, margin=0.01, reason="")
    )
    return events


def test_a_session_folds_into_rows_header_and_curves() -> None:
    state = CockpitState()
    update = state.apply_batch(
        [StateChanged(state=EngineState.BASELINE), *run_events(0, 2.5, "baseline", 2.5)]
        + [ProposalStarted(proposer="ideas"), ProposalReady(exp_id=1, description="wider", diff="d")]
        + run_events(1, 2.4, "keep", 2.4)[1:]
        + run_events(2, 2.45, "discard", 2.4)
    )
    assert [row.exp_id for row in state.ordered_rows()] == [2, 1, 0]
    assert [row.status for row in state.ordered_rows()] == ["discard", "keep", "baseline"]
    assert state.header.baseline_bpb == 2.5 and state.header.best_bpb == 2.4
    assert state.header.best_exp_id == 1
    assert state.gain is not None and abs(state.gain - 0.1) < 1e-9
    assert state.n_done == 3
    assert state.best_curve.exp_id == 1 and len(state.best_curve.steps) == 5
    assert state.run.exp_id == 2 and state.run.finished
    assert {"timeline", "header", "log", "run", "trainers"} <= update.dirty
    assert update.log.lines[0].startswith("── #0 seed 1")
    delta = state.delta_vs_best(state.rows[2])
    assert delta is not None and abs(delta - 0.05) < 1e-9
    ids, values, keep_ids, _, best_line = state.progress_points()
    assert ids == [0, 1, 2] and keep_ids == [0, 1] and best_line == [2.5, 2.4, 2.4]
    assert values == [2.5, 2.4, 2.45]


def test_a_carriage_return_line_replaces_the_previous_one() -> None:
    state = CockpitState()
    update = state.apply_batch(
        [
            LogLine(exp_id=1, text="a"),
            LogLine(exp_id=1, text="progress 1", replace=False),
            LogLine(exp_id=1, text="progress 2", replace=True),
        ]
    )
    assert update.log.lines == ["a", "progress 2"] and update.log.replace_last is None
    update = state.apply_batch([LogLine(exp_id=1, text="progress 3", replace=True)])
    assert update.log.lines == [] and update.log.replace_last == "progress 3"


def test_a_flood_keeps_only_the_tail_of_a_batch() -> None:
    state = CockpitState()
    update = state.apply_batch([LogLine(exp_id=1, text=str(i)) for i in range(5000)], max_log_lines=100)
    assert update.log.lines == [str(i) for i in range(4900, 5000)]
    assert update.dropped_lines == 4900


def test_streamed_reasoning_then_review_then_decision() -> None:
    state = CockpitState()
    state.apply_batch(
        [
            ProposalStarted(proposer="llama", model="qwen"),
            ProposalToken(text="I think "),
            ProposalToken(text="wider."),
        ]
    )
    assert state.proposal.phase == "thinking" and state.proposal.reasoning == "I think wider."
    assert state.header.model == "qwen"
    update = state.apply_batch(
        [
            ReviewRequested(
                exp_id=3, description="wider", diff="+x", base_text="N = 1\n", candidate_text="N = 2\n"
            ),
            StateChanged(state=EngineState.WAITING_REVIEW),
        ]
    )
    assert update.review is not None and state.pending_review is not None
    assert (state.pending_review.base_text, state.pending_review.candidate_text) == ("N = 1\n", "N = 2\n")
    assert state.rows[3].status == "review" and not state.rows[3].decided
    update = state.apply_batch([StateChanged(state=EngineState.RUNNING)])
    assert update.review_closed and state.pending_review is None


def test_rejections_errors_and_model_loading_become_notifications() -> None:
    state = CockpitState()
    rejected = ProposalRejected(
        exp_id=4, reason="the SEARCH text was not found\nthe closest lines are:\n    LR = 1e-3"
    )
    update = state.apply_batch(
        [
            rejected,
            RunFinished(
                exp_id=5, outcome="crash", val_bpb=None, seconds=1.0, log_tail="Traceback\nValueError: boom"
            ),
            ModelLoading(name="big", progress=0.5),
        ]
    )
    severities = [severity for _, severity in update.notifications]
    assert severities == ["warning", "warning"]
    # A reason reads by its first line, as the headless printer says it; a failed run by its log's last.
    assert update.notifications[0][0] == "Proposal rejected: the SEARCH text was not found"
    assert format_event(rejected) == "#4 rejected: the SEARCH text was not found"
    assert update.notifications[1][0] == "Run #5: crash — ValueError: boom"
    assert state.rows[4].status == "rejected" and state.rows[4].reason == rejected.reason
    assert state.header.loading_model == "big" and state.header.loading_progress == 0.5
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nOSError: disk full\n\n'
    update = state.apply_batch([EngineError(message="the runner failed", detail=traceback)])
    assert update.notifications == [("the runner failed\nOSError: disk full", "error")]
    assert state.header.loading_model is None
    state.apply_batch([ModelLoaded(name="small", seconds=1.0)])
    assert state.header.model == "small"


def test_an_override_is_marked_and_moves_the_best() -> None:
    state = CockpitState()
    state.apply_batch(run_events(0, 2.5, "baseline", 2.5) + run_events(1, 2.55, "discard", 2.5))
    update = state.apply_batch(
        [Decided(exp_id=1, status="keep", val_bpb=2.55, best_bpb=2.55, margin=0.01, reason="user", by="user")]
    )
    assert state.rows[1].decided_by == "user" and state.rows[1].status == "keep"
    assert state.header.best_exp_id == 1
    assert any("override" in text for text, _ in update.notifications)
    assert "override" in fmt.status_text("keep", "user").plain


def test_curves_stay_bounded() -> None:
    curve = Curve()
    for step in range(10 * MAX_CURVE_POINTS):
        curve.add(step, 1.0 / (step + 1))
    assert len(curve.steps) <= MAX_CURVE_POINTS
    assert curve.steps[-1] == 10 * MAX_CURVE_POINTS - 1
    assert curve.steps == sorted(curve.steps)
    assert curve.loss_at(5) is not None and curve.loss_at(-1) is None


def test_parse_curve_reads_progress_lines() -> None:
    log = "starting\nstep    42 | loss 2.3456 | lr 4.00e-03 | tok/s 18234 | 12.3s\nstep 43 | loss nan? | x\n"
    curve = parse_curve(log)
    assert curve.steps == [42] and curve.losses == [2.3456]


def test_the_bridge_is_thread_safe_and_bounded() -> None:
    bridge = EventBridge(max_pending=1000)

    def flood() -> None:
        for i in range(2000):
            bridge(LogLine(exp_id=1, text=str(i)))

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    bridge(Decided(exp_id=1, status="keep", val_bpb=1.0, best_bpb=1.0, margin=0.0, reason=""))
    for thread in threads:
        thread.join()
    bridge(Decided(exp_id=2, status="keep", val_bpb=1.0, best_bpb=1.0, margin=0.0, reason=""))
    events, dropped = bridge.drain()
    assert len(events) + dropped == 8002
    assert len(events) <= 1002
    assert sum(isinstance(e, Decided) for e in events) == 2
    assert bridge.drain() == ([], 0)


def test_formatting() -> None:
    assert fmt.bpb(None) == "—" and fmt.bpb(2.123456) == "2.1235"
    assert fmt.delta(-0.01).plain == "-0.0100" and fmt.delta(0.0).plain == "±0"
    assert fmt.seconds(5.25) == "5.2s" and fmt.seconds(125) == "2m05s"
    assert fmt.size(1_117_320_768) == "1.0 GiB" and fmt.size(512) == "512 B"
    assert fmt.tokens_per_s(18234) == "18.2k tok/s"
    assert (
        fmt.state_text(EngineState.RUNNING, pause_requested=True).plain == "running (pausing after this run)"
    )
    assert fmt.state_text(EngineState.PAUSED, pause_requested=True).plain == "paused"
    assert fmt.short_path("/a/very/long/path/to/a/workspace", 12).startswith("…")


def test_the_header_wraps_between_pieces_and_shows_a_queued_switch() -> None:
    from tui.state import QUEUED, HeaderInfo
    from tui.widgets.header import header_text

    header = HeaderInfo(
        workspace="/w",
        branch="autoresearch/x",
        model="a",
        device="cpu (2 cores)",
        budget="60 s",
        state=EngineState.RUNNING,
    )
    wide = header_text(header, 3, 0.01, width=200).plain.splitlines()
    narrow = header_text(header, 3, 0.01, width=50).plain.splitlines()
    assert len(wide) == 2 and len(narrow) > 2
    assert all(len(line) <= 50 for line in narrow)
    assert "budget 60 s" in "\n".join(narrow)  # a piece is never split across lines
    header.loading_model, header.loading_message = "b", QUEUED
    assert "a → b next" in header_text(header, 3, None, width=200).plain
    header.loading_message, header.loading_progress = "loading b.gguf", 0.5
    assert "loading b 50%" in header_text(header, 3, None, width=200).plain


def two_runs_in_flight(state: CockpitState) -> list:
    """The recorded session, then #7 on trainer 1 and #8 on trainer 2, their events interleaved."""
    from tui.demo import parallel_runs, recorded_session

    state.apply_batch(recorded_session())
    state.header.trainers = 2  # as the engine's snapshot says before any run starts
    return parallel_runs(steps=5)


def test_two_trainers_keep_their_own_log_and_curve_and_the_view_follows_the_newest() -> None:
    state = CockpitState()
    update = state.apply_batch(two_runs_in_flight(state))
    assert state.n_trainers == 2 and state.shown_slot == 1 and state.selected_slot is None
    assert state.run.exp_id == 8 and state.run.where == "node-b (gpu 1)"
    # Only the shown trainer's lines reach the view (#7 was the newest until #8 started); each run keeps
    # its own, banner first.
    assert update.log.lines[0] == "── #7 seed 1 · trainer 1: linear warmup over 50 steps ──"
    assert update.log.lines[1] == "── #8 seed 1 · trainer 2 on node-b (gpu 1): N_HEAD 8 ──"
    assert len(update.log.lines) == 2 + 5
    assert list(state.slots[1].log) == update.log.lines[1:]
    assert state.slots[0].log[0].startswith("── #7 seed 1 · trainer 1: linear warmup")
    assert len(state.slots[0].log) == 6 and state.slots[0].log[1] != state.slots[1].log[1]
    assert state.slots[0].curve.exp_id == 7 and state.slots[0].curve.steps == [0, 10, 20, 30, 40]
    assert state.slots[1].curve.losses != state.slots[0].curve.losses
    assert set(state.curves) >= {4, 7, 8}  # the best's curve and both trainers' are held
    rows = state.trainer_rows()
    assert [(r.slot, r.exp_id, r.step, r.shown, r.status) for r in rows] == [
        (0, 7, 40, False, "running"),
        (1, 8, 40, True, "running"),
    ]
    best_loss = state.best_curve.loss_at(40)
    assert (
        best_loss is not None
        and rows[0].best_loss == best_loss
        and rows[0].loss == state.slots[0].curve.losses[-1]
    )


def test_picking_a_trainer_refills_the_view_with_its_log_and_routes_its_lines_there() -> None:
    state = CockpitState()
    state.apply_batch(two_runs_in_flight(state))
    update = state.select_trainer(0)
    assert update.log.reset and update.log.lines == list(state.slots[0].log)
    assert state.run.exp_id == 7 and {"run", "trainers"} <= update.dirty
    update = state.apply_batch(
        [
            LogLine(exp_id=8, text="eight"),
            LogLine(exp_id=7, text="seven"),
            StepMetric(exp_id=8, step=50, loss=1.0, tokens_per_s=1.0),
        ]
    )
    assert update.log.lines == ["seven"] and not update.log.reset
    assert "run" not in update.dirty and "trainers" in update.dirty  # #8's step moves its row, not the plot
    assert state.slots[1].log[-1] == "eight"
    # A new run on the other trainer does not take the view away from the one picked.
    update = state.apply_batch([RunStarted(exp_id=9, description="x", commit="c", seed=1, budget="", slot=1)])
    assert update.log.lines == [] and state.run.exp_id == 7
    assert state.next_trainer().log.lines[0].startswith("── #9") and state.selected_slot == 1
    assert state.next_trainer().log.lines[0].startswith("── #9") and state.selected_slot is None
    assert state.next_trainer().log.lines[0].startswith("── #7") and state.selected_slot == 0


def test_a_finished_run_shows_its_verdict_on_its_trainer() -> None:
    state = CockpitState()
    state.apply_batch(two_runs_in_flight(state))
    state.apply_batch([RunFinished(exp_id=7, outcome="ok", val_bpb=2.55, seconds=60.0)])
    assert state.slots[0].finished and not state.slots[1].finished
    assert state.trainer_rows()[0].status == "running"  # judged, not decided yet
    state.apply_batch([Decided(exp_id=7, status="keep", val_bpb=2.55, best_bpb=2.55, margin=0.01, reason="")])
    assert state.trainer_rows()[0].status == "keep" and state.header.best_exp_id == 7


def test_one_trainer_writes_every_run_to_the_view_in_turn() -> None:
    state = CockpitState()
    update = state.apply_batch(run_events(0, 2.5, "baseline", 2.5) + run_events(1, 2.4, "keep", 2.4))
    assert state.n_trainers == 1 and list(state.slots) == [0]
    assert [line for line in update.log.lines if line.startswith("──")] == [
        "── #0 seed 1: idea 0 ──",
        "── #1 seed 1: idea 1 ──",
    ]
    assert len(update.log.lines) == 12


def engine_snapshot(**fields: Any) -> EngineSnapshot:
    """An engine's snapshot of a running session with three experiments, `fields` changed."""
    base = EngineSnapshot(
        state=EngineState.RUNNING,
        workspace=Path("/w"),
        branch="b",
        model=None,
        device="cpu",
        budget="60 s",
        n_experiments=3,
        baseline_bpb=2.5,
        best_bpb=2.4,
        best_exp_id=1,
        margin=0.01,
        review_gate=False,
    )
    return replace(base, **fields)


def test_the_snapshot_corrects_the_header() -> None:
    state = CockpitState(HeaderInfo(model="qwen", detail="#3 seed 1", pause_requested=True))
    state.apply_snapshot(engine_snapshot(model=None, containment="full", ray=""))
    header = state.header
    assert header.state == EngineState.RUNNING and header.detail == "" and header.pause_requested
    assert header.model == "qwen"  # the engine did not say: kept
    assert (header.workspace, header.branch, header.budget, header.containment) == ("/w", "b", "60 s", "full")
    assert (header.baseline_bpb, header.best_bpb, header.best_exp_id, header.margin) == (2.5, 2.4, 1, 0.01)
    assert header.ray is None and not header.review_gate
    state.apply_snapshot(engine_snapshot(state=EngineState.PAUSED, model="smol", review_gate=True))
    assert header.state == EngineState.PAUSED and not header.pause_requested
    assert header.model == "smol" and header.review_gate


def test_a_ledger_experiment_becomes_a_timeline_row() -> None:
    exp = Experiment(
        id=3,
        parent_commit="a",
        commit="b",
        description="wider",
        proposal="{}",
        diff="+N_EMBD = 192",
        proposer="llama",
        model="qwen",
        status="keep",
        val_bpb=2.41,
        peak_memory_mb=512.0,
        training_seconds=60.0,
        total_seconds=125.5,
        seeds=(1, 2),
        log_path="runs/3.log",
        started_at=1.0,
        finished_at=2.0,
        decided_by=None,
        reason="beats the best",
        log_tail="val_bpb: 2.41",
        temperature=None,
        seed=None,
    )
    row = row_from_experiment(exp)
    assert (row.exp_id, row.description, row.status, row.val_bpb) == (3, "wider", "keep", 2.41)
    assert (row.seconds, row.seeds, row.decided_by, row.decided) == (125.5, 2, "engine", True)
    assert (row.reason, row.diff, row.log_tail) == ("beats the best", "+N_EMBD = 192", "val_bpb: 2.41")
    assert (row.model, row.proposer, row.peak_memory_mb) == ("qwen", "llama", 512.0)
    running = row_from_experiment(replace(exp, status="running", total_seconds=None, decided_by="user"))
    assert running.seconds == 60.0 and running.decided_by == "user" and not running.decided


def test_the_snapshot_sets_the_trainers_and_the_header_shows_how_busy_they_are() -> None:
    from tui.widgets.header import header_text

    state = CockpitState()
    plain = header_text(state.header, 0, None, width=200).plain
    assert "trainer" not in plain and "exp/h" not in plain  # one trainer, nothing measured: as before
    snapshot = engine_snapshot(trainers=4, in_flight=(5, 6), busy_share=0.913, experiments_per_hour=11.42)
    state.apply_snapshot(snapshot)
    assert state.n_trainers == 4 and len(state.trainer_rows()) == 4
    assert [r.exp_id for r in state.trainer_rows()] == [None] * 4
    plain = header_text(state.header, 3, 0.1, width=200).plain
    assert "4 trainers busy 91%" in plain and "11.4 exp/h" in plain
    state.header.trainers = 1
    assert "trainer busy 91%" in header_text(state.header, 3, 0.1, width=200).plain


def test_fewer_trainers_drop_the_slots_gone_once_their_runs_have_ended() -> None:
    state = CockpitState()
    state.apply_batch(two_runs_in_flight(state))
    state.select_trainer(1)
    one = engine_snapshot(trainers=1, ray="local")
    state.apply_snapshot(one)  # #8 still trains on slot 1: it keeps its row until it ends
    assert state.n_trainers == 2 and state.selected_slot is None and state.header.ray == "local"
    state.apply_batch([RunFinished(exp_id=8, outcome="ok", val_bpb=2.55, seconds=60.0)])
    state.apply_snapshot(replace(one, ray=None))
    assert state.n_trainers == 1 and list(state.slots) == [0] and state.shown_slot == 0
    assert state.run.exp_id == 7 and state.header.ray is None


def test_the_progress_pane_states_the_gain_in_margins_and_each_kept_change() -> None:
    from tui.demo import recorded_session
    from tui.widgets.progress import gains_text

    state = CockpitState()
    assert gains_text(state).plain == "gain: no baseline yet"
    events = recorded_session()
    noise = next(i for i, e in enumerate(events) if isinstance(e, NoiseMeasured))
    state.apply_batch(events[: noise + 1])  # the baseline only
    assert gains_text(state).plain == "baseline 2.7000 · no change kept yet · margin 0.0100"
    state.apply_batch(events[noise + 1 :])
    lines = gains_text(state).plain.splitlines()
    assert lines[0] == "-0.1300 bpb vs baseline, 13.0 × the margin (0.0100)"
    assert lines[1].split() == [
        "#1",
        "2.6100",
        "-0.0900",
        "9.0×",
        "raise",
        "the",
        "learning",
        "rate",
        "to",
        "4e-3",
    ]
    assert lines[2].split()[:4] == ["#4", "2.5700", "-0.0400", "4.0×"]
    assert len(lines) == 3
    state.apply_batch(
        [
            NoiseMeasured(values=(2.7,), spread=0.0, margin=0.02),
            Decided(exp_id=5, status="keep", val_bpb=2.58, best_bpb=2.58, margin=0.02, reason="", by="user"),
        ]
    )
    lines = gains_text(state).plain.splitlines()
    assert lines[0] == "-0.1200 bpb vs baseline, 6.0 × the default margin (0.0200)"
    assert lines[3].split()[:4] == ["#5", "2.5800", "+0.0100", "0.5×"] and lines[3].endswith("(kept by you)")


def test_two_seeds_of_the_baseline_on_two_trainers_keep_apart() -> None:
    """The baseline's seeds train at once on two trainers: the events' slots keep them apart."""
    state = CockpitState(HeaderInfo(trainers=2))
    events: list = [
        RunStarted(exp_id=0, description="baseline", commit="c", seed=1, budget="", slot=0),
        RunStarted(exp_id=0, description="baseline", commit="c", seed=2, budget="", slot=1),
    ]
    # Seed 2 starts later and falls behind: its steps trail seed 1's.
    for step in range(0, 100, 25):
        for seed, at in ((1, step + 25), (2, step)):
            loss = 3.0 - at / 100 + seed / 10
            line = f"step {at:5d} | loss {loss:.4f} | tok/s 1000"
            events.append(LogLine(exp_id=0, text=line, slot=seed - 1))
            events.append(StepMetric(exp_id=0, step=at, loss=loss, tokens_per_s=1000.0, slot=seed - 1))
    state.apply_batch(events)
    first, second = state.slots[0].curve, state.slots[1].curve
    assert first.steps == [25, 50, 75, 100] and second.steps == [0, 25, 50, 75]
    assert [round(loss, 4) for loss in first.losses] == [round(3.1 - at / 100, 4) for at in first.steps]
    assert [round(loss, 4) for loss in second.losses] == [round(3.2 - at / 100, 4) for at in second.steps]
    assert [line.split("|")[0].split()[1] for line in list(state.slots[1].log)[1:]] == ["0", "25", "50", "75"]
    state.apply_batch([RunFinished(exp_id=0, outcome="ok", val_bpb=2.5, seconds=60.0, slot=1)])
    assert state.slots[1].finished and not state.slots[0].finished
