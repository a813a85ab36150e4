"""The thread-safe event sink the engine calls, drained by the app in batches (so a log flood stays cheap)."""

from __future__ import annotations

import threading
from collections import deque

from agent.events import Event, LogLine, StepMetric

HIGH_RATE = (LogLine, StepMetric)
"""Events that can arrive thousands of times a second; they are the ones dropped if the app falls behind."""


class EventBridge:
    """An `EventSink`: the engine thread appends, the app's timer drains everything pending at once.

    Nothing is posted per event: the app pulls a batch about ten times a second, so 2,000 log lines a
    second become ~200-line batches, one log write and one plot redraw each. If the app stalls, high-rate
    events beyond `max_pending` are counted and dropped (never the decisions), so memory stays bounded.
    """

    def __init__(self, max_pending: int = 50_000) -> None:
        self._pending: deque[Event] = deque()
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self.dropped = 0
        """High-rate events dropped because the app fell behind (since the last drain)."""
        self.received = 0

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.received += 1
            if len(self._pending) >= self.max_pending and isinstance(event, HIGH_RATE):
                self.dropped += 1
                return
            self._pending.append(event)

    def drain(self) -> tuple[list[Event], int]:
        """Everything pending, oldest first, and how many high-rate events were dropped since last time."""
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
            dropped, self.dropped = self.dropped, 0
        return events, dropped

    def __len__(self) -> int:
        return len(self._pending)
