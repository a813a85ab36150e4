"""A run's training budget as a value: parsed once where the user gives it, carried as `Budget` everywhere after.

The grammar is the harness's (nanogpt/prepare.py `parse_budget`, which the frozen harness keeps as its own
copy: it cannot import `agent`): '60', '60s', '60 seconds' (wall seconds), '120cpu' (CPU seconds of the run's
processes) or '2.5e12flops' (FLOPs the harness counts). A test holds the two readings equal, mode by mode.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum

_GRAMMAR = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|sec|seconds|cpu|cpus|flops)?\s*$", re.IGNORECASE
)
CPU_FLOPS_PER_S = 2.9e12 / 60.0
"""nanogpt/prepare.py's DEFAULT_CPU_FLOPS is sized for 60 s: a rough FLOPs-to-seconds rate (a test keeps them
equal; the engine reads it here so that it never imports torch)."""
DEFAULT_CPU_SECONDS = 60.0
"""The harness's default on a CPU: 60 wall seconds (kept equal to prepare.py by a test)."""
DEFAULT_CUDA_SECONDS = 300.0
"""The harness's default on CUDA: 5 wall minutes, as autoresearch."""


class BudgetMode(StrEnum):
    """What a budget counts (the harness's mode names)."""

    TIME = "time"
    """Wall seconds from the run's start: start-up, compilation and every step paid for."""
    CPU = "cpu"
    """CPU seconds (user + system) of the run's processes."""
    FLOPS = "flops"
    """FLOPs the harness counts (6 x parameters x tokens served): the run's own count."""


@dataclass(frozen=True)
class Budget:
    """How much one run may train: `amount` in the unit of `mode`."""

    mode: BudgetMode
    amount: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'60', '60s', '120cpu', '2.5e12flops' (ValueError saying what is valid otherwise)."""
        match = _GRAMMAR.match(text)
        if not match or float(match.group(1)) <= 0:
            raise ValueError(
                f"budget {text!r} is not understood: use wall seconds (60, 60s), CPU seconds (120cpu) "
                "or FLOPs (2.5e12flops)"
            )
        unit = (match.group(2) or "s").lower()
        mode = {"flops": BudgetMode.FLOPS, "cpu": BudgetMode.CPU, "cpus": BudgetMode.CPU}.get(unit)
        return cls(mode or BudgetMode.TIME, float(match.group(1)))

    @classmethod
    def default(cls, device: str) -> Budget:
        """The harness default on `device`: 300 wall seconds on CUDA, 60 on a CPU."""
        seconds = DEFAULT_CUDA_SECONDS if device.startswith("cuda") else DEFAULT_CPU_SECONDS
        return cls(BudgetMode.TIME, seconds)

    @property
    def text(self) -> str:
        """The budget in the harness's grammar (AUTORESEARCH_BUDGET, the ledger): '60', '120cpu', '2.5e+12flops'."""
        unit = {BudgetMode.TIME: "", BudgetMode.CPU: "cpu", BudgetMode.FLOPS: "flops"}[self.mode]
        return f"{self.amount:g}{unit}"

    def describe(self) -> str:
        """For people: '60 s', '120 CPU s', '2.50e+12 FLOPs'."""
        if self.mode == BudgetMode.TIME:
            return f"{self.amount:g} s"
        if self.mode == BudgetMode.CPU:
            return f"{self.amount:g} CPU s"
        return f"{self.amount:.2e} FLOPs"

    def __str__(self) -> str:
        return self.describe()

    @property
    def measured_outside(self) -> bool:
        """Wall and CPU budgets are measured by the runner, from outside the run, and enforced; a FLOPs budget
        is the run's own count, bounded from outside only by the deadline."""
        return self.mode != BudgetMode.FLOPS

    def estimate_seconds(self) -> tuple[float, bool]:
        """Rough wall seconds of training, and whether that is only an estimate (CPU seconds, FLOPs)."""
        if self.mode == BudgetMode.TIME:
            return self.amount, False
        if self.mode == BudgetMode.CPU:
            return self.amount / (os.cpu_count() or 1), True
        return self.amount / CPU_FLOPS_PER_S, True
