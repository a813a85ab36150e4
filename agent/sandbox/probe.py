"""No wasted runs, by trying: a few-step seeded probe whose fingerprint (the exported model's logits, bit for
bit) says whether a candidate computes what its parent does, or crashes, in seconds instead of a run.

A probe (`probe`) is K optimizer steps of the real train.py on the real harness, contained like a run, with the
budget's clock made of steps so that the same code gives the same numbers; the clean judge hashes the exported
model's logits on a fixed input. A probe that crashed (`Probe.settles`) is the experiment's outcome already.
Otherwise the parent's probe (same seed and environment; once per parent: `ProbeCache`, `probe_key`) and
`same_computation` say whether it is a no-op; anything else (no fingerprint, a timeout) means: train it.

A probe sees K steps only: a change whose effect starts later (a branch on the step number, a clip threshold
the first gradients do not reach) reads as the same computation. The K steps sample the whole learning-rate
schedule (see `prepare.Budget`), so changes to warm-up, decay and cool-down are seen.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.events import Event, EventSink
from agent.sandbox.containment import Containment
from agent.sandbox.handover import HarnessChanged, UnsafeFile, frozen_harness, read_regular
from agent.sandbox.judging import Judges
from agent.sandbox.runner import run_training
from agent.sandbox.spec import HARNESS_FILE, MAX_SOURCE_BYTES, Outcome, ProbeParent, RunResult, RunSpec

PROBE_STEPS = 4
"""Optimizer steps of a probe: the schedule at 0, 1/3, 2/3 and its end; each costs ~0.1 s on the default model."""
PROBE_STEPS_ENV = "AUTORESEARCH_PROBE_STEPS"
"""The harness's probe knob (nanogpt/prepare.py): set by the runner's environment only, never the run's."""
_CONTAINMENT_FAILED = "the run's containment could not be set up"
"""The runner's reason for a crash before anything ran (`runner.classify`): not the code's fault."""


@dataclass(frozen=True)
class Probe:
    """How a probe of a train.py ended, and its fingerprint when it trained all its steps."""

    outcome: str
    """ok (fingerprint set), crash, nan, oom, timeout, invalid, interrupted, inconclusive (it ran, but there is
    no fingerprint to compare: fewer steps, or train.py handed over no probe claims) or unsupported (the
    workspace's prepare.py predates probes: nothing ran)."""
    fingerprint: str | None
    """SHA-256 (hex) of the exported model's logits on the judge's fixed input, after `steps` steps."""
    reason: str
    """Why it is not ok: the error line of a crash, the judge's or the runner's word."""
    seconds: float
    """Wall seconds of the probe: start-up, the steps, export and the judge."""
    steps: int
    log_tail: str = ""
    log_path: Path | None = None
    killed_for: str = ""
    """Why the runner killed the probe, if it did (`RunResult.killed_for`)."""

    @property
    def settles(self) -> bool:
        """The probe crashed the way the full run would (the same code on the same batches): record the crash,
        do not train. Not a NaN: the probe's steps sample the schedule's peak, where the run warms up first;
        not memory: the machine's may be short only for now."""
        return self.outcome == "crash" and not self.reason.startswith(_CONTAINMENT_FAILED)

    def crash_lines(self, lines: int = 8) -> str:
        """What a proposer is told of a candidate that crashed: the traceback's last lines in train.py's own
        words (frames inside libraries, the ^^^ markers and the run's folder left out), ending on the error."""
        kept: list[str] = []
        library_frame = False
        for line in self.log_tail.splitlines():
            stripped = line.strip()
            if stripped.startswith('File "'):
                library_frame = not stripped.split('"')[1].endswith("/train.py")
                if not library_frame:
                    line = line.replace(stripped.split('"')[1], "train.py")
            elif not line.startswith(" "):
                library_frame = False
            if library_frame or not stripped or set(stripped) <= set("^~"):
                continue
            kept.append(line)
        error = self.reason.split(": ", 1)[-1] if self.reason.startswith("exit code") else self.reason
        if error and not (kept and error.strip() in kept[-1]):
            kept.append(error)
        return "\n".join(kept[-lines:])

    @property
    def hung(self) -> bool:
        """The probe did not train its few steps within its deadline, or went on past its budget: a run of the
        same code would not do better (it spins, sleeps, floods its output or waits on children)."""
        return self.killed_for in ("timeout", "overrun")


def probe(
    spec: RunSpec,
    emit: EventSink | None = None,
    *,
    steps: int = PROBE_STEPS,
    stop: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    containment: Containment | None = None,
    judge: Judges | None = None,
) -> Probe:
    """Run `spec` as a probe: `steps` optimizer steps, seeded by `spec.seed`, contained and judged like a run
    (`run_training`: the same folders, log, limits and budget, which only bound it), and fingerprinted.

    Give the parent's probe the same spec but for its train.py (`train_source`), exp_id and paths: the seed,
    budget and environment must match for fingerprints to compare (`probe_key`).
    """
    if steps < 1:
        raise ValueError("a probe takes at least one step")
    started = time.monotonic()
    try:
        harness = frozen_harness(spec.workspace, spec.harness_hashes)
    except (OSError, UnsafeFile, HarnessChanged) as exc:
        return Probe("unsupported", None, f"no harness to probe with: {exc}"[:300], 0.0, steps)
    if PROBE_STEPS_ENV.encode() not in harness[HARNESS_FILE]:
        return Probe("unsupported", None, f"this workspace's {HARNESS_FILE} predates probes", 0.0, steps)
    result = run_training(
        replace(spec, env={**spec.env, PROBE_STEPS_ENV: str(steps)}),
        emit or _ignore,
        stop=stop,
        on_start=on_start,
        containment=containment,
        judge=judge,
    )
    seconds = time.monotonic() - started
    fingerprint = result.summary.get("fingerprint")
    outcome, reason = str(result.outcome), result.reason
    if isinstance(fingerprint, str) and fingerprint:
        outcome, reason = "ok", ""
    else:
        fingerprint = None
        if outcome == "ok":
            outcome, reason = (
                "inconclusive",
                "scored, not fingerprinted: train.py handed over no probe claims",
            )
        elif outcome == "invalid" and "no fingerprint" in reason:
            outcome = "inconclusive"
    killed = result.killed_for
    return Probe(outcome, fingerprint, reason, seconds, steps, result.log_tail, result.log_path, killed)


