"""Noise-aware decisions: the margin a candidate must beat comes from the baseline's spread over seeds.

The rule, in numbers (bpb, lower is better):
- noise: the baseline runs K times with seeds base_seed .. base_seed+K-1; std is their sample standard
  deviation. margin = max(min_margin, 2 x std); with K = 1 there is no spread, so margin = default_margin.
- a candidate improves by d = best - val_bpb.
  d >= 2 x margin: keep. margin < d < 2 x margin: a marginal win, rerun once with another seed and keep only
  if the mean of both runs still beats best - margin. d <= margin: discard (inside the noise, or worse).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


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

    def as_dict(self) -> dict[str, object]:
        """What the ledger keeps of it (meta "noise")."""
        return {
            "values": list(self.values),
            "std": self.std,
            "spread": self.spread,
            "margin": self.margin,
            "measured": self.measured,
        }

    def describe(self) -> str:
        if not self.measured:
            return f"margin {self.margin:.4f} bpb (default: one baseline run, noise not measured)"
        return (
            f"margin {self.margin:.4f} bpb = max(min margin, 2 x std {self.std:.4f}) "
            f"over {len(self.values)} baseline seeds (spread {self.spread:.4f})"
        )


def noise_floor(values: Sequence[float], min_margin: float, default_margin: float) -> NoiseFloor:
    """The noise floor of the baseline runs `values` (at least one)."""
    if not values:
        raise ValueError("the noise floor needs at least one baseline value")
    vals = tuple(float(v) for v in values)
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return NoiseFloor(vals, mean, 0.0, 0.0, default_margin, measured=False)
    std = statistics.stdev(vals)
    return NoiseFloor(vals, mean, std, max(vals) - min(vals), max(min_margin, 2.0 * std), measured=True)


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
