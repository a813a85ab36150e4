"""The main screen: header, the four panes (a grid when there is room, tabs in 80x24), footer."""

from __future__ import annotations

from textual import events, on
from textual.app import ComposeResult
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import Tab, Tabs

from tui.widgets import CockpitHeader, LivePane, ProgressPlot, ProposalPane, Timeline
from tui.widgets.footer import CockpitFooter

PANES = (
    ("timeline", "1 Timeline"),
    ("live", "2 Live run"),
    ("proposal", "3 Proposal"),
    ("progress", "4 Progress"),
)
"""Pane id suffix and tab label, in tab order."""

WIDE_MIN = (120, 34)
"""Below this many columns or rows, the panes collapse into tabs."""


class MainScreen(Screen[None]):
    """Everything at a glance; typed accessors for the panes."""

    def compose(self) -> ComposeResult:
        yield CockpitHeader(id="header")
        yield Tabs(*(Tab(label, id=f"tab-{key}") for key, label in PANES), id="pane-tabs")
        with Container(id="panes"):
            with Container(id="pane-timeline", classes="pane -active"):
                yield Timeline(id="timeline")
            with Container(id="pane-live", classes="pane"):
                yield LivePane(id="live")
            with Container(id="pane-proposal", classes="pane"):
                yield ProposalPane(id="proposal")
            with Container(id="pane-progress", classes="pane"):
                yield ProgressPlot(id="progress")
        yield CockpitFooter(compact=True)

    def on_mount(self) -> None:
        titles = {"timeline": "Timeline", "live": "Live run", "proposal": "Proposal", "progress": "Progress"}
        for key, title in titles.items():
            self.query_one(f"#pane-{key}").border_title = title
        self._layout_for(self.size.width, self.size.height)

    def on_resize(self, event: events.Resize) -> None:
        self._layout_for(event.size.width, event.size.height)

    def _layout_for(self, width: int, height: int) -> None:
        self.set_class(width < WIDE_MIN[0] or height < WIDE_MIN[1], "-narrow")

    @property
    def narrow(self) -> bool:
        """Whether the panes are collapsed into tabs."""
        return self.has_class("-narrow")

    @property
    def header(self) -> CockpitHeader:
        return self.query_one(CockpitHeader)

    @property
    def timeline(self) -> Timeline:
        return self.query_one(Timeline)

    @property
    def live(self) -> LivePane:
        return self.query_one(LivePane)

    @property
    def proposal(self) -> ProposalPane:
        return self.query_one(ProposalPane)

    @property
    def progress(self) -> ProgressPlot:
        return self.query_one(ProgressPlot)

    @property
    def active_pane(self) -> str:
        """The pane shown when collapsed into tabs."""
        active = self.query_one(Tabs).active
        return active.removeprefix("tab-") if active else "timeline"

    def show_pane(self, key: str) -> None:
        """Bring a pane forward: its tab when narrow, and focus whatever it holds."""
        self.query_one(Tabs).active = f"tab-{key}"
        self._activate(key)

    @on(Tabs.TabActivated)
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tab.id:
            self._activate(event.tab.id.removeprefix("tab-"))

    def _activate(self, key: str) -> None:
        for pane_key, _ in PANES:
            self.query_one(f"#pane-{pane_key}").set_class(pane_key == key, "-active")
        if key == "timeline":
            self.timeline.focus()
        elif key == "live":
            self.live.log_view.focus()
        elif key == "proposal":
            self.proposal.focus()
