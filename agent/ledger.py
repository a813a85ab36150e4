"""The ledger of events: every experiment, run and decision in SQLite (WAL, one transaction per change).

An experiment moves through phases, each written before the engine acts on it, so a restarted engine knows
exactly where a kill -9 left it: proposed -> committed -> running -> finished -> deciding -> decided.
`results.tsv` (autoresearch's format) is always regenerated from the ledger, never appended to.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.proposals import Edit, Proposal


class Status(StrEnum):
    """An experiment's status (stored as its text; a member equals its text)."""

    BASELINE = "baseline"
    KEEP = "keep"
    DISCARD = "discard"
    CRASH = "crash"
    TIMEOUT = "timeout"
    OOM = "oom"
    NAN = "nan"
    INVALID = "invalid"
    INTERRUPTED = "interrupted"
    REJECTED = "rejected"
    VETOED = "vetoed"
    NOOP = "noop"
    """Nothing to train: the same program as its parent (same syntax tree, or the same model after a probe)."""
    PENDING = "pending"
    RUNNING = "running"


STATUSES = tuple(Status)
FAILED = (Status.CRASH, Status.TIMEOUT, Status.OOM, Status.NAN, Status.INVALID)
"""Run outcomes that are also final statuses."""
RAN = (Status.BASELINE, Status.KEEP, Status.DISCARD, *FAILED)
"""Final statuses of experiments that trained: the rows of results.tsv."""
KEPT = (Status.BASELINE, Status.KEEP)
"""Statuses of experiments that were (or are) a best: the branch's commits."""


class Phase(StrEnum):
    """Where an experiment is between proposal and decision (a member equals its stored text)."""

    PROPOSED = "proposed"
    COMMITTED = "committed"
    RUNNING = "running"
    FINISHED = "finished"
    DECIDING = "deciding"
    """The decision is written, git not yet moved to match it: `Books.recover` finishes it."""
    DECIDED = "decided"


