"""Helpers for the cockpit's tests: run async Pilot scenarios without an asyncio pytest plugin, await conditions,
record notifications, stand in for the engine."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec

from textual.message import Message
from textual.notifications import Notify

from agent.commands import Command
from agent.events import EngineSnapshot, EngineState
from agent.ledger import Experiment
from agent.proposals import Proposer, model_name

P = ParamSpec("P")


def async_test(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an async test function in a fresh event loop."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


async def wait_until(
    pilot: Any, condition: Callable[[], bool], timeout: float, what: str, explain: Callable[[], object] = str
) -> None:
    """Let the app run until `condition()` holds; fail saying `what` did not happen within `timeout` s, and
    what `explain()` says of the app then (what it told the user, say: a flaky wait needs it to be understood)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}; {explain()}")
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


class Notifications:
    """What the app told the user: every `notify`, caught as Textual delivers it. Pass it to
    `app.run_test(message_hook=...)`; it sees every notification, even one that has already timed out."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: Message) -> None:
        if isinstance(message, Notify):
            self.messages.append(message.notification.message)

    def said(self, text: str) -> bool:
        """Whether some notification contains `text`."""
        return any(text in said for said in self.messages)


class _NoLedger:
    def experiments(self) -> list[Experiment]:
        return []

    def get(self, exp_id: int) -> Experiment | None:
        return None


class RecordingEngine:
    """An engine that records the commands the cockpit sends and does nothing with them (tui.protocols.EngineLike).

    A cockpit test checks what is sent; what each command does is tested on the real engine
    (tests/test_scheduler.py, tests/test_ray_trainers.py, tests/test_tui_engine.py).
    """

    def __init__(self, proposer: Proposer) -> None:
        self.sent: list[Command] = []
        self.proposer = proposer
        self.ledger = _NoLedger()
        self.finished = True

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def send(self, command: Command) -> None:
        self.sent.append(command)

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            state=EngineState.IDLE,
            workspace=Path("ws"),
            branch="autoresearch/test",
            model=model_name(self.proposer),
            device="cpu",
            budget="60 s",
            n_experiments=0,
            baseline_bpb=None,
            best_bpb=None,
            best_exp_id=None,
            margin=None,
            review_gate=False,
        )

    def close(self) -> None:
        pass


async def open_model_picker(pilot: Any, app: Any) -> None:
    """Press `m` and wait until the model picker shows its choices."""
    from tui.screens import ModelPickerScreen

    await pilot.press("m")
    await wait_until(
        pilot,
        lambda: isinstance(app.screen, ModelPickerScreen) and app.screen.choices is not None,
        30,
        "the model picker",
    )


class SwitchingEngine:
    """Records the commands the cockpit sends; its proposer is a model proposer named model-b."""

    def __init__(self) -> None:
        from agent.researcher.ideas import IdeaQueue

        self.proposer = IdeaQueue([])
        self.proposer.model_name = "model-b"
        self.calls: list[Command] = []

    def send(self, command: Command) -> None:
        self.calls.append(command)
