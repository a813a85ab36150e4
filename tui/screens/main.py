"""The main screen: header, the four panes (a grid when there is room, tabs in 80x24), footer."""

from __future__ import annotations

from textual import events, on
from textual.app import ComposeResult
from textual.containers import Container
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Tab, Tabs

from tui.internals import QuietFocusScreen
from tui.widgets import CockpitHeader, LivePane, ProgressGains, ProgressPlot, ProposalPane, Timeline
from tui.widgets.footer import CockpitFooter

PANES = (
    ("timeline", "1 Timeline"),
    ("live", "2 Live run"),
    ("proposal", "3 Proposal"),
    ("progress", "4 Progress"),
)
"""Pane id suffix and tab label, in tab order."""

PANE_TITLES = {"timeline": "Timeline", "live": "Live run", "proposal": "Proposal", "progress": "Progress"}
"""Pane id suffix and the title on its border."""

FOCUSED_TITLE_STYLE = "bold reverse $accent"
"""The title of the pane that holds the focus."""

WIDE_MIN = (120, 34)
"""Below this many columns or rows, the panes collapse into tabs."""


class MainScreen(QuietFocusScreen[None]):
    """Everything at a glance; typed accessors for the panes.

    A focus move does not repaint the whole screen (`tui.internals.QuietFocusScreen`): the widgets that gain
    or lose focus repaint themselves, and the panes holding them retitle themselves (`watch_focused`).
    """

    AUTO_FOCUS = "#timeline"

    def __init__(self) -> None:
        super().__init__()
        self._active = "timeline"

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
                yield ProgressGains(id="progress-gains")
                yield ProgressPlot(id="progress")
        yield CockpitFooter(compact=True)

    def watch_focused(self, blurred: Widget | None, focused: Widget | None) -> None:
        # The focused pane shows in its title, set here rather than by a `.pane:focus-within` rule: Textual
        # re-applies the stylesheet to the whole subtree of a pane with such a rule on every focus move,
        # which clears every render cache in it (the timeline, the plot), a frame of tens of ms.
        for widget in (blurred, focused):
            if widget is not None and widget.is_attached:
                widget.refresh()
        gained = self._pane_of(focused)
        lost = self._pane_of(blurred)
        if lost is not None and lost is not gained:
            self._title_pane(lost, focused=False)
        if gained is not None:
            self._title_pane(gained, focused=True)

    @staticmethod
    def _pane_of(widget: Widget | None) -> Widget | None:
        if widget is None or not widget.is_attached:
            return None
        for ancestor in widget.ancestors:
            if isinstance(ancestor, Widget) and ancestor.has_class("pane"):
                return ancestor
        return None

    @staticmethod
    def _title_pane(pane: Widget, focused: bool) -> None:
        title = PANE_TITLES[(pane.id or "").removeprefix("pane-")]
        # Setting the title repaints the pane; the render caches of the widgets in it survive.
        pane.border_title = Content.styled(title, FOCUSED_TITLE_STYLE) if focused else title

    def on_mount(self) -> None:
        for key in PANE_TITLES:
            self._title_pane(self.query_one(f"#pane-{key}"), focused=False)
        if (pane := self._pane_of(self.focused)) is not None:
            self._title_pane(pane, focused=True)
        self._layout_for(self.size.width, self.size.height)

    def on_resize(self, event: events.Resize) -> None:
        self._layout_for(event.size.width, event.size.height)

    def _layout_for(self, width: int, height: int) -> None:
        narrow = width < WIDE_MIN[0] or height < WIDE_MIN[1]
        if narrow and not self.narrow:
            self._mark_active(self._active)
        self.set_class(narrow, "-narrow")

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
    def gains(self) -> ProgressGains:
        return self.query_one(ProgressGains)

    @property
    def active_pane(self) -> str:
        """The pane shown when collapsed into tabs (and focused last when not)."""
        return self._active

    def show_pane(self, key: str) -> None:
        """Bring a pane forward: its tab when narrow, and focus whatever it holds."""
        self._active = key
        if self.narrow:
            # Only then: in the grid, a tab or class change would cost a full relayout for nothing.
            self.query_one(Tabs).active = f"tab-{key}"
            self._mark_active(key)
        self._focus(key)

    @on(Tabs.TabActivated)
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tab.id and self.narrow:
            key = event.tab.id.removeprefix("tab-")
            self._active = key
            self._mark_active(key)
            self._focus(key)

    def _mark_active(self, key: str) -> None:
        self.query_one(Tabs).active = f"tab-{key}"
        for pane_key, _ in PANES:
            self.query_one(f"#pane-{pane_key}").set_class(pane_key == key, "-active")

    def _focus(self, key: str) -> None:
        if key == "timeline":
            self.timeline.focus()
        elif key == "live":
            self.live.log_view.focus()
        elif key == "proposal":
            self.proposal.focus()
