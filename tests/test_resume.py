"""kill -9 of the engine process at each named point, then a restart: the workspace is consistent again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_fakes import (
    BETTER,
    CRASHES,
    ROOT,
    SLOW_TRAIN,
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


_DRIVER = """
import json, sys
from pathlib import Path
from agent.commands import Approve
from agent.config import EngineConfig
from agent.events import ReviewRequested
from agent.proposals import Edit, Proposal
from agent.researcher.ideas import IdeaQueue
from agent.session import open_engine
from agent.workspace import Workspace

ws, ideas = Workspace.open(Path(sys.argv[1])), IdeaQueue.from_file(Path(sys.argv[2]))
engine = None


def sink(event):
    if isinstance(event, ReviewRequested):  # every proposal approved as the user edited it
        edited = Proposal("edited: lr 0.7", (Edit("LEARNING_RATE = 1.0", "LEARNING_RATE = 0.7"),))
        engine.send(Approve(edited))


engine = open_engine(ws, ideas, EngineConfig(**json.loads(sys.argv[3])), sink)
engine.run()
"""


def _drive(ws: Workspace, ideas: Path, config: dict[str, object], crash_at: str) -> None:
    """An engine with `config` (what the command line cannot set: the review gate), killed at `crash_at`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AUTORESEARCH_CRASH_AT": crash_at}
    argv = [sys.executable, "-c", _DRIVER, str(ws.path), str(ideas), json.dumps(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def test_kill_after_a_review_edit_then_resume(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER])
    _drive(ws, ideas, {"seeds": 2, "review_gate": True}, "after_review_edit:1")
    edited = Ledger(ws.ledger_path).get(1)
    assert edited is not None and edited.description == "edited: lr 0.7" and edited.phase == "proposed"
    proc = cli(
        "run", "--headless", "--workspace", str(ws.path), "--ideas", str(ideas), "--max-experiments", "1"
    )
    assert proc.returncode == 0, proc.stderr
    ledger = assert_consistent(ws)
    lost, rerun = ledger.get(1), ledger.get(2)
    assert lost is not None and lost.status == "interrupted" and "re-queued" in lost.reason
    assert rerun is not None and rerun.requeued_from == 1 and rerun.status == "keep"
    assert rerun.description == "edited: lr 0.7" and "+LEARNING_RATE = 0.7" in rerun.diff  # the user's edit


@pytest.mark.parametrize("point", ["after_merge:2", "during_baseline:0", "after_baseline:0"])
def test_kill_at_the_new_transitions_then_resume(tmp_path: Path, point: str) -> None:
    """The merge of a late win onto a newer best, and the baseline's decision (now intent-first, as every
    decision): killed right there, a restart finishes what was written and loses nothing."""
    ws = make_workspace(tmp_path, train=SLOW_TRAIN)
    search = "LEARNING_RATE = 1.0\n\n# ---\n\nEXTRA = 0.0\n\n# ---\n\nSLEEP = 0.2"
    late = idea(
        "a penalty off, slowly", search, search.replace("EXTRA = 0.0", "EXTRA = -0.3").replace("0.2", "2.0")
    )
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER, late])
    _drive(ws, ideas, {"seeds": 2, "trainers": 2, "deadline_s": 60.0}, point)
    if point == "after_merge:2":
        merged = Ledger(ws.ledger_path).get(2)
        assert merged is not None and merged.base_commit is not None  # merged onto #1, not yet confirmed
    proc = cli("run", "--headless", "--workspace", str(ws.path), "--ideas", str(ideas), "--trainers", "2")
    assert proc.returncode == 0, proc.stderr
    ledger = assert_consistent(ws)
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep", "keep"]
    assert ledger.get_meta("noise")["margin"] == 0.002 and len(ledger.runs(0)) == 2
    if point == "after_merge:2":
        second = ledger.get(2)
        assert second is not None and second.val_bpb == pytest.approx(1.8)  # 2.1 - 0.3, confirmed once merged
        assert ws.repo.git.rev_parse("refs/autoresearch/merged/2") == ledger.runs(2)[0].commit_sha
