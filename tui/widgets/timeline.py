"""The experiment timeline: one row per experiment, newest at the top, live."""

from __future__ import annotations

from collections.abc import Mapping

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

TRANSFER_COLUMN = ("scale", "transfer")
"""Shown after the status while the workspace has a promotion: each keep's marks, one per rung."""

MARK_STYLE = {"✓": "bold green", "✗": "bold red", "…": "grey62"}
"""How each promotion mark reads: transfers, does not transfer, pending."""


def marks_text(marks: str) -> Text:
    """A keep's promotion marks, each in its colour ('✓✗': transfers at the first rung, not at the second)."""
    text = Text()
    for mark in marks:
        text.append(mark, style=MARK_STYLE.get(mark, ""))
    return text


class Timeline(FocusCachedTable[Text | str]):
    """Every experiment as a row (id, status, val_bpb, delta vs best, seconds, who proposed it, description);
    while a promotion is set, each keep's marks at scale after its status.

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
        self._transfer = False
        """The transfer column is shown (some keep has promotion marks)."""

    def on_mount(self) -> None:
        self._add_columns()

    @property
    def columns_shown(self) -> list[tuple[str, str]]:
        """(label, key) of each column, in order."""
        columns = list(COLUMNS)
        if self._transfer:
            columns.insert(2, TRANSFER_COLUMN)
        return [*columns, ("description", "description")]

    def _add_columns(self) -> None:
        for label, key in self.columns_shown:
            self.add_column(label, key=key)

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

    def _cells(
        self, row: ExperimentRow, best: float | None, marks: Mapping[int, str]
    ) -> tuple[Text | str, ...]:
        value_delta = None if row.val_bpb is None or best is None else row.val_bpb - best
        transfer = (marks_text(marks.get(row.exp_id, "")),) if self._transfer else ()
        return (
            Text(str(row.exp_id), style="bold"),
            fmt.status_text(row.status, row.decided_by),
            *transfer,
            fmt.bpb(row.val_bpb),
            fmt.delta(value_delta),
            fmt.seconds(row.seconds),
            Text(proposer_label(row.proposer), style="dim"),
            row.description.replace("\n", " "),
        )

    def show(
        self, rows: list[ExperimentRow], best: float | None, marks: Mapping[int, str] | None = None
    ) -> None:
        """Show `rows` (newest first), touching only the cells that changed; `marks`: each keep's promotion
        marks (the transfer column shows only while there are some)."""
        marks = marks or {}
        transfer = bool(marks)
        columns_change = transfer != self._transfer
        self._transfer = transfer
        order = [row.exp_id for row in rows]
        cells = {row.exp_id: self._cells(row, best, marks) for row in rows}
        if order != self._order or columns_change:
            selected = self.selected_id
            at_top = self.cursor_row <= 0
            self.clear(columns=columns_change)
            if columns_change:
                self._add_columns()
            for exp_id in order:
                self.add_row(*cells[exp_id], key=str(exp_id))
            self._order = order
            self._shown = {exp_id: tuple(str(c) for c in cells[exp_id]) for exp_id in order}
            if selected is not None and selected in order and not at_top:
                self.move_cursor(row=order.index(selected), animate=False)
            return
        keys = [key for _, key in self.columns_shown]
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
