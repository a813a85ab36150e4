"""A footer that rebuilds its keys only when the keys shown change (not on every focus move)."""

from __future__ import annotations

from typing import Any

from textual.screen import Screen
from textual.widgets import Footer


class CockpitFooter(Footer):
    """Textual's Footer recomposes all its keys whenever the focus moves; that restyles a dozen widgets
    (tens of ms on a busy CPU) even when the keys shown are the same. This one compares first."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: tuple[tuple[str, str, str, bool], ...] | None = None

    def bindings_changed(self, screen: Screen[Any]) -> None:
        shown = tuple(
            (key, binding.action, binding.description, enabled)
            for key, (_node, binding, enabled, _tooltip) in screen.active_bindings.items()
            if binding.show or key == screen.app.COMMAND_PALETTE_BINDING
        )
        if shown == self._shown and self._bindings_ready:
            return
        self._shown = shown
        super().bindings_changed(screen)
