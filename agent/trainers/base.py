"""What a trainer is: `slots` places where one run each can train at a time, on this machine or elsewhere.

The engine hands a slot a `RunRequest` (which experiment, seed, train.py text and budget) and waits for the
`RunResult`; what a slot is, and how its machine contains and judges the run (`agent.sandbox`), does not matter
to it. The engine gets trainers from a `TrainerFactory` given by the code that builds it (`agent.session`), so
it never imports a backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from agent.events import EventSink
from agent.sandbox.spec import RunRequest, RunResult


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
    can_probe: bool
    """Whether a candidate's first run may be settled by a few seeded probe steps first (see
    `RunRequest.probe_against`)."""

    @property
    def containment(self) -> str:
        """How runs are contained: 'full', 'network' or 'none' (agent.sandbox.containment); '' when each node
        says for itself."""
        ...

    def run(
        self,
        slot: int,
        request: RunRequest,
        emit: EventSink,
        stop: threading.Event,
        on_start: Callable[[int], None] | None,
    ) -> RunResult:
        """Train `request` in slot `slot` (0 <= slot < slots) and return when it ends; `stop` kills it (outcome
        interrupted). Raises TrainerLost when the place it ran went away, PrepareError when no run can train
        there. `on_start(pid)` is called with a local process id, if the run has one on this machine (a remote
        run has none)."""
        ...

    def trial(self, request: RunRequest, stop: threading.Event) -> str | None:
        """Why `request`'s train.py crashes in the few probe steps its first run would start with (its error
        and the traceback's last lines), tried now for the proposer that wrote it; None when it trained them,
        or this trainer does not probe. `stop` ends the trial."""
        ...

    def reap(self, pid: int) -> bool:
        """Kill the run a killed engine left training here, if `pid` is still that run; whether it was."""
        ...

    def close(self) -> None: ...


TrainerFactory = Callable[[int, "str | None", EventSink], Trainer]
"""Makes the trainers for (slots, ray address or None: this machine, the engine's event sink)."""
