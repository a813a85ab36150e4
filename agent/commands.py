"""What a user (the cockpit, the CLI, a test) can tell the engine: `engine.send(command)`, from any thread.

Each command returns at once and takes effect at the engine's next safe point; what it did is said in events.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.proposals import Proposal, Proposer


@dataclass(frozen=True)
class Pause:
    """Start nothing new; runs in flight finish (and are decided)."""


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class StopRun:
    """Kill the runs in flight now, record them as interrupted, and pause."""


@dataclass(frozen=True)
class Skip:
    """Drop what the user is looking at and go on: the proposal under review, else the newest run, else the
    proposal being thought of."""


@dataclass(frozen=True)
class Shutdown:
    """End the loop: runs in flight are killed, recorded as interrupted and re-queued."""


@dataclass(frozen=True)
class SetGate:
    """Hold each proposal for approve/edit/veto (on), or not; turning it off releases a waiting proposal."""

    on: bool


@dataclass(frozen=True)
class Approve:
    """Let the proposal under review run, or `edited` in its place (its edits apply to the same best)."""

    edited: Proposal | None = None


@dataclass(frozen=True)
class Veto:
    """Refuse the proposal under review; the reason goes back to the proposer."""

    reason: str


@dataclass(frozen=True)
class Override:
    """Force keep or discard of a decision (`exp_id` None: the last one); recorded with who decided."""

    status: str
    exp_id: int | None = None
    by: str = "user"


@dataclass(frozen=True)
class Reapply:
    """Queue a (discarded) experiment's change again, on top of the current best."""

    exp_id: int


@dataclass(frozen=True)
class ReloadProgram:
    """Read program.md again (the user edited it)."""


@dataclass(frozen=True)
class UseModel:
    """Switch the proposer's model between proposals."""

    name: str


@dataclass(frozen=True)
class SetProposer:
    """Take the proposals from another proposer from the next one on (the cockpit's random search)."""

    proposer: Proposer


@dataclass(frozen=True)
class SetTrainers:
    """Train on `trainers` slots, through Ray at `ray` ('local', 'auto', an ADDRESS; None: on this machine),
    once the runs in flight end (a setup that cannot start is reported and the old one kept)."""

    trainers: int
    ray: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trainers, int) or self.trainers < 1:
            raise ValueError(f"trainers must be a whole number of at least 1, not {self.trainers!r}")
        object.__setattr__(self, "ray", (self.ray or "").strip() or None)


Command = (
    Pause
    | Resume
    | StopRun
    | Skip
    | Shutdown
    | SetGate
    | Approve
    | Veto
    | Override
    | Reapply
    | ReloadProgram
    | UseModel
    | SetProposer
    | SetTrainers
)
