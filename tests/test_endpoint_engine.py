"""A local server that is down, slow or failing is not fatal: the engine backs off, says so, pauses after a
while, and goes on when the server answers again (real engine, real git, the fake harness, a scripted server).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from endpoint_fakes import GOOD_REPLY, ScriptedServer
from engine_fakes import (
    FAKE_TRAIN,
    PROBING_PREPARE,
    Recorder,
    assert_consistent,
    make_workspace,
    outside_tmp,
)

from agent import thinking
from agent.commands import Resume, Shutdown, Skip, UseModel
from agent.config import EngineConfig
from agent.engine import Engine
from agent.events import (
    Decided,
    EngineError,
    Info,
    ProposalStarted,
    ProposalToken,
    ProposerWaiting,
    StateChanged,
)
from agent.ledger import proposal_from_json
from agent.printer import format_event
from agent.researcher.proposer import make_proposer
from agent.session import open_engine
from agent.workspace import Workspace
from tui.state import CockpitState

FAST = {"seeds": 2, "deadline_s": 60.0}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path)


def _engine(ws: Workspace, url: str, **config: object) -> tuple[Engine, Recorder]:
    recorder = Recorder()
    proposer = make_proposer(f"{url}#tiny-model", seed=1)
    engine = open_engine(ws, proposer, EngineConfig(**{**FAST, **config}), recorder)  # type: ignore[arg-type]
    return engine, recorder


def _run(engine: Engine) -> threading.Thread:
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    return thread


def test_a_failing_server_is_waited_for_longer_each_time_then_used(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thinking, "RETRY_S", (0.05, 0.15))
    with ScriptedServer(script=["503", "500", "die", "garbage"]) as server:
        engine, events = _engine(ws, server.url, max_experiments=1)
        engine.run()
    assert engine.error is None
    waits = events.of(ProposerWaiting)
    assert [w.retry_in_s for w in waits] == [0.05, 0.1, 0.15, 0.15]  # doubling, capped
    assert [w.failures for w in waits] == [1, 2, 3, 4]
    assert "HTTP 503" in waits[0].reason and "broke off" in waits[2].reason
    assert waits[-1].failing_for_s >= 0.25
    assert not events.of(EngineError)
    assert [(d.exp_id, d.status) for d in events.of(Decided)] == [(0, "baseline"), (1, "keep")]
    ledger = assert_consistent(ws)  # the failures left no trace in the ledger or in git
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep"]
    line = format_event(waits[1])
    assert line is not None and line.startswith("proposer failed (") and "asking again in 0 s" in line


def test_a_server_down_for_minutes_pauses_the_engine_which_resumes_when_it_is_back(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thinking, "RETRY_S", (0.05, 0.1))
    monkeypatch.setattr(thinking, "PAUSE_AFTER_S", 0.4)
    server = ScriptedServer()
    port = server.port
    server.close()  # nothing listens on the port any more
    engine, events = _engine(ws, f"http://127.0.0.1:{port}/v1", max_experiments=1)
    thread = _run(engine)
    try:
        events.wait_for(lambda e: isinstance(e, StateChanged) and e.state == "paused", timeout=30)
        [paused] = [e for e in events.of(EngineError) if e.message.startswith("paused:")]
        assert "nothing is listening" in paused.message and not paused.fatal
        assert "resume once it answers again" in paused.message
        assert ws.engine_running()  # the lock is held the whole time
        assert len(events.of(ProposerWaiting)) >= 3
        # The server comes back on the same port; resuming goes on from there.
        with ScriptedServer(port=port) as back:
            engine.send(Resume())
            events.wait_for(lambda e: isinstance(e, Decided) and e.exp_id == 1, timeout=30)
            thread.join(30)
            assert back.dialects() == ["openai"]
    finally:
        engine.send(Shutdown())
        thread.join(30)
    assert not thread.is_alive() and engine.error is None
    assert_consistent(ws)
    assert not ws.engine_running()


def test_shutdown_during_the_wait_ends_it_at_once(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (headless) and quit (cockpit) send Shutdown: a 60 s back-off must not hold them."""
    monkeypatch.setattr(thinking, "RETRY_S", (60.0, 60.0))
    with ScriptedServer(script=["503"]) as server:
        engine, events = _engine(ws, server.url)
        thread = _run(engine)
        events.wait_for(lambda e: isinstance(e, ProposerWaiting), timeout=30)
        asked = time.monotonic()
        engine.send(Shutdown())
        thread.join(10)
        assert time.monotonic() - asked < 2
    assert not thread.is_alive() and engine.error is None
    assert len(events.of(ProposalStarted)) == 1
    assert_consistent(ws)


