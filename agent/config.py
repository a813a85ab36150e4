"""The engine's typed configuration and a cheap guess at the training device."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from agent.budget import Budget


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs experiments; every field has a default that suits a CPU laptop."""

    budget: Budget | None = None
    """Each run's training budget; None: what the workspace's baseline was measured with, else the harness
    default (60 wall seconds on CPU, 300 on CUDA). Settled before the engine is built (`agent.session`)."""
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
    noise_record: Path | None = None
    """The machine's record of measured baseline noise (`known_noise`) that floors a session's margin and gets its
    own; None: not kept (the command line and the cockpit keep it in the user's cache)."""
    confirm_marginal: bool = True
    """Rerun a marginal win (between 1x and 2x the margin) with another seed before keeping it."""
    eval_s: float | None = None
    """Seconds allowed beyond the training budget for start-up, data loading, compilation and the final
    evaluation; None is 60 on CPU and 240 on CUDA (torch.compile of a new model can take minutes)."""
    warm_judge: bool = True
    """Keep one judge process warm (torch and the harness imported once, a forked child per model) instead of
    starting one per run: about 2 s less per experiment."""
    handover_s: float | None = None
    """The most seconds a run may take, once its wall or CPU budget is spent, to stop, export its model and exit
    before it is killed as over budget; None is 10 on CPU and 60 on CUDA. The baseline gets all of it; later
    runs get twice what the baseline took, at least 2 s (`agent.sandbox.spec.handover_window`): whatever a run
    trains in that window is unpaid."""
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
    """Before a candidate trains, run it for a few seeded steps (agent.sandbox.probe) and compare the model's
    fingerprint with its parent's: a no-op is recorded as such instead of trained, a crash costs seconds.
    None: on for local CPU runs, off on CUDA (each probe would pay torch.compile) and with Ray. The static
    check (same syntax tree) always runs."""
    promote: tuple[float, ...] | None = None
    """Promotion rungs, as factors of the budget (`agent.promotion`; (4.0,) is '4x'): each keep trained again at
    each, with its parent, to say whether it transfers. A workspace setting: None keeps the workspace's, () ends it."""
    promote_share: float = 0.25
    """The share of the trainers' time promotion may take while experiments wait for a slot (so that verdicts
    come during a session that never ends, as the cockpit's); besides, it takes the slots no experiment wants (no
    proposal waiting or being thought of) and finishes at the session's end. At 0 it waits for those."""
    overlap: bool | None = None
    """Propose the next experiment while runs train; None: on with CUDA, off on CPU (a run beside the model
    loses 30-37 % of its steps, a handicap under a wall budget: bench/bench_overlap.py, the README)."""


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
