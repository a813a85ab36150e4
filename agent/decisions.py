"""Noise-aware decisions: the margin a candidate must beat comes from the baseline's spread over seeds.

The rule, in numbers (bpb, lower is better):
- noise: the baseline runs K times with seeds base_seed .. base_seed+K-1; std is their sample standard
  deviation. margin = max(min_margin, 2 x std); with K = 1 there is no spread, so margin = default_margin.
  A floor from what this machine is known to do at the budget (`known_std`, earlier sessions' baselines):
  margin = max(min_margin, 2 x std, 2 x known_std), so that two seeds that happen to agree do not set it.
- a run is disturbed when the rest of the machine kept more CPU busy while it trained than while its reference
  (its parent's runs; for a baseline seed, the quietest seed) trained, by DISTURBED_SHARE of the machine's cores
  or more: it is run again with the same seed (up to MAX_DISTURBED_RERUNS times) rather than decided on.
- a candidate improves by d = best - val_bpb.
  d >= 2 x margin: keep. margin < d < 2 x margin: a marginal win, rerun once with another seed and keep only
  if the mean of both runs still beats best - margin. d <= margin: discard (inside the noise, or worse).
`next_step` and `baseline_runs` apply these rules to an experiment's runs as the ledger holds them, so the
engine's next step after a restart is the one it would have taken.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from agent.ledger import RunRecord, Status
from agent.sandbox.spec import Outcome

DISTURBED_SHARE = 0.15
"""The share of the machine's cores that others may keep busy beyond the reference before a run is disturbed
(0.3 cores of 2: one competing busy process takes about 0.7 beside a run using both)."""
MAX_DISTURBED_RERUNS = 2
"""Reruns of one experiment for disturbance; past them it is decided on what was measured (the machine stays busy)."""


@dataclass(frozen=True)
class NoiseFloor:
    """The baseline's values over seeds, their spread and the margin derived from it."""

    values: tuple[float, ...]
    mean: float
    std: float
    """Sample standard deviation (0 with one value)."""
    spread: float
    """max - min."""
    margin: float
    measured: bool
    """False when the margin is the configured default (a single baseline run)."""
    known_std: float | None = None
    """The noise this machine is known to have at the budget (earlier sessions), which floors the margin."""

    def as_dict(self) -> dict[str, object]:
        """What the ledger keeps of it (meta "noise")."""
        return {
            "values": list(self.values),
            "std": self.std,
            "spread": self.spread,
            "margin": self.margin,
            "measured": self.measured,
            "known_std": self.known_std,
        }

    def describe(self) -> str:
        known = f", 2 x the machine's known std {self.known_std:.4f}" if self.known_std is not None else ""
        if not self.measured:
            if self.known_std is not None:
                return f"margin {self.margin:.4f} bpb = 2 x the machine's known std {self.known_std:.4f} (one run)"
            return f"margin {self.margin:.4f} bpb (default: one baseline run, noise not measured)"
        return (
            f"margin {self.margin:.4f} bpb = max(min margin, 2 x std {self.std:.4f}{known}) "
            f"over {len(self.values)} baseline seeds (spread {self.spread:.4f})"
        )


def noise_floor(
    values: Sequence[float], min_margin: float, default_margin: float, known_std: float | None = None
) -> NoiseFloor:
    """The noise floor of the baseline runs `values` (at least one), floored by the machine's `known_std`."""
    if not values:
        raise ValueError("the noise floor needs at least one baseline value")
    vals = tuple(float(v) for v in values)
    mean = statistics.fmean(vals)
    floor = 2.0 * known_std if known_std is not None else 0.0
    if len(vals) < 2:
        margin = floor if known_std is not None else default_margin
        return NoiseFloor(vals, mean, 0.0, 0.0, max(min_margin, margin), measured=False, known_std=known_std)
    std = statistics.stdev(vals)
    margin = max(min_margin, 2.0 * std, floor)
    return NoiseFloor(vals, mean, std, max(vals) - min(vals), margin, measured=True, known_std=known_std)


def disturbance(load: float | None, reference: Sequence[float | None], cores: int) -> str:
    """Why a run that trained while others kept `load` cores busy is disturbed against its `reference` runs'
    loads (the quietest counts); "" when it is not, or when either was not measured."""
    measured = [r for r in reference if r is not None]
    if load is None or not measured:
        return ""
    quietest = min(measured)
    if load - quietest < DISTURBED_SHARE * cores:
        return ""
    return (
        f"the machine was busy while it trained: other processes kept {load:.2f} CPU cores busy against "
        f"{quietest:.2f} while its reference trained"
    )


@dataclass(frozen=True)
class Verdict:
    """`keep`, `discard`, or `confirm` (a marginal win: rerun with another seed first); reason in words."""

    status: str
    reason: str