PHASES = tuple(Phase)
TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY,
    parent_commit TEXT,
    commit_sha TEXT,
    description TEXT NOT NULL DEFAULT '',
    proposal TEXT NOT NULL DEFAULT '{}',
    diff TEXT NOT NULL DEFAULT '',
    proposer TEXT NOT NULL DEFAULT '',
    model TEXT,
    status TEXT NOT NULL,
    phase TEXT NOT NULL,
    val_bpb REAL,
    peak_memory_mb REAL,
    training_seconds REAL,
    total_seconds REAL,
    seeds TEXT NOT NULL DEFAULT '[]',
    log_path TEXT,
    started_at REAL,
    finished_at REAL,
    decided_by TEXT,
    reason TEXT NOT NULL DEFAULT '',
    log_tail TEXT NOT NULL DEFAULT '',
    temperature REAL,
    seed INTEGER,
    train_hash TEXT,
    idea_key TEXT,
    requeued_from INTEGER,
    created_at REAL NOT NULL,
    base_commit TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    exp_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    outcome TEXT,
    val_bpb REAL,
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL,
    peak_memory_mb REAL,
    training_seconds REAL,
    total_seconds REAL,
    log_path TEXT NOT NULL,
    log_tail TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '{}',
    pid INTEGER,
    started_at REAL NOT NULL,
    finished_at REAL,
    commit_sha TEXT,
    system_retries INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (exp_id, n)
);
CREATE TABLE IF NOT EXISTS queue (
    qid INTEGER PRIMARY KEY AUTOINCREMENT,
    proposal TEXT NOT NULL,
    source_exp_id INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS overrides (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exp_id INTEGER NOT NULL,
    old_status TEXT NOT NULL,
    new_status TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS promotions (
    rung TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    exp_id INTEGER,
    without_id INTEGER,
    budget TEXT NOT NULL,
    outcome TEXT,
    val_bpb REAL,
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL,
    log_path TEXT NOT NULL,
    log_tail TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    started_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (rung, code_hash, seed)
);
"""


@dataclass(frozen=True)
class Experiment:
    """One row of the ledger: a proposal, its commit, its runs' outcome and the decision."""

    id: int
    parent_commit: str | None
    commit: str | None
    description: str
    proposal: str
    """The proposal as JSON (see `proposal_to_json`)."""
    diff: str
    proposer: str
    model: str | None
    status: str
    val_bpb: float | None
    """The mean over the experiment's ok runs."""
    peak_memory_mb: float | None
    training_seconds: float | None
    total_seconds: float | None
    seeds: tuple[int, ...]
    log_path: str | None
    started_at: float | None
    finished_at: float | None
    decided_by: str | None
    """'engine', or who overrode the decision ('user')."""
    reason: str
    log_tail: str
    temperature: float | None
    seed: int | None
    """The proposer's sampling seed (training seeds are in `seeds`)."""
    phase: str = Phase.DECIDED
    train_hash: str | None = None
    idea_key: str | None = None
    requeued_from: int | None = None
    created_at: float = 0.0
    base_commit: str | None = None
    """The best commit the proposal was made against, where it differs from `parent_commit`: the best moved
    while it was out, and its change was merged onto the new best (see the engine's decisions in flight)."""


@dataclass(frozen=True)
class RunRecord:
    """One training run of an experiment (the baseline has K, a confirmed candidate 2)."""

    exp_id: int
    n: int
    seed: int
    outcome: str | None
    """None while running."""
    val_bpb: float | None
    reason: str
    seconds: float | None
    peak_memory_mb: float | None
    training_seconds: float | None
    total_seconds: float | None
    log_path: str
    log_tail: str
    summary: dict[str, Any]
    pid: int | None
    started_at: float
    finished_at: float | None
    commit_sha: str | None = None
    """The commit it trained (an experiment merged onto a newer best trains a second commit); None in ledgers
    written before runs recorded it."""
    system_retries: int = 0
    """Times the cluster restarted the run after losing its worker (Ray); the user's crash is never retried."""

    @property
    def other_load(self) -> float | None:
        """CPU cores the rest of the machine kept busy while it trained (the runner's measure; None: unknown)."""
        value = self.summary.get("other_load")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class PromotionRun:
    """One run of a configuration at a promotion rung (`agent.promotion`): never a row of results.tsv."""

    rung: str
    """The rung's name: '4x'."""
    code_hash: str
    """The train.py it trained (`file_hash`): one configuration is measured once per rung and seed."""
    seed: int
    exp_id: int | None
    """The experiment whose train.py it is (None: a leave-one-out variant)."""
    without_id: int | None
    """The keep a leave-one-out variant of the best leaves out."""
    budget: str
    """The rung's budget, in the harness's grammar."""
    outcome: str | None
    """None while running; interrupted: it runs again."""
    val_bpb: float | None
    reason: str
    seconds: float | None
    log_path: str
    log_tail: str
    pid: int | None
    started_at: float
    finished_at: float | None


@dataclass(frozen=True)
class QueuedProposal:
    """A proposal waiting to be run again: a reapplied discard or an interrupted experiment."""

    qid: int
    proposal: Proposal
    source_exp_id: int | None
    reason: str


_UNSTORED = ("train_py", "base_hash")
"""What a proposal carries to the engine but the ledger does not keep (the commit holds the text)."""


def proposal_to_json(proposal: Proposal) -> str:
    """A proposal as JSON text, for the ledger."""
    data = {k: v for k, v in asdict(proposal).items() if k not in _UNSTORED}
    return json.dumps(data, ensure_ascii=False)


def proposal_from_json(text: str) -> Proposal:
    """The inverse of `proposal_to_json`."""
    data = json.loads(text)
    edits = tuple(Edit(**edit) for edit in data.pop("edits", ()))
    data["replies"] = tuple(data.get("replies", ()))
    known = {f.name for f in fields(Proposal)}
    return Proposal(edits=edits, **{k: v for k, v in data.items() if k in known})


_EXP_COLUMNS = [f.name for f in fields(Experiment)]


def _exp_column(name: str) -> str:
    return "commit_sha" if name == "commit" else name


class Ledger:
    """The SQLite ledger of one workspace; thread-safe (the engine writes, the UI reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Ledgers written by an older version lack the newest columns; add them (NULL/default for old rows)."""
        added = {
            "experiments": (("base_commit", "TEXT"),),
            "runs": (("commit_sha", "TEXT"), ("system_retries", "INTEGER NOT NULL DEFAULT 0")),
        }
        for table, columns in added.items():
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic state change: everything inside commits together or not at all."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _writing(self, conn: sqlite3.Connection | None) -> Iterator[sqlite3.Connection]:
        """`conn`, part of a transaction under way; or a transaction of its own (None)."""
        if conn is not None:
            yield conn
            return
        with self.transaction() as own:
            yield own

    # ---- experiments ----------------------------------------------------------------------------------

    def next_id(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(id) FROM experiments").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def create(self, exp_id: int, status: str, phase: str, **values: Any) -> Experiment:
        """Insert a new experiment (its own transaction) and return it."""
        with self.transaction() as conn:
            self.insert(conn, exp_id, status, phase, **values)
        result = self.get(exp_id)
        assert result is not None
        return result

    def insert(self, conn: sqlite3.Connection, exp_id: int, status: str, phase: str, **values: Any) -> None:
        """Add a new experiment as part of `conn`'s transaction (`create` makes one of its own)."""
        values = {"id": exp_id, "status": status, "phase": phase, "created_at": time.time(), **values}
        if "seeds" in values:
            values["seeds"] = json.dumps(list(values["seeds"]))
        columns = [_exp_column(k) for k in values]
        conn.execute(
            f"INSERT INTO experiments ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            list(values.values()),
        )

    def update(self, exp_id: int, conn: sqlite3.Connection | None = None, **values: Any) -> None:
        """Change fields of an experiment: its own transaction, or part of `conn`'s."""
        if "seeds" in values:
            values["seeds"] = json.dumps(list(values["seeds"]))
        assignments = ", ".join(f"{_exp_column(k)} = ?" for k in values)
        with self._writing(conn) as writing:
            writing.execute(f"UPDATE experiments SET {assignments} WHERE id = ?", [*values.values(), exp_id])

    def get(self, exp_id: int) -> Experiment | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM experiments WHERE id = ?", (exp_id,)).fetchone()
        return _experiment(row) if row else None

    def experiments(self) -> list[Experiment]:
        """Every experiment, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM experiments ORDER BY id").fetchall()
        return [_experiment(row) for row in rows]

    def unfinished(self) -> list[Experiment]:
        """Experiments a kill left between proposal and decision."""
        return [e for e in self.experiments() if e.phase != Phase.DECIDED]

    def twin(self, digest: str) -> Experiment | None:
        """An experiment with this train.py (SHA-256) that ran, or is in flight."""
        for e in self.experiments():
            if e.train_hash == digest and (e.status in RAN or (e.phase != Phase.DECIDED and e.commit)):
                return e
        return None

    def idea_tried(self, key: str) -> bool:
        """Whether the idea `key` (an ideas-file entry) is queued, in flight, or was tried (an interrupted
        try does not count: it runs again)."""
        if any(q.proposal.key == key for q in self.queued()):
            return True
        return any(
            e.idea_key == key and (e.phase != Phase.DECIDED or e.status != Status.INTERRUPTED)
            for e in self.experiments()
        )

    # ---- runs -----------------------------------------------------------------------------------------

    def start_run(self, exp_id: int, n: int, seed: int, log_path: str, commit: str | None = None) -> None:
        """Record that run `n` of an experiment starts (phase running), before the child exists."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO runs (exp_id, n, seed, log_path, started_at, commit_sha) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (exp_id, n, seed, log_path, time.time(), commit),
            )
            exp = conn.execute("SELECT seeds, started_at FROM experiments WHERE id = ?", (exp_id,)).fetchone()
            seeds = json.loads(exp["seeds"])
            if seed not in seeds:
                seeds.append(seed)
            conn.execute(
                "UPDATE experiments SET phase = 'running', status = 'running', seeds = ?, started_at = ?, "
                "log_path = COALESCE(log_path, ?) WHERE id = ?",
                (json.dumps(seeds), exp["started_at"] or time.time(), log_path, exp_id),
            )

    def set_run_pid(self, exp_id: int, n: int, pid: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET pid = ? WHERE exp_id = ? AND n = ?", (pid, exp_id, n))

    def finish_run(self, exp_id: int, n: int, **values: Any) -> None:
        """Record how run `n` ended; the experiment moves to phase finished (if it was running)."""
        if "summary" in values:
            values["summary"] = json.dumps(values["summary"])
        values.setdefault("finished_at", time.time())
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as conn:
            conn.execute(
                f"UPDATE runs SET {assignments} WHERE exp_id = ? AND n = ?", [*values.values(), exp_id, n]
            )
            conn.execute(
                "UPDATE experiments SET phase = 'finished' WHERE id = ? AND phase = 'running'", (exp_id,)
            )

    def count(self) -> int:
        """How many experiments the ledger holds."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0])

    def runs(self, exp_id: int) -> list[RunRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM runs WHERE exp_id = ? ORDER BY n", (exp_id,)).fetchall()
        return [
            RunRecord(**{**dict(row), "summary": json.loads(row["summary"] or "{}")})  # type: ignore[arg-type]
            for row in rows
        ]

    def all_runs(self) -> list[RunRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM runs ORDER BY exp_id, n").fetchall()
        return [RunRecord(**{**dict(row), "summary": json.loads(row["summary"] or "{}")}) for row in rows]

    # ---- the re-run queue -----------------------------------------------------------------------------

    def enqueue(
        self,
        proposal: Proposal,
        source_exp_id: int | None,
        reason: str,
        conn: sqlite3.Connection | None = None,
    ) -> None:
        sql = "INSERT INTO queue (proposal, source_exp_id, reason, created_at) VALUES (?, ?, ?, ?)"
        with self._writing(conn) as writing:
            writing.execute(sql, (proposal_to_json(proposal), source_exp_id, reason, time.time()))

    def queue_reapply(self, exp_id: int) -> str:
        """Queue experiment `exp_id`'s change to run again on top of the best (ValueError if it has none)."""
        exp = self.get(exp_id)
        if exp is None or exp_id == 0:
            raise ValueError(f"there is no experiment #{exp_id} to reapply")
        if exp.phase != Phase.DECIDED:
            raise ValueError(f"#{exp_id} is still in flight")
        original = proposal_from_json(exp.proposal)
        if not original.edits:
            raise ValueError(f"#{exp_id} ({exp.status}) has no change to reapply")
        description = f"reapply #{exp_id}: {exp.description}"
        self.enqueue(
            replace(original, description=description, proposer="reapply", key=None), exp_id, "reapply"
        )
        return f"#{exp_id} queued again: {exp.description}"

    def queued(self) -> list[QueuedProposal]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM queue ORDER BY qid").fetchall()
        return [
            QueuedProposal(
                row["qid"], proposal_from_json(row["proposal"]), row["source_exp_id"], row["reason"]
            )
            for row in rows
        ]

    def dequeue(self, qid: int, conn: sqlite3.Connection | None = None) -> None:
        with self._writing(conn) as writing:
            writing.execute("DELETE FROM queue WHERE qid = ?", (qid,))

    # ---- overrides and metadata -----------------------------------------------------------------------

    def record_override(
        self, conn: sqlite3.Connection, exp_id: int, old_status: str, new_status: str, by: str
    ) -> None:
        conn.execute(
            "INSERT INTO overrides (exp_id, old_status, new_status, decided_by, at) VALUES (?, ?, ?, ?, ?)",
            (exp_id, old_status, new_status, by, time.time()),
        )

    def overrides(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._conn.execute("SELECT * FROM overrides ORDER BY id")]

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any, conn: sqlite3.Connection | None = None) -> None:
        with self._writing(conn) as writing:
            writing.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    # ---- promotion runs -------------------------------------------------------------------------------

    def start_promotion(self, run: PromotionRun) -> None:
        """A promotion run starts (a run of the same rung, code and seed that was interrupted is replaced)."""
        values = asdict(run)
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO promotions ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )

    def set_promotion(self, rung: str, code_hash: str, seed: int, **values: Any) -> None:
        """Record what is known of a promotion run: its pid, or how it ended."""
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as conn:
            conn.execute(
                f"UPDATE promotions SET {assignments} WHERE rung = ? AND code_hash = ? AND seed = ?",
                [*values.values(), rung, code_hash, seed],
            )

    def promotions(self) -> list[PromotionRun]:
        """Every promotion run, in the order they started."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM promotions ORDER BY started_at").fetchall()
        return [PromotionRun(**dict(row)) for row in rows]

    # ---- results.tsv ----------------------------------------------------------------------------------

    def results_rows(self) -> list[tuple[str, str, str, str, str]]:
        """The rows of results.tsv: every decided experiment that trained, in order."""
        return [results_row(e) for e in self.experiments() if e.phase == Phase.DECIDED and e.status in RAN]

    def write_results_tsv(self, path: Path) -> None:
        """Regenerate `path` from the ledger (atomically)."""
        write_results_tsv(path, self.results_rows())


def _experiment(row: sqlite3.Row) -> Experiment:
    data = dict(row)
    data["commit"] = data.pop("commit_sha")
    data["seeds"] = tuple(json.loads(data["seeds"] or "[]"))
    return Experiment(**{name: data[name] for name in _EXP_COLUMNS})


def tsv_status(status: str) -> str:
    """autoresearch's three statuses: the baseline is its first `keep`, every failed run a `crash`."""
    if status in ("baseline", "keep"):
        return "keep"
    return "discard" if status == "discard" else "crash"


def results_row(exp: Experiment) -> tuple[str, str, str, str, str]:
    """One results.tsv row: short commit, val_bpb (0 for a crash), memory in GB, status, description."""
    description = " ".join((exp.description or "").split())
    if exp.status in FAILED and exp.status != "crash":
        description = f"[{exp.status}] {description}"
    crashed = tsv_status(exp.status) == "crash"
    bpb = 0.0 if crashed or exp.val_bpb is None else exp.val_bpb
    memory = 0.0 if crashed or exp.peak_memory_mb is None else exp.peak_memory_mb / 1024
    return ((exp.commit or "")[:7], f"{bpb:.6f}", f"{memory:.1f}", tsv_status(exp.status), description)


def write_results_tsv(path: Path, rows: Sequence[tuple[str, str, str, str, str]]) -> None:
    text = TSV_HEADER + "\n" + "".join("\t".join(row) + "\n" for row in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_results_tsv(path: Path) -> list[tuple[str, ...]]:
    """The rows of a results.tsv (header excluded)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != TSV_HEADER:
        raise ValueError(f"{path} does not start with the results.tsv header")
    return [tuple(line.split("\t")) for line in lines[1:] if line]
