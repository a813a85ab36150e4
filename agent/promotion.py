"""Promotion: every keep verified at a larger scale, and what each contributes there.

A rung is the session's budget times a factor ('4x': 60 s -> 240 s). At each rung the engine trains, contained and
judged like any run: the baseline over the session's seeds (the rung's own noise margin, measured once per rung),
then each keep of the best's lineage and its parent with the base seed. A configuration (a train.py's text) is
measured once per rung and seed, so a keep's parent is usually the previous keep's run. A keep *transfers* when
its gain at the rung (its parent's val_bpb minus its own, same seed) beats the rung's margin; otherwise it does
not transfer — the branch is not rewritten, the user decides. At the end of a session, at the largest rung, the
best without each keep (its change reverted by a three-way merge) says what each keep contributes at scale and
whether the contributions add up to the whole gain.

This module is pure: what to train next and what the runs say, from the ledger's rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.budget import Budget
from agent.decisions import NoiseFloor, noise_floor
from agent.ledger import KEPT, Experiment, Ledger, PromotionRun
from agent.sandbox.spec import Outcome

_RUNG = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*$", re.IGNORECASE)

PENDING = "pending"
TRANSFERS = "transfers"
FAILS = "does not transfer"
UNKNOWN = "unknown"
"""Its parent failed at the rung: there is nothing to compare it with."""
MARKS = {PENDING: "…", TRANSFERS: "✓", FAILS: "✗", UNKNOWN: "?"}
"""How the timeline shows a verdict."""


@dataclass(frozen=True)
class Rung:
    """The session's budget times `factor`."""

    factor: float

    @property
    def name(self) -> str:
        return f"{self.factor:g}x"

    def budget(self, base: Budget) -> Budget:
        return Budget(base.mode, base.amount * self.factor)


def parse_rungs(text: str) -> tuple[Rung, ...]:
    """'4x' or '4x,16x': factors above 1, each larger than the one before (ValueError saying so otherwise);
    '' or 'off' is no promotion."""
    if text.strip().lower() in ("", "off", "none"):
        return ()
    rungs: list[Rung] = []
    for part in text.split(","):
        match = _RUNG.match(part)
        factor = float(match.group(1)) if match else 0.0
        if factor <= 1 or (rungs and factor <= rungs[-1].factor):
            raise ValueError(
                f"promotion {text!r} is not understood: give budget factors above 1, smallest first, e.g. 4x or 4x,16x"
            )
        rungs.append(Rung(factor))
    return tuple(rungs)


@dataclass(frozen=True)
class Step:
    """One keep of the best's lineage, and the kept experiment (or baseline) it was made on."""

    exp_id: int
    code_hash: str
    parent_id: int
    parent_hash: str
    gain: float | None
    """Its gain at the session's budget: its parent's val_bpb minus its own."""


@dataclass(frozen=True)
class Subject:
    """A configuration to measure: an experiment's train.py, or the best without one keep (`without_id`)."""

    code_hash: str
    exp_id: int | None
    without_id: int | None = None

    def describe(self) -> str:
        if self.without_id is not None:
            return f"the best without #{self.without_id}"
        return "the baseline" if self.exp_id == 0 else f"#{self.exp_id}"


@dataclass(frozen=True)
class Job:
    """A promotion run to make: `subject` at `rung` with `seed`."""

    rung: Rung
    subject: Subject
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.rung.name, self.subject.code_hash, self.seed)


def measured(runs: Sequence[PromotionRun], rung: str, code_hash: str, seed: int) -> PromotionRun | None:
    """The finished run of `code_hash` at `rung` with `seed` (an interrupted one runs again: None)."""
    for run in runs:
        if (run.rung, run.code_hash, run.seed) == (rung, code_hash, seed) and run.outcome not in (
            None,
            Outcome.INTERRUPTED,
        ):
            return run
    return None


def wanted(
    rungs: Sequence[Rung],
    seeds: Sequence[int],
    baseline_hash: str,
    steps: Sequence[Step],
    without: Mapping[int, str | None] | None = None,
) -> list[Job]:
    """Every run the promotion wants, in the order it wants them (none without a keep): rung by rung, the baseline's seeds, each
    keep's parent and the keep with the base seed (`seeds[0]`), and at the largest rung the leave-one-out
    variants `without` (keep id -> the variant's code hash; None: the keep cannot be removed alone)."""
    if not steps:
        return []  # nothing was kept: nothing to verify
    base_seed = seeds[0]
    jobs: list[Job] = []
    for i, rung in enumerate(rungs):
        jobs += [Job(rung, Subject(baseline_hash, 0), seed) for seed in seeds]
        for step in steps:
            jobs.append(Job(rung, Subject(step.parent_hash, step.parent_id), base_seed))
            jobs.append(Job(rung, Subject(step.code_hash, step.exp_id), base_seed))
        if without and i == len(rungs) - 1:
            jobs += [
                Job(rung, Subject(code, None, keep), base_seed)
                for keep, code in without.items()
                if code is not None
            ]
    unique: dict[tuple[str, str, int], Job] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    return list(unique.values())


