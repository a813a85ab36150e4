"""The engine's typed configuration, the budget's reading and a cheap guess at the training device."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_BUDGET = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|sec|seconds|cpu|cpus|flops)?\s*$", re.IGNORECASE
)
"""The harness's budget grammar (nanogpt/prepare.py): '60', '60s', '60 seconds', '120cpu', '2.5e12flops'."""
CPU_FLOPS_PER_S = 2.9e12 / 60.0
"""nanogpt/prepare.py's DEFAULT_CPU_FLOPS is sized for 60 s: a rough FLOPs-to-seconds rate (a test keeps them
equal; the engine reads it here so that it never imports torch)."""
DEFAULT_CPU_WALL_SECONDS = 60.0
"""The harness's CPU default: 60 wall seconds (kept equal to prepare.py by a test)."""
DEFAULT_CUDA_SECONDS = 300.0


@dataclass
class EngineConfig:
    """How the engine runs experiments; every field has a default that suits a CPU laptop."""

    budget: str | None = None
    """AUTORESEARCH_BUDGET for each run: '60' (wall seconds), '120cpu' (CPU seconds) or '2.5e12flops'; None is
    the harness default (60 wall seconds on CPU, 300 on CUDA)."""
    seeds: int | None = None
    """K, the number of baseline runs (different seeds) that measure the noise floor; None: 3 on CPU, 2 on CUDA."""
    max_experiments: int | None = None
    """Stop after this many proposals (the baseline not counted); None runs until the proposer runs dry."""
    review_gate: bool = False
    """Hold every proposal until the user approves, edits or vetoes it."""
    base_seed: int = 1
    """Seed of a candidate's run and of the first baseline run; baseline run i uses base_seed + i."""
    min_margin: float = 0.002
    """The smallest margin (bpb) a candidate must win by, however quiet the measured noise."""
    default_margin: float = 0.01
    """The margin (bpb) when the noise cannot be measured (a single baseline run)."""
    confirm_marginal: bool = True
    """Rerun a marginal win (between 1x and 2x the margin) with another seed before keeping it."""
    eval_s: float | None = None
    """Seconds allowed beyond the training budget for start-up, data loading, compilation and the final
    evaluation; None is 60 on CPU and 240 on CUDA (torch.compile of a new model can take minutes)."""
    warm_judge: bool = True
    """Keep one judge process warm (torch and the harness imported once, a forked child per model) instead of
    starting one per run: about 2 s less per experiment."""
    handover_s: float | None = None
    """Seconds a run may take, once its wall or CPU budget is spent, to stop, export its model and exit before
    it is killed as over budget; None is 10 on CPU and 60 on CUDA. Whatever it trains in that window is
    unpaid, so keep it short."""
    grace_s: float = 30.0
    """Further seconds before a run is killed as a timeout."""
    compute_budget_factor: float = 3.0
    """A FLOPs (or default) budget's estimated training seconds are multiplied by this for the deadline."""
    deadline_s: float | None = None
    """A fixed hard deadline per run in seconds, overriding the computed one (tests use it)."""
    memory_mb: int | None = None
    """Resident-memory cap of a run's process group; None is 80% of the machine's RAM."""
    address_space_mb: int | None = None
    """RLIMIT_AS of the run; None is twice the RAM (off where CUDA is present: it reserves huge address ranges)."""
    log_cap_bytes: int = 4 * 1024 * 1024
    """The most bytes of a run's output stored in run.log; a flood is truncated, keeping head and tail."""
    network: bool = False
    """Allow the run network access (by default it runs in a new, empty network namespace)."""
    python: str | None = None
    """The interpreter that runs train.py; None is the engine's own."""
    trainers: int = 1
    """How many runs train at once (trainer slots: local, one per GPU, or Ray tasks with `ray`)."""
    ray: str | None = None
    """Run each training as a Ray task: 'local' (a Ray instance started here, bound to 127.0.0.1), 'auto' or a
    cluster ADDRESS (Ray's own meaning); None trains on this machine without Ray."""
    probe: bool | None = None
    """Before a candidate trains, run it for a few seeded steps (agent.noop.probe) and compare the model's
    fingerprint with its parent's: a no-op is recorded as such instead of trained, a crash costs seconds.
    None: on for local CPU runs, off on CUDA (each probe would pay torch.compile) and with Ray. The static
    check (same syntax tree) always runs."""
    overlap: bool | None = None
    """Propose the next experiment while runs train; None: on with CUDA, off on CPU (a run beside the model
    loses 30-37 % of its steps, a handicap under a wall budget: bench/bench_overlap.py, the README)."""


