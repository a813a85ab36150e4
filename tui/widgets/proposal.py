"""The proposal pane: the model's streamed reasoning, then the highlighted diff; or a past experiment's record."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tui import format as fmt
from tui.state import ExperimentRow, ProposalView

PHASE_WORDS = {
    "idle": "no proposal yet",
    "thinking": "thinking…",
    "ready": "ready",
    "review": "waiting for your review (r)",
    "rejected": "rejected",
}


DIFF_STYLES = (
    ("+++", "bold"),
    ("---", "bold"),
    ("@@", "cyan"),
    ("+", "green"),
    ("-", "red"),
)
"""Style of a diff line by its prefix (first match wins); other lines are context."""


def diff_renderable(diff: str) -> RenderableType:
    """A unified diff with added lines green, removed red, hunk headers cyan (readable in 256 colours)."""
    if not diff.strip():
        return Text("(no diff)", style="grey62")
    text = Text()
    for line in diff.rstrip("\n").split("\n"):
        style = next((style for prefix, style in DIFF_STYLES if line.startswith(prefix)), "")
        text.append(line + "\n", style=style)
    text.rstrip()
    return text


def proposal_renderables(view: ProposalView) -> tuple[Text, RenderableType, RenderableType]:
    """Title, reasoning and diff of the live proposal."""
    title = Text()
    who = view.model or view.proposer or "proposer"
    title.append("Proposal", style="bold")
    if view.exp_id is not None:
        title.append(f" #{view.exp_id}", style="bold")
    title.append(f" · {who} · {PHASE_WORDS.get(view.phase, view.phase)}", style="grey62")
    if view.description:
        title.append(f"\n{view.description}", style="bold")
    if view.phase == "rejected" and view.reason:
        title.append(f"\n{view.reason}", style="magenta")
    reasoning: RenderableType = Text(view.reasoning, style="italic") if view.reasoning else Text("")
    diff: RenderableType = diff_renderable(view.diff) if view.diff else Text("")
    return title, reasoning, diff


def detail_renderables(row: ExperimentRow, best: float | None) -> tuple[Text, RenderableType, RenderableType]:
    """Title and numbers, diff, and log tail of a past experiment."""
    title = Text()
    title.append(f"Experiment #{row.exp_id} ", style="bold")
    title.append_text(fmt.status_text(row.status, row.decided_by))
    title.append("   (Esc: back to the live proposal)", style="grey62")
    title.append(f"\n{row.description}", style="bold")
    numbers = [
        ("val_bpb", fmt.bpb(row.val_bpb)),
        ("Δ best", fmt.delta(None if row.val_bpb is None or best is None else row.val_bpb - best).plain),
        ("time", fmt.seconds(row.seconds)),
        ("peak memory", "—" if row.peak_memory_mb is None else f"{row.peak_memory_mb:.0f} MB"),
        ("by", row.proposer or "—"),
        ("model", row.model or "—"),
        ("decided by", row.decided_by),
    ]
    title.append("\n" + "  ".join(f"{name} {value}" for name, value in numbers), style="grey70")
    if row.reason:
        title.append(f"\n{row.reason}", style="italic")
    tail: RenderableType = (
        Group(Text("log tail", style="bold underline"), Text(row.log_tail.rstrip("\n"), style="grey70"))
        if row.log_tail
        else Text("")
    )
    return title, diff_renderable(row.diff), tail


class ProposalPane(VerticalScroll):
    """The proposal in the making, or the record of a selected experiment."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.detail_id: int | None = None
        """The experiment shown instead of the live proposal, if any."""

    def compose(self) -> ComposeResult:
        yield Static(id="proposal-title")
        yield Static(id="proposal-reasoning")
        yield Static(id="proposal-diff")
        yield Static(id="proposal-extra")

    def show_proposal(self, view: ProposalView) -> None:
        """The live proposal; the view follows the bottom only while the user is there."""
        if self.detail_id is not None:
            return
        follow = self.is_vertical_scroll_end
        title, reasoning, diff = proposal_renderables(view)
        self.query_one("#proposal-title", Static).update(title)
        self.query_one("#proposal-reasoning", Static).update(reasoning)
        self.query_one("#proposal-diff", Static).update(diff)
        self.query_one("#proposal-extra", Static).update("")
        if follow:
            self.call_after_refresh(self.scroll_end, animate=False)

    def show_detail(self, row: ExperimentRow, best: float | None) -> None:
        self.detail_id = row.exp_id
        title, diff, tail = detail_renderables(row, best)
        self.query_one("#proposal-title", Static).update(title)
        self.query_one("#proposal-reasoning", Static).update("")
        self.query_one("#proposal-diff", Static).update(diff)
        self.query_one("#proposal-extra", Static).update(tail)
        self.scroll_home(animate=False)

    def back_to_live(self, view: ProposalView) -> None:
        self.detail_id = None
        self.show_proposal(view)
