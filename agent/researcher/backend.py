"""What a researcher backend is: the protocol the proposer drives, the completion it gets back, its errors.

The in-process llama.cpp model (`local.LocalModel`) and a local server (`endpoint.EndpointModel`) both
implement it; neither imports the other, and the proposer needs nothing else of either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.researcher.prompt import Message


class ModelError(ValueError):
    """A model that cannot be found, assembled or loaded; the message says which and why."""


class GenerationCancelled(Exception):
    """The cancel event was set while the model was reading the prompt or writing."""

    def __init__(self, partial: str) -> None:
        super().__init__("cancelled")
        self.partial = partial


@dataclass(frozen=True)
class GenerationStats:
    """How one reply was made: what the KV cache saved and how fast each phase ran."""

    prompt_tokens: int
    reused_tokens: int
    """Prompt tokens whose KV cache entries were reused from the previous call (or the disk cache)."""
    prompt_seconds: float
    generated_tokens: int
    generate_seconds: float
    finish_reason: str
    """stop (end of reply), length (max_tokens reached)."""
    drafted_tokens: int = 0
    """Tokens guessed by prompt lookup and checked alongside the next one."""
    accepted_tokens: int = 0
    """Of those, the ones the model went on to sample: each saved a decode step."""

    @property
    def evaluated_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.evaluated_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generate_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    stats: GenerationStats


class Backend(Protocol):
    """Something that turns chat messages into a streamed JSON reply."""

    name: str
    n_ctx: int

    def count_tokens(self, text: str) -> int: ...

    def complete(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        on_text: Callable[[str], None],
        cancel: threading.Event,
    ) -> Completion: ...

    def remember(self) -> None:
        """A proposal succeeded: a good moment to persist the prompt cache."""

    def set_threads(self, threads: int) -> None:
        """Use this many CPU threads from now on (fewer while a training run shares the CPU)."""

    def close(self) -> None: ...
