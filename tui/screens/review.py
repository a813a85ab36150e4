"""The review gate: a held proposal, to approve, edit then approve, or veto with a reason."""

from __future__ import annotations

from typing import Literal

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from tui.widgets.footer import CockpitFooter
from tui.widgets.proposal import diff_renderable

ReviewChoice = tuple[Literal["approve", "edit", "veto", "later"], str]
"""What the reviewer chose, with the veto reason (empty otherwise)."""


class ReviewScreen(ModalScreen[ReviewChoice]):
    """Shows a held proposal and its diff; the app carries out the choice."""

    BINDINGS = [
        Binding("a", "approve", "Approve"),
        Binding("e", "edit", "Edit, then approve"),
        Binding("v", "veto", "Veto…"),
        Binding("escape", "later", "Later"),
    ]

    def __init__(self, exp_id: int, description: str, diff: str, reasoning: str = "") -> None:
        super().__init__()
        self.exp_id = exp_id
        self.description = description
        self.diff = diff
        self.reasoning = reasoning

    def compose(self) -> ComposeResult:
        with Vertical(id="review", classes="dialog"):
            title = Text(f"Review proposal #{self.exp_id}\n", style="bold")
            title.append(self.description)
            yield Static(title, classes="dialog-title")
            with VerticalScroll(id="review-body"):
                if self.reasoning:
                    yield Static(Text(self.reasoning.strip(), style="italic grey70"), id="review-reasoning")
                yield Static(diff_renderable(self.diff), id="review-diff")
            yield Static(
                "[b]a[/b] approve · [b]e[/b] edit, then approve · [b]v[/b] veto with a reason · "
                "[b]Esc[/b] decide later ([b]r[/b] brings this back)",
                id="review-help",
            )
        yield CockpitFooter()

    def on_mount(self) -> None:
        self.query_one("#review-body").focus()

    def action_approve(self) -> None:
        self.dismiss(("approve", ""))

    def action_edit(self) -> None:
        self.dismiss(("edit", ""))

    def action_veto(self) -> None:
        from tui.screens.dialogs import VetoScreen

        def vetoed(reason: str | None) -> None:
            if reason:
                self.dismiss(("veto", reason))

        self.app.push_screen(VetoScreen(self.exp_id, self.description), vetoed)

    def action_later(self) -> None:
        self.dismiss(("later", ""))
