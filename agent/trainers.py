"""Where runs train: trainer slots on this machine, or tasks on a Ray cluster (agent.ray_trainers).

The engine's scheduler hands each slot a `RunSpec` (with the candidate's train.py in `train_source`) and waits
for the `RunResult`; what a slot is does not matter to it. Every slot runs the same sandboxed runner
(`agent.runner.run_training`: scratch folder, containment, the judge).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from agent.containment import Containment
from agent.events import EventSink
from agent.runner import RunResult, RunSpec, WarmJudge, run_training


class TrainerLost(Exception):
    """The run's worker or node went away (not the code's fault): the run is recorded interrupted and its
    experiment re-queued. `system_retries` counts the retries the cluster made before giving up."""

    def __init__(self, reason: str, system_retries: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.system_retries = system_retries


class Trainer(Protocol):
    """A set of `slots` places where one run each can train at a time."""

    slots: int
    description: str
    """For the header and the log: "1 local trainer", "4 Ray trainers at 127.0.0.1:6379"."""

    def run(
        self,
        slot: int,
        spec: RunSpec,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None,
    ) -> RunResult:
        """Train `spec` in slot `slot` (0 <= slot < slots) and return when it ends; `stop` kills it (outcome
        interrupted). Raises TrainerLost when the place it ran went away. `on_start(pid)` is called with a
        local process id, if the run has one on this machine (a remote run has none)."""
        ...

    def close(self) -> None: ...


class LocalTrainers:
    """`slots` runs at a time on this machine; on CUDA with several GPUs, slot i sees only GPU i."""

    def __init__(
        self,
        slots: int,
        containment: Callable[[], Containment | None],
        judge: Callable[[], WarmJudge | None],
        gpus: int = 0,
    ) -> None:
        if slots < 1:
            raise ValueError("at least one trainer")
        self.slots = slots
        self.gpus = gpus
        self._containment = containment
        self._judge = judge
        self.description = f"{slots} local trainer{'s' if slots > 1 else ''}"

    def run(
        self,
        slot: int,
        spec: RunSpec,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None,
    ) -> RunResult:
        if self.slots > 1 and self.gpus > 1:
            spec = replace(spec, env={**spec.env, "CUDA_VISIBLE_DEVICES": str(slot % self.gpus)})
        return run_training(
            spec, emit, stop=stop, on_start=on_start, containment=self._containment(), judge=self._judge()
        )

    def close(self) -> None:
        pass
