"""The experiment timeline: one row per experiment, newest at the top, live."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from agent.proposals import proposer_label
from tui import format as fmt
from tui.internals import FocusCachedTable
from tui.state import ExperimentRow

COLUMNS = (
    ("#", "id"),
    ("status", "status"),
    ("val_bpb", "bpb"),
    ("Δ best", "delta"),
    ("time", "time"),
    ("by", "by"),
)


class Timeline(FocusCachedTable[Text | str]):
    """Every experiment as a row (id, status, val_bpb, delta vs best, seconds, who proposed it, description).

    Its rendered rows survive focus moves (see `tui.internals.FocusCachedTable`).
    """

    class ExperimentSelected(Message):
        """The user chose an experiment to look at (Enter or click)."""

        def __init__(self, exp_id: int) -> None:
            super().__init__()
            self.exp_id = exp_id

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self._shown: dict[int, tuple[object, ...]] = {}
        self._order: list[int] = []

    def on_mount(self) -> None:
        for label, key in COLUMNS:
            self.add_column(label, key=key)
        self.add_column("description", key="description")

    @property
    def selected_id(self) -> int | None:
        """The experiment under the cursor."""
        if not self._order or self.cursor_row < 0 or self.cursor_row >= len(self._order):
            return None
        return self._order[self.cursor_row]

    @property
    def shown_ids(self) -> list[int]:
        """Experiment ids in display order (newest first)."""
        return list(self._order)

    def _cells(self, row: ExperimentRow, best: float | None) -> tuple[Text | str, ...]:
        value_delta = None if row.val_bpb is None or best is None else row.val_bpb - best
        return (
            Text(str(row.exp_id), style="bold"),
            fmt.status_text(row.status, row.decided_by),
            fmt.bpb(row.val_bpb),
            fmt.delta(value_delta),
            fmt.seconds(row.seconds),
            Text(proposer_label(row.proposer), style="dim"),
            row.description.replace("\n", " "),
        )

    def show(self, rows: list[ExperimentRow], best: float | None) -> None:
        """Show `rows` (newest first), touching only the cells that changed."""
        order = [row.exp_id for row in rows]
        cells = {row.exp_id: self._cells(row, best) for row in rows}
        if order != self._order:
            selected = self.selected_id
            at_top = self.cursor_row <= 0
            self.clear()
            for exp_id in order:
                self.add_row(*cells[exp_id], key=str(exp_id))
            self._order = order
            self._shown = {exp_id: tuple(str(c) for c in cells[exp_id]) for exp_id in order}
            if selected is not None and selected in order and not at_top:
                self.move_cursor(row=order.index(selected), animate=False)
            return
        keys = [key for _, key in COLUMNS] + ["description"]
        for exp_id in order:
            plain = tuple(str(c) for c in cells[exp_id])
            if plain == self._shown.get(exp_id):
                continue
            for key, value in zip(keys, cells[exp_id], strict=True):
                self.update_cell(str(exp_id), key, value, update_width=True)
            self._shown[exp_id] = plain

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.ExperimentSelected(int(event.row_key.value)))
