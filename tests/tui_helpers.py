"""Helpers for the cockpit's tests: run async Pilot scenarios without an asyncio pytest plugin, await conditions."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec

P = ParamSpec("P")


def async_test(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an async test function in a fresh event loop."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


async def wait_until(pilot: Any, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Let the app run until `condition()` holds; fail saying `what` did not happen within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")
        await pilot.pause(0.1)