def next_job(
    jobs: Sequence[Job], runs: Sequence[PromotionRun], busy: set[tuple[str, str, int]]
) -> Job | None:
    """The first of `jobs` neither measured nor training now."""
    for job in jobs:
        if job.key not in busy and measured(runs, *job.key) is None:
            return job
    return None


def rung_noise(
    runs: Sequence[PromotionRun],
    rung: str,
    baseline_hash: str,
    seeds: Sequence[int],
    min_margin: float,
    default_margin: float,
) -> NoiseFloor | None:
    """The rung's noise floor from the baseline's seeds there (None until all are measured; the default margin
    where none of them trained)."""
    found = [measured(runs, rung, baseline_hash, seed) for seed in seeds]
    if any(run is None for run in found):
        return None
    values = [run.val_bpb for run in found if run is not None and run.val_bpb is not None]
    if not values:
        return NoiseFloor((), 0.0, 0.0, 0.0, max(min_margin, default_margin), measured=False)
    return noise_floor(values, min_margin, default_margin)


@dataclass(frozen=True)
class Verdict:
    """Whether a keep's gain holds at a rung: pending, transfers, does not transfer, or unknown (with why)."""

    exp_id: int
    rung: str
    state: str
    gain: float | None = None
    """Its parent's val_bpb minus its own at the rung (same seed)."""
    reason: str = ""

    @property
    def mark(self) -> str:
        return MARKS[self.state]


def verdict(
    step: Step, rung: str, runs: Sequence[PromotionRun], noise: NoiseFloor | None, base_seed: int
) -> Verdict:
    """The keep `step` at `rung`, once the rung's margin and both runs are measured."""
    parent = measured(runs, rung, step.parent_hash, base_seed)
    mine = measured(runs, rung, step.code_hash, base_seed)
    if parent is None or mine is None or noise is None:
        return Verdict(step.exp_id, rung, PENDING)
    if mine.val_bpb is None:
        return Verdict(
            step.exp_id, rung, FAILS, reason=f"it failed at {rung}: {mine.outcome} ({mine.reason})"[:300]
        )
    if parent.val_bpb is None:
        return Verdict(step.exp_id, rung, UNKNOWN, reason=f"its parent failed at {rung} ({parent.outcome})")
    gain = parent.val_bpb - mine.val_bpb
    words = (
        f"gain {gain:+.4f} at {rung} (margin {noise.margin:.4f}; {step.gain:+.4f} at the session's budget)"
        if step.gain is not None
        else f"gain {gain:+.4f} at {rung} (margin {noise.margin:.4f})"
    )
    if gain > noise.margin:
        return Verdict(step.exp_id, rung, TRANSFERS, gain, words)
    return Verdict(step.exp_id, rung, FAILS, gain, f"{words}: inside the rung's noise or worse")


@dataclass(frozen=True)
class Contribution:
    """What one keep contributes to the best at a rung: the best without it minus the best (None: unknown)."""

    exp_id: int
    contribution: float | None
    reason: str = ""


@dataclass(frozen=True)
class Additivity:
    """The final best against the baseline at a rung, and each keep's leave-one-out contribution."""

    rung: str
    best_id: int
    total: float | None
    """The baseline's val_bpb minus the best's at the rung (same seed)."""
    contributions: tuple[Contribution, ...]

    @property
    def summed(self) -> float | None:
        values = [c.contribution for c in self.contributions]
        return sum(v for v in values if v is not None) if values and None not in values else None


def additivity(
    rung: str,
    runs: Sequence[PromotionRun],
    baseline_hash: str,
    best_id: int,
    best_hash: str,
    without: Mapping[int, str | None],
    base_seed: int,
) -> Additivity:
    """The leave-one-out pass at `rung` from its runs (`without`: keep id -> the variant's hash, None: the keep's
    change could not be reverted alone)."""

    def value(code: str) -> float | None:
        run = measured(runs, rung, code, base_seed)
        return run.val_bpb if run is not None else None

    best, base = value(best_hash), value(baseline_hash)
    total = base - best if base is not None and best is not None else None
    parts = []
    for keep, code in without.items():
        if code is None:
            parts.append(
                Contribution(
                    keep, None, "its change cannot be reverted alone (it conflicts with a later keep)"
                )
            )
            continue
        other = value(code)
        if other is None or best is None:
            parts.append(Contribution(keep, None, "not measured (yet), or a run failed"))
        else:
            parts.append(Contribution(keep, other - best))
    return Additivity(rung, best_id, total, tuple(parts))


