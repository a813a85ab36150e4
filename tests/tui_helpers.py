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


async def quit_app(pilot: Any, timeout: float = 60.0) -> None:
    """Quit as the user does (q, then confirm) and wait until the app has exited.

    The confirmation is sent as an action: a key press that ends the app would leave Pilot waiting for a
    screen that no longer processes messages.
    """
    from tui.screens import QuitScreen

    app = pilot.app
    await pilot.press("q")
    assert isinstance(app.screen, QuitScreen)
    await app.screen.run_action("quit_now")
    deadline = time.monotonic() + timeout
    while app.return_code is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"the app did not exit within {timeout:.0f} s of quitting")
        await asyncio.sleep(0.1)
