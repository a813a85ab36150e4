"""The cockpit's footer: the keys of the screen in view, rebuilt only when they change."""

from __future__ import annotations

from tui.internals import SteadyFooter


class CockpitFooter(SteadyFooter):
    """The footer of every cockpit screen (see `tui.internals.SteadyFooter` for why it compares first)."""
