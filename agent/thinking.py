"""The proposer's thread: one proposal at a time, cancellable, reported to the engine's inbox; and the wait
before asking a failing proposer (a local server down, slow or failing) again.

The engine decides when to ask; `Thinking` asks on a thread of its own and answers with `Proposed`. A
proposer that raises is asked again after 2 s, then after twice as long each time, at most 60 s, and once it
has failed for PAUSE_AFTER_S the engine pauses and says why.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from agent.events import EventSink, ProposalStarted, ProposerWaiting
from agent.proposals import Proposal, ProposalContext, ProposalFailed, Proposer, model_name

RETRY_S = (2.0, 60.0)
"""The first wait before a failing proposer is asked again, and the longest."""
PAUSE_AFTER_S = 300.0
"""How long a proposer may fail before the engine pauses and says why."""


@dataclass(frozen=True)
class Proposed:
    """The proposer thread's answer: a proposal, None (no more ideas), or how it failed."""

    base_commit: str
    """The best commit the proposer saw."""
    proposal: Proposal | None = None
    failed: ProposalFailed | None = None
    error: Exception | None = None
    detail: str = ""
    cancelled: bool = False
    """Dropped by the user (skip, stop) or the engine is stopping: not the proposer's failure."""


class Thinking:
    """At most one proposal being thought of; `report` takes the answer (the engine's inbox)."""

    def __init__(self, emit: EventSink, report: Callable[[Proposed], None]) -> None:
        self._emit, self._report = emit, report
        self._cancel: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._failing_since = 0.0
        self.retry_at = 0.0
        """Not before this (monotonic) time: a failing proposer is being waited for."""

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, proposer: Proposer, context: ProposalContext, base_commit: str) -> None:
        """Ask `proposer` for one proposal on `context` (made on the best `base_commit`)."""
        cancel = threading.Event()
        thread = threading.Thread(
            target=self._think,
            args=(proposer, context, base_commit, cancel),
            name="autoresearch-proposer",
            daemon=True,
        )
        self._cancel, self._thread = cancel, thread
        self._emit(ProposalStarted(proposer=proposer.name, model=model_name(proposer)))
        thread.start()

    def _think(
        self, proposer: Proposer, context: ProposalContext, base: str, cancel: threading.Event
    ) -> None:
        try:
            proposal = proposer.propose(context, self._emit, cancel)
        except ProposalFailed as exc:
            self._report(Proposed(base, failed=exc, cancelled=cancel.is_set()))
        except Exception as exc:
            detail = traceback.format_exc()
            self._report(Proposed(base, error=exc, detail=detail, cancelled=cancel.is_set()))
        else:
            # A model cancelled mid-reply returns None, which must not read as "no more proposals".
            self._report(Proposed(base, proposal=proposal, cancelled=cancel.is_set()))

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def answered(self, message: Proposed) -> None:
        """The thread has answered: it ends (the proposer is free); a proposer that answered is not failing."""
        thread, self._thread, self._cancel = self._thread, None, None
        if thread is not None:
            thread.join(timeout=5)
        if message.error is None:
            self._failures = 0

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_longer(self, exc: Exception) -> float | None:
        """The proposer raised: seconds until it is asked again (said), or None when it has failed for
        PAUSE_AFTER_S (the engine pauses: nothing is recorded, and the count starts again)."""
        now = time.monotonic()
        self._failures += 1
        if self._failures == 1:
            self._failing_since = now
        failing_for = now - self._failing_since
        if failing_for >= PAUSE_AFTER_S:
            self._failures = 0
            return None
        first, longest = RETRY_S
        delay = min(longest, first * 2 ** (self._failures - 1))
        reason = str(exc) or type(exc).__name__
        self._emit(
            ProposerWaiting(
                reason=reason, retry_in_s=delay, failures=self._failures, failing_for_s=failing_for
            )
        )
        self.retry_at = now + delay
        return delay

    @property
    def failing_for(self) -> float:
        return time.monotonic() - self._failing_since
