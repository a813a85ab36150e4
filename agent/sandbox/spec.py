"""What crosses into the sandbox and back: a run's request, its full recipe (`RunSpec`), its result and outcome.

The engine asks for a run with a `RunRequest` (which experiment, seed, train.py text and budget); the machine
that trains it (`agent.sandbox.sandbox.Sandbox`, here or on a Ray node) turns it into a `RunSpec` with its own
folders, limits and deadline, and answers with a `RunResult`.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.budget import Budget

EXPORT_FILE = "model.pt2"
"""What the run hands over: its model as a `torch.export` program (nanogpt/prepare.py writes it)."""
CLAIMS_FILE = "claims.json"
"""What the run says it spent; checked by the judge, never the score."""
HARNESS_FILE = "prepare.py"
"""What train.py imports of the frozen harness (data, batches, budget, hand-over)."""
CORPUS_FILE = "corpus.py"
"""The corpus, its split and tokenizer, and the token cache built from them (prepare.py imports it)."""
METRIC_FILE = "metric.py"
"""What only the judge imports of the frozen harness: the score and its checks (it imports prepare.py)."""
RUN_FILES = (HARNESS_FILE, CORPUS_FILE)
"""The part of the frozen harness a run's folder gets: what train.py imports, never the metric."""
HARNESS_FILES = (HARNESS_FILE, CORPUS_FILE, METRIC_FILE)
"""The frozen harness, by reader. Each file's SHA-256 is recorded when the workspace is made, and checked before
a judge imports it (`handover.frozen_harness`)."""
MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_CLAIMS_BYTES = 256 * 1024
STOP_SIGNAL = signal.SIGUSR1
"""Tells a run that its budget is spent (nanogpt/prepare.py's Budget stops training on it)."""


class PrepareError(Exception):
    """The harness could not prepare the data for runs (nothing can train); the message says why."""


class Outcome(StrEnum):
    """How a run ended (a member equals its text, and the ledger's status of the same name)."""

    OK = "ok"
    CRASH = "crash"
    TIMEOUT = "timeout"
    OOM = "oom"
    NAN = "nan"
    INVALID = "invalid"
    """It ran, but its result cannot be trusted: the judge refused it, it overran its budget, filled its folder,
    or changed the files it must not."""
    INTERRUPTED = "interrupted"
    NOOP = "noop"
    """A probe showed the same computation as the parent's: nothing to train."""


@dataclass(frozen=True)
class ProbeParent:
    """The parent a candidate's first run is probed against: its experiment id and its train.py."""

    exp_id: int
    train_source: str


HANDOVER_FACTOR = 2.0
HANDOVER_MIN_S = 2.0


def handover_window(cap: float, observed_s: float | None) -> float:
    """Seconds a run may take from its stop signal to its exit: what the baseline's hand-over took (its last step,
    the export, the exit) twice over, at least HANDOVER_MIN_S, at most `cap` (all of `cap` before a baseline is
    measured). A run that trained on in the window gained what it took; the baseline's, not the parent's, so that
    a lineage that did cannot widen it generation by generation."""
    if observed_s is None:
        return cap
    return min(cap, max(HANDOVER_MIN_S, HANDOVER_FACTOR * observed_s))


JUDGE_FACTOR = 10.0
JUDGE_MIN_S = 30.0
JUDGE_MAX_S = 300.0


def judge_deadline(parent_judge_s: float | None) -> float:
    """Seconds the judge may spend on a run's model: ten times what the parent's took, at least JUDGE_MIN_S (a
    cold judge's start-up, a loaded machine), at most JUDGE_MAX_S (all of it before a parent was judged). A model
    made to be slow to score costs its own judging, bounded by its parent's, and the judge refuses one whose
    forward FLOPs could not be scored in it (metric.py's `forward_flops`) before running it."""
    if parent_judge_s is None:
        return JUDGE_MAX_S
    return min(JUDGE_MAX_S, max(JUDGE_MIN_S, JUDGE_FACTOR * parent_judge_s))