def _ignore(event: Event) -> None:
    pass


def same_computation(parent: Probe, candidate: Probe, parent_id: int) -> str | None:
    """The experiment's reason when both probes trained the same steps to the same fingerprint, else None."""
    if parent.outcome != "ok" or candidate.outcome != "ok" or parent.steps != candidate.steps:
        return None
    if parent.fingerprint is None or parent.fingerprint != candidate.fingerprint:
        return None
    return f"no-op: same computation as #{parent_id} in {candidate.steps} probe steps"


def probe_key(spec: RunSpec, steps: int = PROBE_STEPS) -> str:
    """What a probe's fingerprint depends on, hashed: train.py, the harness, seed, steps, budget, environment."""
    source = spec.train_source
    if source is None:
        source = read_regular(spec.workspace / spec.script, MAX_SOURCE_BYTES)
    digest = hashlib.sha256(source)
    harness = sorted((spec.harness_hashes or {}).items())
    digest.update(repr((harness, spec.seed, steps, spec.budget, sorted(spec.env.items()))).encode())
    return digest.hexdigest()


class ProbeCache:
    """Probes of parents by `probe_key`: each probed once (while it is asked for twice at the same time, the
    second asker waits for the first); only fingerprinted probes are kept, the newest `size`."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._keys: dict[str, threading.Lock] = {}
        self._probes: OrderedDict[str, Probe] = OrderedDict()

    def get(self, key: str, run: Callable[[], Probe]) -> Probe:
        """The cached probe for `key`, or `run()`'s (kept when it has a fingerprint)."""
        with self._lock:
            key_lock = self._keys.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._probes:
                    self._probes.move_to_end(key)
                    return self._probes[key]
            found = run()
            with self._lock:
                self._keys.pop(key, None)
                if found.fingerprint is not None:
                    self._probes[key] = found
                    while len(self._probes) > self.size:
                        self._probes.popitem(last=False)
            return found


@dataclass(frozen=True)
class Prober:
    """Probes made and kept in `cache` by their key (`probe_key`), contained and judged like runs."""

    cache: ProbeCache
    stop: threading.Event
    on_start: Callable[[int], None] | None
    containment: Containment | None
    judge: Judges | None

    def __call__(self, spec: RunSpec, emit: EventSink | None = None) -> Probe:
        """`spec`'s probe: the one kept for its key, else made now."""
        return self.cache.get(
            probe_key(spec),
            lambda: probe(
                spec,
                emit,
                stop=self.stop,
                on_start=self.on_start,
                containment=self.containment,
                judge=self.judge,
            ),
        )

    def crashed(self, candidate: Probe, parent: RunSpec) -> bool:
        """Whether the candidate crashed in its probe the way its run would: only where the parent (`parent`, its
        probe's spec) trains its own probe steps. A kept train.py that crashes when it sees a probe would
        otherwise make every child a crash without a run."""
        return candidate.settles and not self(parent).settles


def settle_by_probe(spec: RunSpec, parent: ProbeParent, prober: Prober, emit: EventSink) -> RunResult | None:
    """A candidate's first run, settled by probes where they can: a few seeded steps of the candidate and, once
    per parent (the prober's cache), of its parent, each under `spec`'s deadline (the sandbox keeps a probe's
    short). The run's result when that settles it (a crash, a hang, the same computation as the parent,
    stopped), else None: train it."""

    def probing(source: bytes | None, name: str) -> RunSpec:
        folder = spec.scratch.with_name(f"{spec.scratch.name}-{name}")
        log = spec.log_path.with_name(f"{spec.log_path.stem}.{name}.log")
        return replace(spec, scratch=folder, log_path=log, train_source=source)

    parent_spec = probing(parent.train_source.encode("utf-8"), "parent-probe")
    # Cached too: once kept, a candidate is the next candidates' parent.
    candidate = prober(probing(spec.train_source, "probe"), emit)
    if candidate.outcome == "interrupted":
        return _settled(candidate, Outcome.INTERRUPTED, candidate.reason)
    if candidate.settles:
        if not prober.crashed(candidate, parent_spec):
            return None
        return _settled(
            candidate, Outcome.CRASH, f"in a probe of {candidate.steps} steps: {candidate.reason}"
        )
    if candidate.hung:  # a hanging candidate costs one probe's deadline, not a probe's and then a run's
        return _settled(
            candidate, Outcome.TIMEOUT, f"in a probe of {candidate.steps} steps: {candidate.reason}"
        )
    if candidate.outcome != "ok":
        return None
    same = same_computation(prober(parent_spec), candidate, parent.exp_id)
    return None if same is None else _settled(candidate, Outcome.NOOP, same)


def _settled(found: Probe, outcome: Outcome, reason: str) -> RunResult:
    """A probe that settles an experiment, as its run's result."""
    summary = {"probe_steps": found.steps, "probe_seconds": round(found.seconds, 2)}
    log_path = found.log_path or Path("probe.log")
    return RunResult.without_judge(outcome, reason, found.seconds, log_path, found.log_tail, summary)
