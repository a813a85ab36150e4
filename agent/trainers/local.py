"""Trainer slots on this machine: every slot runs in the same `Sandbox` (one containment probe, one warm judge,
the data prepared once); on CUDA with several GPUs, slot i sees only GPU i."""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.events import EventSink
from agent.sandbox.process import kill_stale_run
from agent.sandbox.sandbox import Sandbox
from agent.sandbox.spec import RunRequest, RunResult


class LocalTrainers:
    """`slots` runs at a time on this machine."""

    def __init__(self, slots: int, sandbox: Sandbox, gpus: int = 0) -> None:
        if slots < 1:
            raise ValueError("at least one trainer")
        self.slots = slots
        self.sandbox = sandbox
        self.gpus = gpus
        self.can_probe = sandbox.can_probe
        self.description = f"{slots} local trainer{'s' if slots > 1 else ''}"

    @property
    def containment(self) -> str:
        return self.sandbox.containment.level

    def run(
        self,
        slot: int,
        request: RunRequest,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None,
    ) -> RunResult:
        env = {"CUDA_VISIBLE_DEVICES": str(slot % self.gpus)} if self.slots > 1 and self.gpus > 1 else None
        return self.sandbox.run(request, emit, stop, on_start, env=env)

    def trial(self, request: RunRequest, stop: threading.Event) -> str | None:
        if not self.can_probe:
            return None
        found = self.sandbox.trial(request, stop)
        return found.crash_lines() if found.settles else None

    def reap(self, pid: int) -> bool:
        return kill_stale_run(pid, self.sandbox.scratch_root)

    def close(self) -> None:
        self.sandbox.close()
