"""Small dialogs: the first-run welcome, the veto reason, the trainers, and the quit confirmation."""

from __future__ import annotations

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from tui.widgets.footer import CockpitFooter


def welcome_text(workspace: str, budget: str, model: str | None) -> str:
    """What will happen and how to stop it, for a new workspace."""
    budget = budget or "the harness default"  # the engine says which: 60 s on a CPU, 5 min on CUDA
    workspace, budget, model = escape(workspace), escape(budget), escape(model) if model else None
    return f"""[b]Welcome to autoresearch.[/b]

Workspace: [b]{workspace}[/b] (nothing has run in it yet).

[b]When you press Enter:[/b]

1. train.py as shipped is trained as the [b]baseline[/b] ({budget} per run), to measure where we start and how noisy the measure is.

2. Then, in a loop, the model ([b]{model or "the default"}[/b]) reads program.md, the history and train.py and proposes one change to train.py. Each change is committed, trained for the same budget and [b]kept[/b] only if its val_bpb beats the best by the noise margin; otherwise the branch moves back (the candidate stays in git).

3. Everything is recorded in the workspace (git and the ledger); reopening it resumes where you left off.

[b]To stop:[/b] [b]p[/b] pauses after the current run · [b]s[/b] stops the current run now · [b]q[/b] quits (the run in flight is stopped and recorded as interrupted). [b]g[/b] turns on the review gate, to approve, edit or veto each change before it runs. [b]F1[/b] shows every key.

[b]Enter[/b]: start    [b]Escape[/b]: leave without starting"""


class WelcomeScreen(ModalScreen[bool]):
    """Shown on a workspace's first run; Enter starts the research, Escape leaves."""

    BINDINGS = [
        Binding("enter", "start", "Start"),
        Binding("escape", "leave", "Leave"),
    ]

    def __init__(self, workspace: str, budget: str, model: str | None) -> None:
        super().__init__()
        self._text = welcome_text(workspace, budget, model)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="welcome", classes="dialog"):
            yield Static(self._text, id="welcome-text")
        yield CockpitFooter()

    def action_start(self) -> None:
        self.dismiss(True)

    def action_leave(self) -> None:
        self.dismiss(False)


class VetoScreen(ModalScreen[str | None]):
    """Asks why the proposal is vetoed; the reason goes back to the model."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, exp_id: int, description: str) -> None:
        super().__init__()
        self._title = f"Veto proposal #{exp_id}: {description}"

    def compose(self) -> ComposeResult:
        with Vertical(id="veto", classes="dialog"):
            yield Static(self._title, classes="dialog-title", markup=False)
            yield Static("Why? The model sees this reason when it proposes the next change.")
            yield Input(
                placeholder="e.g. the learning rate is already at its best; try the model width",
                id="veto-reason",
            )
        yield CockpitFooter()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        reason = event.value.strip()
        if reason:
            self.dismiss(reason)
        else:
            self.notify("Give a reason: it is what the model learns from.", severity="warning")

    def action_cancel(self) -> None:
        self.dismiss(None)


MAX_TRAINERS = 64
"""The most trainer slots the dialog accepts (a typo guard; the engine itself takes any number)."""


def parse_trainers(count: str, ray: str) -> tuple[int, str | None]:
    """The dialog's two fields as (trainers, ray): a whole number from 1 to MAX_TRAINERS, and Ray's address
    ('local', 'auto', HOST:PORT) or None for this machine. Raises ValueError saying what is wrong."""
    try:
        trainers = int(count.strip())
    except ValueError:
        raise ValueError(f"trainers must be a whole number, not {count.strip()!r}") from None
    if not 1 <= trainers <= MAX_TRAINERS:
        raise ValueError(f"trainers must be between 1 and {MAX_TRAINERS}, not {trainers}")
    where = ray.strip()
    if where.lower() in ("", "none", "off", "no"):
        return trainers, None
    if any(c.isspace() for c in where):
        raise ValueError(f"Ray's address has no spaces: {where!r} (local, auto or HOST:PORT)")
    return trainers, where.lower() if where.lower() in ("local", "auto") else where


class TrainersScreen(ModalScreen[tuple[int, str | None] | None]):
    """How many runs train at once, and where: this machine, a local Ray instance or a Ray cluster."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, trainers: int, ray: str | None) -> None:
        super().__init__()
        self._trainers, self._ray = trainers, ray

    def compose(self) -> ComposeResult:
        now = f"Ray at {self._ray}" if self._ray else "this machine"
        with Vertical(id="trainers-dialog", classes="dialog"):
            yield Static("Trainers", classes="dialog-title")
            yield Static(
                f"Now: {self._trainers} trainer(s) on {now}. The change is made once the runs in flight "
                "have ended; nothing new starts before.",
                markup=False,  # an address such as [::1]:6379 is not markup
            )
            yield Static("How many runs train at once (on CUDA, one per GPU):")
            yield Input(str(self._trainers), id="trainers-count")
            yield Static(
                "Ray: empty for this machine; local (a Ray instance here), auto or HOST:PORT of a cluster:"
            )
            yield Input(self._ray or "", placeholder="empty: this machine", id="trainers-ray")
        yield CockpitFooter()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        count, ray = self.query_one("#trainers-count", Input), self.query_one("#trainers-ray", Input)
        if event.input is count:
            ray.focus()
            return
        try:
            self.dismiss(parse_trainers(count.value, ray.value))
        except ValueError as exc:
            self.notify(str(exc), severity="warning", markup=False)

    def action_cancel(self) -> None:
        self.dismiss(None)


class QuitScreen(ModalScreen[bool]):
    """Confirms quitting, saying what happens to the run in flight."""

    BINDINGS = [
        Binding("y,enter", "quit_now", "Quit"),
        Binding("n,escape", "cancel", "Cancel"),
    ]

    def __init__(self, running: bool) -> None:
        super().__init__()
        self._run_in_flight = running

    def compose(self) -> ComposeResult:
        what = (
            "The run in flight will be stopped and recorded as [b]interrupted[/b]; "
            "reopening the workspace resumes the research."
            if self._run_in_flight
            else "Nothing is running; reopening the workspace resumes the research."
        )
        with Vertical(id="quit", classes="dialog"):
            yield Static("[b]Quit autoresearch?[/b]", classes="dialog-title")
            yield Static(what)
            yield Static("[b]y[/b] / Enter: quit    [b]n[/b] / Escape: stay")
        yield CockpitFooter()

    def action_quit_now(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)
