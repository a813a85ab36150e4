"""The trainers: one line per trainer slot, with the experiment it runs, its step and its loss against the best's."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui import format as fmt
from tui.state import CockpitState, TrainerRow


def trainer_line(row: TrainerRow) -> Text:
    """`▶ 2 #12 step 340 loss 2.913 +0.033 vs best  18.2k tok/s  on node-b  wider MLP`."""
    text = Text("▶ " if row.shown else "  ", style="bold cyan")
    text.append(f"{row.slot + 1} ", style="bold" if row.shown else "grey62")
    if row.exp_id is None:
        text.append("idle", style="grey62")
        return text
    text.append(f"#{row.exp_id}", style="bold")
    if row.promotion:
        text.append(f" at {row.promotion}", style="bold magenta")
    if row.step is not None:
        text.append(f" step {row.step}", style="grey62")
    if row.loss is not None:
        text.append(" loss ", style="grey62")
        text.append(f"{row.loss:.3f}")
        if row.best_loss is not None:
            gap = row.loss - row.best_loss
            text.append(f" {gap:+.3f}", style="green" if gap < 0 else "red")
            text.append(" vs best", style="grey62")
    if not row.finished:
        text.append(f"  {fmt.tokens_per_s(row.tokens_per_s)}", style="grey62")
    elif row.promotion:
        text.append("  finished", style="grey62")
    elif row.status and row.status not in ("running", "pending"):
        text.append("  ")
        text.append_text(fmt.status_text(row.status))
    else:
        text.append("  judging", style="grey62")
    if row.where:
        text.append(f"  on {row.where}", style="grey62")
    if row.description:
        text.append(f"  {row.description}")
    return text


def trainers_text(state: CockpitState) -> Text:
    """A caption (whose log and curve are shown, and how to change it), then one line per trainer."""
    if state.selected_slot is None:
        caption = "trainers · showing the newest run · t: pick one"
    else:
        caption = f"trainers · showing trainer {state.selected_slot + 1} · t: next"
    lines = [Text(caption, style="grey62")]
    lines.extend(trainer_line(row) for row in state.trainer_rows())
    return Text("\n").join(lines)


class TrainerList(Static):
    """The trainers, shown only when there are several (one trainer: the live pane is as it always was)."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.display = False

    def show_state(self, state: CockpitState) -> None:
        several = state.n_trainers > 1
        if self.display != several:  # called on every batch of step metrics: no restyle when nothing changed
            self.display = several
        if several:
            self.update(trainers_text(state))
