"""kill -9 of the engine process at each named point, then a restart: the workspace is consistent again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from engine_fakes import (
    BETTER,
    CRASHES,
    WORSE,
    alive,
    assert_consistent,
    cli,
    idea,
    make_workspace,
    write_ideas,
)

from agent.ledger import Ledger, read_results_tsv
from agent.workspace import Workspace


def _run(ws: Workspace, ideas: Path, crash_at: str | None = None) -> None:
    env = {"AUTORESEARCH_CRASH_AT": crash_at} if crash_at else {}
    proc = cli(
        "run", "--headless", "--workspace", str(ws.path), "--ideas", str(ideas), "--seeds", "2", env=env
    )
    if crash_at:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    else:
        assert proc.returncode == 0, (proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("point", "statuses"),
    [
        ("after_propose:1", ["baseline", "interrupted", "keep", "discard", "crash"]),
        ("after_commit:1", ["baseline", "interrupted", "keep", "discard", "crash"]),
        ("during_run:1", ["baseline", "interrupted", "keep", "discard", "crash"]),
        ("after_run:1", ["baseline", "keep", "discard", "crash"]),
        ("during_decide:1", ["baseline", "keep", "discard", "crash"]),
        ("after_decide:1", ["baseline", "keep", "discard", "crash"]),
        ("during_decide:2", ["baseline", "keep", "discard", "crash"]),
        ("during_run:0", ["baseline", "keep", "discard", "crash"]),
    ],
)
def test_kill_then_resume_is_consistent(tmp_path: Path, point: str, statuses: list[str]) -> None:
    ws = make_workspace(tmp_path)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER, WORSE, CRASHES])
    _run(ws, ideas, crash_at=point)
    if point == "after_decide:1":  # killed before results.tsv was rewritten: it lags the ledger
        rows = Ledger(ws.ledger_path).results_rows()
        assert len(read_results_tsv(ws.results_tsv)) == len(rows) - 1
    _run(ws, ideas)
    ledger = assert_consistent(ws)
    experiments = ledger.experiments()
    assert [e.status for e in experiments] == statuses
    kept = [e for e in experiments if e.status == "keep"]
    assert [e.description for e in kept] == ["lower the learning rate"]  # kept exactly once, never lost
    assert ws.head() == kept[0].commit
    interrupted = [e for e in experiments if e.status == "interrupted"]
    if interrupted:
        [lost] = interrupted
        assert "re-queued" in lost.reason
        rerun = next(e for e in experiments if e.requeued_from == lost.id)
        assert rerun.status == "keep" and rerun.description == lost.description
        if point.startswith("after_propose") or point.startswith("after_commit"):
            assert lost.commit is None  # its commit was never recorded; the branch was reset past it
    assert len(ledger.runs(0)) >= 2 and ledger.get_meta("noise")["margin"] == 0.002
    assert ledger.queued() == []


def test_a_run_dies_with_its_killed_engine_and_the_restart_records_it(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    flag = tmp_path / "slow.flag"
    flag.write_text("1")
    slow = idea(
        "slow while the flag exists",
        "CRASH = False",
        f"CRASH = False\nimport os, time\nif os.path.exists({str(flag)!r}):\n    time.sleep(120)\nLEARNING_RATE = 0.7",
    )
    ideas = write_ideas(tmp_path / "ideas.jsonl", [slow])
    _run(ws, ideas, crash_at="during_run:1")
    ledger = Ledger(ws.ledger_path)
    [run] = ledger.runs(1)
    assert run.pid is not None and run.outcome is None
    deadline = time.monotonic() + 10
    while alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(run.pid), "the run trains on without its engine"  # what the restart would kill
    flag.unlink()
    _run(ws, ideas)
    ledger = assert_consistent(ws)
    assert [e.status for e in ledger.experiments()] == ["baseline", "interrupted", "keep"]


def test_a_second_engine_on_the_same_workspace_is_refused(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER])
    with ws.engine_lock():
        proc = cli("run", "--headless", "--workspace", str(ws.path), "--ideas", str(ideas))
    assert proc.returncode == 2
    assert "another engine" in proc.stderr and "Traceback" not in proc.stderr
    assert ws.engine_running() is False