def verdict(val_bpb: float, best_bpb: float, margin: float, confirm_marginal: bool = True) -> Verdict:
    """The verdict on one run of a candidate against the best kept val_bpb."""
    gain = best_bpb - val_bpb
    words = f"val_bpb {val_bpb:.6f} vs best {best_bpb:.6f} (gain {gain:+.6f}, margin {margin:.6f})"
    if gain >= 2 * margin:
        return Verdict("keep", f"{words}: a clear win, at least 2x the margin")
    if gain > margin:
        if confirm_marginal:
            return Verdict("confirm", f"{words}: a marginal win, between 1x and 2x the margin; rerunning")
        return Verdict("keep", f"{words}: beats best - margin")
    if gain > 0:
        return Verdict("discard", f"{words}: better, but inside the noise margin")
    return Verdict("discard", f"{words}: not better")


def verdict_confirmed(values: Sequence[float], best_bpb: float, margin: float) -> Verdict:
    """The verdict on a marginal win after its confirmation run: the mean must still beat best - margin."""
    mean = statistics.fmean(values)
    shown = ", ".join(f"{v:.6f}" for v in values)
    words = f"mean val_bpb {mean:.6f} over {len(values)} seeds ({shown}) vs best {best_bpb:.6f}, margin {margin:.6f}"
    if mean < best_bpb - margin:
        return Verdict("keep", f"{words}: the marginal win held up on another seed")
    return Verdict("discard", f"{words}: the marginal win did not hold up on another seed")


def undisturbed(
    loads: Sequence[float | None], reference: Sequence[float | None], cores: int
) -> tuple[list[int], str]:
    """Which of an experiment's ok runs (their others' `loads`, oldest first) to decide on, and why the last
    must run again ("" when it need not). A disturbed run is left out while reruns remain; past
    MAX_DISTURBED_RERUNS the machine stays busy, and every run counts."""
    why = [disturbance(load, reference, cores) for load in loads]
    if sum(1 for w in why if w) > MAX_DISTURBED_RERUNS:
        return list(range(len(loads))), ""
    return [i for i, w in enumerate(why) if not w], (why[-1] if why else "")


@dataclass(frozen=True)
class Rules:
    """The settings an experiment's next step depends on."""

    base_seed: int = 1
    confirm_marginal: bool = True
    cores: int | None = None
    """The machine's cores where disturbed runs are weighed (one local trainer, no model thinking while it
    trains); None: they are not (beside a second trainer, a Ray node's other tasks or a model server answering
    the session, the others' load is the session's own)."""


@dataclass(frozen=True)
class RunAgain:
    """An experiment needs a run with `seed`; `say` is what the log says of it ("" for its first run)."""

    seed: int
    say: str = ""


def counted_runs(
    runs: Sequence[RunRecord], reference: Sequence[RunRecord], rules: Rules
) -> tuple[list[RunRecord], str]:
    """The runs of an experiment that count (its decision and its value), less those the machine disturbed
    against its `reference` runs, and why the last must run again ("" when it need not)."""
    if rules.cores is None or not runs:
        return list(runs), ""
    loads = [r.other_load if r.outcome == Outcome.OK else None for r in runs]
    quiet = [r.other_load for r in reference if r.outcome == Outcome.OK]
    chosen, why = undisturbed(loads, quiet, rules.cores)
    return [runs[i] for i in chosen], why


def next_step(
    runs: Sequence[RunRecord], reference: Sequence[RunRecord], best_bpb: float, margin: float, rules: Rules
) -> tuple[RunAgain | Verdict, list[RunRecord]]:
    """What a committed experiment needs next, from its `runs` on its commit (oldest first) and its reference's
    (the kept experiment it is judged against, at `best_bpb`): a run, or its verdict (keep, discard, or the
    outcome of a run that failed); with the runs that count (`counted_runs`: a verdict's value is theirs)."""
    kept, why = counted_runs(runs, reference, rules)
    if why:
        return RunAgain(runs[-1].seed, f"{why}; it runs again with seed {runs[-1].seed}"), kept
    if not kept:
        return RunAgain(rules.base_seed), kept
    first = kept[0]
    if first.outcome != Outcome.OK or first.val_bpb is None:
        return Verdict(first.outcome or Status.CRASH, first.reason or "the run failed"), kept
    found = verdict(first.val_bpb, best_bpb, margin, rules.confirm_marginal)
    if found.status != "confirm":
        return found, kept
    if len(kept) < 2:
        return RunAgain(rules.base_seed + 1, found.reason), kept
    second = kept[1]
    if second.outcome != Outcome.OK or second.val_bpb is None:
        why = f"{found.reason}; the confirmation run failed: {second.outcome}"
        return Verdict(Status.DISCARD, why), kept
    return verdict_confirmed([first.val_bpb, second.val_bpb], best_bpb, margin), kept


def baseline_runs(
    runs: Sequence[RunRecord], wanted: Sequence[int], rules: Rules
) -> tuple[list[RunRecord], dict[int, str]]:
    """The baseline's runs that count (each wanted seed's newest undisturbed ok run), and the seeds the machine
    disturbed, to run again, with why (against the quietest of its ok runs)."""
    ok = [r for r in runs if r.outcome == Outcome.OK and r.seed in wanted]
    counted: list[RunRecord] = []
    again: dict[int, str] = {}
    for seed in wanted:
        kept, why = counted_runs([r for r in ok if r.seed == seed], ok, rules)
        if why:
            again[seed] = why
        elif kept:
            counted.append(kept[-1])
    return counted, again