def _parse(budget: str) -> tuple[str, float] | None:
    match = _BUDGET.match(budget)
    if not match or float(match.group(1)) <= 0:
        return None
    unit = (match.group(2) or "s").lower()
    mode = {"flops": "flops", "cpu": "cpu", "cpus": "cpu"}.get(unit, "time")
    return mode, float(match.group(1))


def resolve_budget(budget: str | None, device: str) -> tuple[str, float]:
    """The budget a run gets, as (mode, amount): 'time' seconds, 'cpu' seconds or 'flops'; None is the
    harness default for the device (300 wall seconds on CUDA, 60 on CPU)."""
    parsed = _parse(budget) if budget else None
    if parsed is not None:
        return parsed
    if device.startswith("cuda"):
        return "time", DEFAULT_CUDA_SECONDS
    return "time", DEFAULT_CPU_WALL_SECONDS


def budget_seconds(budget: str | None) -> float | None:
    """The training seconds of a time budget, or None for a CPU-seconds or FLOPs budget or the default."""
    parsed = _parse(budget) if budget else None
    return parsed[1] if parsed and parsed[0] == "time" else None


def check_budget(budget: str) -> str:
    """Return `budget` if it is a valid AUTORESEARCH_BUDGET, else raise ValueError saying what is valid."""
    if _parse(budget) is None:
        raise ValueError(
            f"budget {budget!r} is not understood: use wall seconds (60, 60s), CPU seconds (120cpu) "
            "or FLOPs (2.5e12flops)"
        )
    return budget.strip()


def describe_budget(budget: str | None, device: str | None = None) -> str:
    """A human-readable budget ('60 s', '120 CPU s', '2.50e+12 FLOPs') without importing the harness; the
    default is named as what it is on `device` when given, else 'harness default'."""
    parsed = _parse(budget) if budget else None
    if parsed is None and device is not None and not budget:
        parsed = resolve_budget(None, device)
    if parsed is None:
        return budget or "harness default"
    mode, amount = parsed
    if mode == "time":
        return f"{amount:g} s"
    return f"{amount:g} CPU s" if mode == "cpu" else f"{amount:.2e} FLOPs"


def estimate_training_seconds(budget: str | None, device: str) -> tuple[float, bool]:
    """Rough wall seconds of a budget, and whether that is only an estimate (CPU seconds, FLOPs)."""
    mode, amount = resolve_budget(budget, device)
    if mode == "time":
        return amount, False
    if mode == "cpu":
        return amount / (os.cpu_count() or 1), True
    return amount / CPU_FLOPS_PER_S, True


@lru_cache(maxsize=1)
def detect_device() -> str:
    """'cuda: <name>' when an NVIDIA GPU is visible, else 'cpu (<n> cores)'; never imports torch."""
    if Path("/dev/nvidiactl").exists() and (smi := shutil.which("nvidia-smi")):
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            if out:
                return f"cuda: {out.splitlines()[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
        return "cuda"
    return f"cpu ({os.cpu_count() or 1} cores)"


def default_seeds(device: str) -> int:
    """K when not configured: 3 baseline runs on CPU (short runs), 2 on CUDA (five-minute runs)."""
    return 2 if device.startswith("cuda") else 3