@dataclass(frozen=True)
class Plan:
    """A workspace's promotion, read from its ledger: the rungs, the seeds, the best's lineage, the
    leave-one-out variants (once asked for) and the runs so far."""

    rungs: tuple[Rung, ...]
    seeds: tuple[int, ...]
    baseline_hash: str
    steps: tuple[Step, ...]
    runs: tuple[PromotionRun, ...]
    best_id: int
    best_hash: str
    without: Mapping[int, str | None] | None = None
    min_margin: float = 0.002
    default_margin: float = 0.01

    def jobs(self) -> list[Job]:
        return wanted(self.rungs, self.seeds, self.baseline_hash, self.steps, self.without)

    def noise(self, rung: Rung) -> NoiseFloor | None:
        return rung_noise(
            self.runs, rung.name, self.baseline_hash, self.seeds, self.min_margin, self.default_margin
        )

    def verdicts(self) -> dict[int, tuple[Verdict, ...]]:
        """Each keep's verdict at each rung, smallest rung first."""
        noises = {rung.name: self.noise(rung) for rung in self.rungs}
        return {
            step.exp_id: tuple(
                verdict(step, r.name, self.runs, noises[r.name], self.seeds[0]) for r in self.rungs
            )
            for step in self.steps
        }

    def additivity(self) -> Additivity | None:
        """The leave-one-out pass at the largest rung (None: not asked for yet)."""
        if not self.rungs or self.without is None:
            return None
        rung = self.rungs[-1].name
        return additivity(
            rung, self.runs, self.baseline_hash, self.best_id, self.best_hash, self.without, self.seeds[0]
        )

    def marks(self) -> dict[int, str]:
        """What the timeline shows per keep: one mark per rung ('✓', '✗✓', '…')."""
        return {exp_id: "".join(v.mark for v in found) for exp_id, found in self.verdicts().items()}


PROMOTE_META = "promote"
"""The ledger's meta key of the workspace's rungs (their factors): a workspace setting, kept across sessions."""
WITHOUT_META = "leave_one_out"
"""The ledger's meta key of the leave-one-out pass asked for: the best it is of, and each keep's variant hash."""


def lineage(experiments: Sequence[Experiment], best_id: int | None) -> list[Step]:
    """The keeps that made the best, oldest first, each with the kept experiment it was made on."""
    by_id = {e.id: e for e in experiments}
    kept = [e for e in experiments if e.status in KEPT and e.commit]
    steps: list[Step] = []
    exp = by_id.get(best_id) if best_id is not None else None
    while exp is not None and exp.id != 0:
        parent = next((e for e in reversed(kept) if e.commit == exp.parent_commit and e.id != exp.id), None)
        if parent is None or not exp.train_hash or not parent.train_hash:
            break
        gain = (
            parent.val_bpb - exp.val_bpb if parent.val_bpb is not None and exp.val_bpb is not None else None
        )
        steps.append(Step(exp.id, exp.train_hash, parent.id, parent.train_hash, gain))
        exp = parent
    return steps[::-1]


def rung_seeds(baseline_seeds: Sequence[int]) -> tuple[int, ...]:
    """The seeds of every rung: as many as the baseline's, none a candidate was chosen on (each keep won with the
    session's base seed, a marginal one with the next too), so that a keep whose gain lives in one seed's luck
    does not carry it up the ladder: the first is the keeps' and their parents', all measure the rung's noise."""
    start = max(baseline_seeds) + 1
    return tuple(range(start, start + len(baseline_seeds)))


def stored_rungs(ledger: Ledger) -> tuple[Rung, ...]:
    """The workspace's promotion rungs, as its ledger keeps them (none: no promotion)."""
    return tuple(Rung(float(f)) for f in ledger.get_meta(PROMOTE_META, []))


def read_plan(ledger: Ledger, rungs: Sequence[Rung] | None = None) -> Plan | None:
    """The workspace's promotion as its ledger holds it (`rungs`: the ones asked for now, else the stored ones);
    None when there is none or the baseline is not measured yet."""
    if rungs is None:
        rungs = stored_rungs(ledger)
    baseline = ledger.get(0)
    if (
        not rungs
        or baseline is None
        or not baseline.train_hash
        or baseline.val_bpb is None
        or not baseline.seeds
    ):
        return None
    best_id = ledger.get_meta("best_exp_id", 0)
    best = ledger.get(best_id) or baseline
    stored = ledger.get_meta(WITHOUT_META)
    without = None
    if stored and stored.get("best_id") == best.id:
        without = {int(k): v for k, v in stored["without"].items()}
    return Plan(
        rungs=tuple(rungs),
        seeds=rung_seeds(baseline.seeds),
        baseline_hash=baseline.train_hash,
        steps=tuple(lineage(ledger.experiments(), best.id)),
        runs=tuple(ledger.promotions()),
        best_id=best.id,
        best_hash=best.train_hash or baseline.train_hash,
        without=without,
    )