@dataclass(frozen=True)
class RunRequest:
    """What the engine asks of a trainer: train this text with this seed and budget. Where and how is the
    trainer's business."""

    exp_id: int
    n: int
    """The run's number within its experiment (0, 1, ...)."""
    seed: int
    train_source: str
    """The candidate's train.py."""
    budget: Budget
    log_path: Path
    """Where the run's log ends up on the engine's machine."""
    probe_against: ProbeParent | None = None
    """Probe first, where the trainer can: a few seeded steps of the candidate and of this parent settle a
    crash or a no-op in seconds."""
    observed_training_s: float | None = None
    """The baseline's measured training seconds: an estimated budget's (CPU seconds, FLOPs) deadline allows
    for them."""
    observed_handover_s: float | None = None
    """The baseline's hand-over, measured by the runner (from the stop signal to its exit: its last step, the
    export, the exit): a later run's window is `handover_window` of it."""
    parent_judge_s: float | None = None
    """What judging the parent's model took (the longest of its runs): the judge's deadline is `judge_deadline`
    of it."""


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs on the machine that trains it: its sources, folder, seed, budget and limits."""

    workspace: Path
    """Where the frozen harness (HARNESS_FILES) is copied from; the run never sees this folder."""
    scratch: Path
    """The run's own folder, made fresh (its only writable place); removed after the judge has scored."""
    exp_id: int
    seed: int
    log_path: Path
    deadline_s: float
    """Hard wall-clock limit from start to kill: budget + evaluation + grace."""
    budget: Budget
    """Exported as AUTORESEARCH_BUDGET; a wall or CPU budget is also measured here, from outside the run, from
    its start: when spent the run is told to stop (STOP_SIGNAL) and must hand over within `handover_s`."""
    handover_s: float = 30.0
    """Seconds a run may take after its budget is spent to stop, export its model and exit (`handover_window`)."""
    memory_mb: int | None = None
    """Cap on the summed resident memory of the process group; None: no watchdog."""
    address_space_mb: int | None = None
    """RLIMIT_AS of the run; None: unlimited."""
    file_size_mb: int = 8192
    """RLIMIT_FSIZE: the largest file the run may write."""
    scratch_cap_mb: int = 16384
    """The most the run's folder may hold; past it the run is killed."""
    model_cap_mb: int = 8192
    """The largest exported model the judge accepts."""
    tmp_mb: int = 1024
    """Size of the run's private /tmp (with namespaces)."""
    hidden: tuple[Path, ...] = ()
    """Files training must not read (the validation split); only the judge reads them."""
    readable: tuple[Path, ...] = ()
    """What of the data cache the run reads (its prepared folder), kept in sight read-only wherever it is."""
    visible: tuple[Path, ...] | None = None
    """The allowlist of the host's paths a fully contained run sees (`containment.in_sight`: the system's and
    the interpreter's folders), besides its own folder and `readable`; None: the whole host, read-only."""
    judge_deadline_s: float = JUDGE_MAX_S
    """Seconds the judge may spend on the model (`judge_deadline`); the judge also refuses, before running it, a
    model whose forward FLOPs could not be scored in them."""
    harness_hashes: Mapping[str, str] | None = None
    """The SHA-256 of each frozen file, by name, as recorded at init: the judge imports nothing else, and nothing
    whose hash was not recorded. None: the files are not checked (tests)."""
    log_cap_bytes: int = 4 * 1024 * 1024
    network: bool = False
    python: str = "python3"
    script: str = "train.py"
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment (after scrubbing), e.g. AUTORESEARCH_CACHE."""
    device_memory_from_summary: bool = False
    """On CUDA the harness's max_memory_allocated is the figure; on CPU the runner's own measurement."""
    train_source: bytes | None = None
    """The train.py to run (a candidate's text at its commit); None: the workspace's file. With several runs in
    flight the workspace holds the best train.py, not the one each run trains."""


@dataclass(frozen=True)
class RunResult:
    """How a run ended. `val_bpb` is the judge's number, set only when the outcome is ok."""

    outcome: Outcome
    val_bpb: float | None
    reason: str
    seconds: float
    """The training process's wall time (the judge's is apart)."""
    exit_code: int | None
    summary: dict[str, Any]
    peak_memory_mb: float | None
    log_tail: str
    log_path: Path
    truncated: bool
    pid: int | None
    judge_seconds: float = 0.0
    """Seconds the judge took (load, probe, score), apart from the run's own."""
    budget_spent: float | None = None
    """What the run spent of an enforced budget, by the runner's measure (wall or CPU seconds)."""
    killed_for: str = ""
    """Why the runner killed it, if it did: interrupted, timeout, oom, disk, or overrun (it went on past its
    budget and the hand-over time)."""

    @classmethod
    def without_judge(
        cls,
        outcome: Outcome,
        reason: str,
        seconds: float,
        log_path: Path,
        log_tail: str = "",
        summary: dict[str, Any] | None = None,
    ) -> RunResult:
        """A result made where no judged run of this machine's runner stands behind it (a probe that settled
        the experiment, a remote run that never reported): no score, no exit code, no memory figure."""
        return cls(
            outcome=outcome,
            val_bpb=None,
            reason=reason,
            seconds=seconds,
            exit_code=None,
            summary=summary or {},
            peak_memory_mb=None,
            log_tail=log_tail,
            log_path=log_path,
            truncated=False,
            pid=None,
        )