def test_a_model_switch_ends_the_wait(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the server is down the user switches model: the switch is not held up by the back-off."""
    monkeypatch.setattr(thinking, "RETRY_S", (60.0, 60.0))
    with ScriptedServer(script=["503"]) as down, ScriptedServer(models=("other",)) as other:
        engine, events = _engine(ws, down.url, max_experiments=1)
        thread = _run(engine)
        events.wait_for(lambda e: isinstance(e, ProposerWaiting), timeout=30)
        asked = time.monotonic()
        engine.send(UseModel(f"{other.url}#other"))
        events.wait_for(lambda e: isinstance(e, Decided) and e.exp_id == 1, timeout=30)
        assert time.monotonic() - asked < 10
        thread.join(30)
        assert [body["model"] for _, body in other.requests] == ["other"]
    assert engine.error is None
    assert_consistent(ws)


def test_the_cockpit_shows_the_wait() -> None:
    state = CockpitState()
    update = state.apply_batch(
        [
            ProposerWaiting(
                reason="http://127.0.0.1:1/v1 failed: HTTP 503: loading", retry_in_s=8.0, failures=3
            )
        ]
    )
    assert state.header.detail == "asking again in 8 s" and "header" in update.dirty
    [(text, severity)] = update.notifications
    assert severity == "warning" and "HTTP 503: loading" in text and "asking again in 8 s" in text
    state.apply_batch([StateChanged(state="proposing")])
    assert state.header.detail == ""


def test_skip_while_the_server_streams_asks_again_instead_of_ending(ws: Workspace) -> None:
    """A cancelled reply makes the proposer return None: that is a skip, not "no more proposals"."""
    with ScriptedServer(script=["trickle"]) as server:
        engine, events = _engine(ws, server.url, max_experiments=1)
        skipped: list[bool] = []

        def skip_once(event: object) -> None:
            if isinstance(event, ProposalToken) and not skipped:
                skipped.append(True)
                engine.send(Skip())

        events.hooks.append(skip_once)
        engine.run()
    assert skipped and engine.error is None
    assert len(events.of(ProposalStarted)) == 2
    assert not [e for e in events.of(Info) if "nothing more to try" in e.message]
    assert [(d.exp_id, d.status) for d in events.of(Decided)] == [(0, "baseline"), (1, "keep")]
    assert_consistent(ws)


CRASHING_REPLY = json.dumps(
    {
        "reasoning": "Crash on purpose.",
        "description": "the crashing switch",
        "edits": [{"search": "CRASH = False", "replace": "CRASH = True"}],
    }
)


def test_a_reply_that_crashes_in_its_trial_is_retried_with_the_traceback_not_trained(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, prepare=PROBING_PREPARE)
    with ScriptedServer(replies=[CRASHING_REPLY, GOOD_REPLY]) as server:
        engine, events = _engine(ws, server.url, max_experiments=1, probe=True)
        engine.run()
    assert engine.error is None
    assert [(d.exp_id, d.status) for d in events.of(Decided)] == [(0, "baseline"), (1, "keep")]
    ledger = assert_consistent(ws)  # the crash is no experiment: one row, the proposal that ran
    assert [(e.status, e.description) for e in ledger.experiments()] == [
        ("baseline", "baseline"),
        ("keep", "learning rate 0.6"),
    ]
    # The model was asked again, told what crashed and how; both replies are kept on the proposal.
    assert len(server.requests) == 2
    retry = json.dumps(server.requests[1][1])
    assert "the crashing switch" in retry and "RuntimeError: boom: this idea crashes" in retry
    assert "RuntimeError: boom" not in json.dumps(server.requests[0][1])
    said = [e.message for e in events.of(Info) if "reply 1 of 3 rejected" in e.message]
    assert said and "crashed when train.py ran its first steps" in said[0]
    kept = ledger.get(1)
    assert kept is not None and len(proposal_from_json(kept.proposal).replies) == 2
    trials = sorted((ws.runs_dir / "trials").glob("*.log"))
    names = [t.name for t in trials]
    assert "parent.log" in names  # the crash counted because the parent trains its probe steps
    candidates = [t for t in trials if t.name != "parent.log"]
    assert len(candidates) == 2 and any("boom" in t.read_text() for t in candidates)


def test_without_probes_a_crashing_reply_is_trained_and_recorded_as_a_crash(tmp_path: Path) -> None:
    """The control: the trial is the probe, and only a trainer that probes tries candidates."""
    ws = make_workspace(tmp_path, prepare=PROBING_PREPARE)
    with ScriptedServer(replies=[CRASHING_REPLY, GOOD_REPLY]) as server:
        engine, events = _engine(ws, server.url, max_experiments=1, probe=False)
        engine.run()
    assert [(d.exp_id, d.status) for d in events.of(Decided)] == [(0, "baseline"), (1, "crash")]
    assert len(server.requests) == 1 and not (ws.runs_dir / "trials").exists()


def reply_setting(line: str, description: str) -> str:
    return json.dumps(
        {"reasoning": "r", "description": description, "edits": [{"search": "EXTRA = 0.0", "replace": line}]}
    )


def test_a_proposal_that_repeats_an_experiment_written_differently_goes_back_with_the_row(
    tmp_path: Path,
) -> None:
    """The ledger's memory: the second reply is experiment #1's program again (0.5 written 5e-1), so it is
    never trained; the model hears which row it repeats, and the session's findings come from the ledger."""
    ws = make_workspace(tmp_path)
    first = reply_setting("EXTRA = 0.5", "add half a bit")
    again = reply_setting("EXTRA = 5e-1  # the same half", "add one half")
    with ScriptedServer(replies=[first, again, GOOD_REPLY]) as server:
        engine, events = _engine(ws, server.url, max_experiments=2)
        engine.run()
    assert engine.error is None
    assert [(d.exp_id, d.status) for d in events.of(Decided)] == [
        (0, "baseline"),
        (1, "discard"),
        (2, "keep"),
    ]
    assert len(server.requests) == 3
    retry = json.dumps(server.requests[2][1])
    assert 'experiment #1 \\"add half a bit\\" (discard, 3.0' in retry
    context = engine.books.proposal_context("", "60 s", None)
    assert context.history[1].constants == (("EXTRA", "0.0", "0.5"),)
    assert context.history[1].change == pytest.approx(0.5, abs=1e-3)
    assert not context.history[2].code_changed and context.history[2].change is not None


def test_a_kept_train_py_that_crashes_only_in_probes_does_not_make_its_children_crash() -> None:
    """A hostile parent that sees it is probed and crashes would make every child's trial (and probe) crash: the
    model could never propose, every child would be a crash without a run. A crash counts only where the parent
    trains its own probe steps; here the child is handed in at once and trained in full. The workspace is
    outside /tmp, where users keep theirs."""
    hostile = FAKE_TRAIN.replace("if CRASH:", 'if CRASH or os.environ.get("AUTORESEARCH_PROBE_STEPS"):')
    with outside_tmp("probe-parent") as folder:
        ws = make_workspace(folder, train=hostile, prepare=PROBING_PREPARE)
        with ScriptedServer(replies=[GOOD_REPLY]) as server:
            engine, events = _engine(ws, server.url, max_experiments=1, probe=True)
            engine.run()
        assert engine.error is None
        assert len(server.requests) == 1  # the first reply was taken
        assert [(d.exp_id, d.status) for d in events.of(Decided)] == [(0, "baseline"), (1, "keep")]
        assert_consistent(ws).close()
