"""The model picker: the registry of local models, with size and where each was found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from agent.researcher.optuna_search import SAMPLERS, shown_name
from agent.researcher.random_search import MODEL_NAME
from tui import format as fmt
from tui.widgets.footer import CockpitFooter


@dataclass(frozen=True)
class ModelChoice:
    """One row of the picker."""

    name: str
    size: int | None
    quantisation: str
    where: str
    usable: bool = True
    note: str = ""
    default: bool = False


def choice_from_entry(entry: Any) -> ModelChoice:
    """A ModelChoice from an `agent.researcher.models.ModelEntry` (read by attribute)."""
    info = getattr(entry, "info", None)
    embedded = getattr(entry, "embedded", None)
    error = getattr(entry, "error", None)
    size = getattr(info, "size", None) if info is not None else getattr(embedded, "size", None)
    quant = getattr(info, "quantisation", None) if info is not None else ("Q4_K_M" if embedded else None)
    where = str(getattr(entry, "where", ""))
    return ModelChoice(
        name=str(entry.name),
        size=size,
        quantisation=quant or "—",
        where=where,
        usable=error is None and not where.startswith("not installed"),
        note=error or "",
        default=bool(getattr(entry, "default", False)),
    )


RANDOM_SEARCH_CHOICE = ModelChoice(
    name=MODEL_NAME, size=None, quantisation="—", where="built in: moves one or two constants at random"
)
"""The picker's row for random search: no model, a proposal in milliseconds (the cockpit swaps proposers)."""
OPTUNA_CHOICES = [
    ModelChoice(
        name=shown_name(sampler),
        size=None,
        quantisation="—",
        where=f"built in: Optuna's {shown} over train.py's constants, its study in the workspace",
    )
    for sampler, shown in SAMPLERS.items()
]
"""The picker's rows for the classical arms, TPE and CMA-ES (`agent.researcher.optuna_search`)."""


def discover_choices() -> list[ModelChoice]:
    """Every model in reach, from `agent.researcher.models`, then the local servers that have answered before, each with
    the dialect it speaks, then random search, TPE and CMA-ES (reads files: call it from a worker)."""
    from agent.researcher.models import discover_models, endpoint_entries

    models = [choice_from_entry(entry) for entry in [*discover_models(), *endpoint_entries()]]
    return [*models, RANDOM_SEARCH_CHOICE, *OPTUNA_CHOICES]


class ModelPickerScreen(ModalScreen[str | None]):
    """Lists the models; Enter picks one (the engine loads it between proposals), Escape cancels."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
    ]

    class ChoicesLoaded(Message):
        """The registry was read."""

        def __init__(self, choices: list[ModelChoice]) -> None:
            super().__init__()
            self.choices = choices

    def __init__(
        self,
        current: str | None,
        choices: list[ModelChoice] | None = None,
        loader: Callable[[], list[ModelChoice]] = discover_choices,
    ) -> None:
        super().__init__()
        self.current = current
        self.choices = choices
        self._loader = loader

    def compose(self) -> ComposeResult:
        with Vertical(id="models", classes="dialog"):
            yield Static(
                "[b]Switch model[/b]  (Enter: use it from the next proposal · Esc: cancel)",
                classes="dialog-title",
            )
            yield DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="model-note")
        yield CockpitFooter()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("", key="mark")
        table.add_column("name", key="name")
        table.add_column("size", key="size")
        table.add_column("quant", key="quant")
        table.add_column("where found", key="where")
        if self.choices is None:
            table.loading = True
            self._load()
        else:
            self._fill(self.choices)
        table.focus()

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="models",
        description="reading the model registry",
    )
    def _load(self) -> None:
        self.post_message(self.ChoicesLoaded(self._loader()))

    @on(ChoicesLoaded)
    def _loaded(self, event: ChoicesLoaded) -> None:
        self.choices = event.choices
        self.query_one(DataTable).loading = False
        self._fill(event.choices)

    def _fill(self, choices: list[ModelChoice]) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for choice in choices:
            mark = "●" if choice.name == self.current else ("*" if choice.default else "")
            style = "" if choice.usable else "grey50"
            table.add_row(
                Text(mark, style="bold green"),
                Text(choice.name, style=style or "bold"),
                fmt.size(choice.size),
                choice.quantisation,
                Text(fmt.short_path(choice.where, 60), style=style),
                key=choice.name,
            )
        note = self.query_one("#model-note", Static)
        note.update(
            "● in use   * the default   grey: not usable here"
            if choices
            else "No local models found: see `autoresearch models`."
        )
        if self.current is not None and any(c.name == self.current for c in choices):
            table.move_cursor(row=[c.name for c in choices].index(self.current))

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        name = event.row_key.value
        choice = next((c for c in self.choices or [] if c.name == name), None)
        if choice is None:
            return
        if not choice.usable:
            self.notify(f"{choice.name} is not usable: {choice.note or choice.where}", severity="warning")
            return
        self.dismiss(choice.name)

    def action_cancel(self) -> None:
        self.dismiss(None)
