"""The SQLite ledger: experiments, runs, the re-run queue, metadata, and results.tsv in autoresearch's format."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from agent.ledger import (
    TSV_HEADER,
    Ledger,
    proposal_from_json,
    proposal_to_json,
    read_results_tsv,
    results_row,
)
from agent.proposals import Edit, Proposal


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "state" / "ledger.sqlite")


def _decided(ledger: Ledger, exp_id: int, status: str, **values: object) -> None:
    ledger.create(exp_id, status, "decided", **values)


def test_wal_mode(ledger: Ledger) -> None:
    conn = sqlite3.connect(ledger.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_create_get_update(ledger: Ledger) -> None:
    assert ledger.next_id() == 0
    exp = ledger.create(0, "pending", "committed", commit="abc", description="baseline", seeds=[1, 2])
    assert (exp.id, exp.status, exp.phase, exp.commit, exp.seeds) == (
        0,
        "pending",
        "committed",
        "abc",
        (1, 2),
    )
    ledger.update(0, status="baseline", phase="decided", val_bpb=2.5)
    got = ledger.get(0)
    assert got is not None and got.status == "baseline" and got.val_bpb == 2.5
    assert ledger.next_id() == 1
    assert ledger.get(7) is None
    assert ledger.count() == 1


def test_unfinished(ledger: Ledger) -> None:
    _decided(ledger, 0, "baseline")
    ledger.create(1, "running", "running")
    assert [e.id for e in ledger.unfinished()] == [1]


def test_runs_move_the_experiment_through_its_phases(ledger: Ledger) -> None:
    ledger.create(1, "pending", "committed", commit="c1")
    ledger.start_run(1, 0, seed=1, log_path="runs/1/run.log")
    exp = ledger.get(1)
    assert exp is not None and exp.phase == "running" and exp.status == "running" and exp.seeds == (1,)
    assert exp.log_path == "runs/1/run.log" and exp.started_at is not None
    ledger.set_run_pid(1, 0, 4242)
    ledger.finish_run(1, 0, outcome="ok", val_bpb=2.4, summary={"val_bpb": 2.4})
    exp = ledger.get(1)
    assert exp is not None and exp.phase == "finished"
    [run] = ledger.runs(1)
    assert (run.outcome, run.val_bpb, run.pid, run.summary) == ("ok", 2.4, 4242, {"val_bpb": 2.4})
    ledger.start_run(1, 1, seed=2, log_path="runs/1/run-1.log")
    exp = ledger.get(1)
    assert exp is not None and exp.seeds == (1, 2) and exp.log_path == "runs/1/run.log"


def test_a_failed_transaction_changes_nothing(ledger: Ledger) -> None:
    _decided(ledger, 0, "baseline")
    with pytest.raises(RuntimeError), ledger.transaction() as conn:
        ledger.update(0, conn, status="keep")
        ledger.set_meta("best_exp_id", 0, conn)
        raise RuntimeError("killed half-way")
    got = ledger.get(0)
    assert got is not None and got.status == "baseline"
    assert ledger.get_meta("best_exp_id") is None


def test_queue_round_trip(ledger: Ledger) -> None:
    proposal = Proposal("try it", (Edit("a", "b"),), proposer="ideas", key="idea:1")
    ledger.enqueue(proposal, 3, "reapply")
    [queued] = ledger.queued()
    assert queued.proposal == proposal and queued.source_exp_id == 3 and queued.reason == "reapply"
    ledger.dequeue(queued.qid)
    assert ledger.queued() == []


def test_proposal_json_round_trip() -> None:
    proposal = Proposal(
        "desc",
        (Edit("x = 1", "x = 2"), Edit("a", "b", path="prepare.py")),
        reasoning="why",
        proposer="llama",
        model="qwen",
        temperature=0.7,
        seed=3,
        replies=("r1", "r2"),
        key="k",
    )
    assert proposal_from_json(proposal_to_json(proposal)) == proposal


def test_meta(ledger: Ledger) -> None:
    assert ledger.get_meta("noise", "none") == "none"
    ledger.set_meta("noise", {"margin": 0.01, "values": [1.0, 2.0]})
    assert ledger.get_meta("noise") == {"margin": 0.01, "values": [1.0, 2.0]}


def test_concurrent_readers_and_a_writer(ledger: Ledger) -> None:
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(50):
                _decided(ledger, i, "discard", description=f"idea {i}")
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            other = Ledger(ledger.path)
            for _ in range(50):
                other.experiments()
            other.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(ledger.experiments()) == 50


def test_results_rows_follow_autoresearch(ledger: Ledger) -> None:
    _decided(
        ledger, 0, "baseline", commit="a" * 40, val_bpb=2.5, peak_memory_mb=2048.0, description="baseline"
    )
    _decided(
        ledger, 1, "keep", commit="b" * 40, val_bpb=2.4, peak_memory_mb=1024.0, description="better\tidea"
    )
    _decided(ledger, 2, "discard", commit="c" * 40, val_bpb=2.6, peak_memory_mb=1024.0, description="worse")
    _decided(ledger, 3, "crash", commit="d" * 40, description="crashes")
    _decided(ledger, 4, "timeout", commit="e" * 40, val_bpb=None, description="hangs")
    _decided(ledger, 5, "rejected", description="did not apply")
    _decided(ledger, 6, "interrupted", commit="f" * 40, description="stopped")
    ledger.create(7, "running", "running", commit="9" * 40, description="in flight")
    assert ledger.results_rows() == [
        ("aaaaaaa", "2.500000", "2.0", "keep", "baseline"),
        ("bbbbbbb", "2.400000", "1.0", "keep", "better idea"),
        ("ccccccc", "2.600000", "1.0", "discard", "worse"),
        ("ddddddd", "0.000000", "0.0", "crash", "crashes"),
        ("eeeeeee", "0.000000", "0.0", "crash", "[timeout] hangs"),
    ]


def test_results_tsv_file(ledger: Ledger, tmp_path: Path) -> None:
    _decided(ledger, 0, "baseline", commit="a" * 40, val_bpb=2.5, description="baseline")
    path = tmp_path / "results.tsv"
    ledger.write_results_tsv(path)
    text = path.read_text()
    assert text.splitlines()[0] == TSV_HEADER == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert read_results_tsv(path) == [("aaaaaaa", "2.500000", "0.0", "keep", "baseline")]
    assert not (tmp_path / "results.tsv.tmp").exists()


def test_results_row_of_a_confirmed_keep(ledger: Ledger) -> None:
    exp = ledger.create(
        1, "keep", "decided", commit="1234567890", val_bpb=2.41234567, description="two seeds"
    )
    assert results_row(exp) == ("1234567", "2.412346", "0.0", "keep", "two seeds")


def test_a_ledger_from_before_the_scheduler_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    old = Ledger(path)
    old.create(1, "keep", "decided", commit="a" * 40, description="kept long ago")
    old.start_run(1, 0, 1, "run.log")
    old.finish_run(1, 0, outcome="ok", val_bpb=2.5)
    old.close()
    with sqlite3.connect(path) as conn:  # what a ledger written by the previous version holds
        conn.execute("ALTER TABLE experiments DROP COLUMN base_commit")
        conn.execute("ALTER TABLE runs DROP COLUMN commit_sha")
        conn.execute("ALTER TABLE runs DROP COLUMN system_retries")
    ledger = Ledger(path)
    exp = ledger.get(1)
    assert exp is not None and exp.base_commit is None and exp.description == "kept long ago"
    [run] = ledger.runs(1)
    assert (run.commit_sha, run.system_retries, run.val_bpb) == (None, 0, 2.5)
    ledger.start_run(1, 1, 2, "run-1.log", commit="b" * 40)
    assert ledger.runs(1)[1].commit_sha == "b" * 40
