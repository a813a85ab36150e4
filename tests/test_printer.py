"""The headless event printer: one readable line per event, or JSON lines."""

from __future__ import annotations

import io
import json

from agent import events as ev
from agent.printer import format_event, make_printer


def test_run_lifecycle_lines() -> None:
    started = format_event(
        ev.RunStarted(exp_id=3, description="halve lr", commit="abcdef123", seed=1, budget="5 s")
    )
    assert started == "#3 run  seed 1, budget 5 s, commit abcdef1: halve lr"
    assert format_event(ev.LogLine(exp_id=3, text="hello")) == "#3 |    hello"
    finished = format_event(ev.RunFinished(exp_id=3, outcome="ok", val_bpb=2.5, seconds=12.34))
    assert finished == "#3 done ok, val_bpb 2.500000, 12.3 s"
    crashed = format_event(
        ev.RunFinished(
            exp_id=3, outcome="crash", val_bpb=None, seconds=1.0, log_tail="Traceback\nValueError: x"
        )
    )
    assert crashed is not None and crashed.endswith("— ValueError: x") and "val_bpb -" in crashed


def test_decision_line() -> None:
    line = format_event(
        ev.Decided(
            exp_id=4, status="keep", val_bpb=2.4, best_bpb=2.4, margin=0.01, reason="a clear win\nmore"
        )
    )
    assert line == "#4 KEEP: val_bpb 2.400000, best 2.400000 — a clear win"
    override = format_event(
        ev.Decided(exp_id=4, status="discard", val_bpb=2.4, best_bpb=2.5, margin=0.01, reason="r", by="user")
    )
    assert override is not None and override.startswith("#4 DISCARD (by user)")


def test_noise_and_errors() -> None:
    noise = format_event(ev.NoiseMeasured(values=(2.5, 2.52), spread=0.02, margin=0.028))
    assert noise == "noise floor: baseline 2.500000, 2.520000 (spread 0.020000); margin 0.028000 bpb"
    assert format_event(ev.EngineError(message="boom", fatal=True)) == "FATAL: boom"
    assert format_event(ev.EngineError(message="meh")) == "error: meh"
    assert format_event(ev.Info(message="hi")) == "hi"


def test_quiet_by_default_verbose_on_request() -> None:
    for event in (
        ev.StepMetric(exp_id=1, step=1, loss=2.0, tokens_per_s=3.0),
        ev.ProposalToken(text="tok"),
        ev.StateChanged(state="running"),
        ev.LogLine(exp_id=1, text="step 2", replace=True),
    ):
        assert format_event(event) is None
    assert format_event(ev.StateChanged(state="paused", detail="x"), verbose=True) == "== paused (x)"
    assert format_event(ev.LogLine(exp_id=1, text="step 2", replace=True), verbose=True) == "#1 |    step 2"


def test_proposal_lines() -> None:
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-LR = 1\n+LR = 2\n"
    ready = format_event(ev.ProposalReady(exp_id=2, description="lr 2", diff=diff, proposer="ideas"))
    assert ready == "#2 idea lr 2 [ideas, 2 changed lines]"
    rejected = format_event(ev.ProposalRejected(exp_id=2, reason="SEARCH not found\nclosest: ..."))
    assert rejected == "#2 rejected: SEARCH not found"
    assert (
        format_event(
            ev.Decided(exp_id=2, status="rejected", val_bpb=None, best_bpb=None, margin=0, reason="")
        )
        is None
    )


def test_printer_prefixes_time_and_writes_json() -> None:
    out = io.StringIO()
    make_printer(out)(ev.Info(message="hello", ts=0.0))
    line = out.getvalue()
    assert line.endswith(" hello\n") and line[2] == ":"
    make_printer(out)(ev.Transferred(message="promotion 4x: #1\n#1 transfers at 4x", ts=0.0))
    assert out.getvalue().endswith(
        " promotion 4x: #1\n         #1 transfers at 4x\n"
    )  # indented under its time
    make_printer(out)(
        ev.RunStarted(exp_id=1, description="#1 at 4x", commit="", seed=1, budget="240 s", promotion="4x")
    )
    assert out.getvalue().endswith(" #1 promotion 4x, seed 1, budget 240 s: #1 at 4x\n")
    out = io.StringIO()
    sink = make_printer(out, as_json=True)
    sink(ev.Decided(exp_id=1, status="keep", val_bpb=2.4, best_bpb=2.4, margin=0.01, reason="r"))
    sink(ev.StepMetric(exp_id=1, step=5, loss=2.0, tokens_per_s=10.0))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["kind"] for r in records] == ["Decided", "StepMetric"]
    assert records[0]["status"] == "keep" and records[1]["step"] == 5
