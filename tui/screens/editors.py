"""Built-in editors: program.md in place, and a proposal's train.py before approving it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static, TextArea

from tui.widgets.footer import CockpitFooter


class _EditorScreen(ModalScreen[str | None]):
    """A full-screen TextArea: Ctrl+S saves (returns the text), Escape cancels (returns None)."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, title: str, text: str) -> None:
        super().__init__()
        self._title = title
        self._text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="editor"):
            yield Static(self._title, classes="dialog-title", markup=False)
            # Plain text: highlighting would need the tree-sitter extra, not worth a dependency here.
            yield TextArea(self._text, show_line_numbers=True, id="editor", tab_behavior="indent")
        yield CockpitFooter()

    @property
    def editor(self) -> TextArea:
        return self.query_one(TextArea)

    def on_mount(self) -> None:
        self.editor.focus()

    def action_save(self) -> None:
        self.dismiss(self.editor.text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ProgramEditorScreen(_EditorScreen):
    """Edits program.md; the app saves it and asks the engine to reload it."""

    def __init__(self, text: str, path: str) -> None:
        super().__init__(f"program.md — {path}   (Ctrl+S save, Esc cancel)", text)


class ProposalEditorScreen(_EditorScreen):
    """Edits the train.py a proposal would produce; saving approves the edited version."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save and approve"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, exp_id: int, description: str, text: str) -> None:
        super().__init__(
            f"train.py as proposal #{exp_id} would make it: {description}   (Ctrl+S approve, Esc cancel)",
            text,
        )
