"""What the cockpit needs of the engine (the Engine API in docs/contracts.md), as typing protocols."""

from __future__ import annotations

from typing import Protocol

from agent.commands import Command
from agent.events import EngineSnapshot
from agent.ledger import Experiment
from agent.proposals import Proposer


class LedgerLike(Protocol):
    """The read side of the experiment ledger."""

    def experiments(self) -> list[Experiment]: ...

    def get(self, exp_id: int) -> Experiment | None: ...


class EngineLike(Protocol):
    """The engine as the cockpit drives it: `send` takes every command, thread-safe, returning at once."""

    @property
    def ledger(self) -> LedgerLike: ...

    @property
    def proposer(self) -> Proposer:
        """Who proposes now (read to switch back to it after random search)."""
        ...

    @property
    def finished(self) -> bool: ...

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def send(self, command: Command) -> None: ...

    def snapshot(self) -> EngineSnapshot: ...

    def close(self) -> None: ...
