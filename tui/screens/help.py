"""The help screen: every key, and what pausing, stopping and quitting do."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from tui.widgets.footer import CockpitFooter

HELP = """\
# autoresearch cockpit

The model proposes one change to `train.py` at a time; each is trained for the budget and kept only if
its val_bpb beats the best by the noise margin. Everything is recorded in the workspace (git + ledger).

## Keys
| key | what it does |
|---|---|
| `p` | pause after the current run / resume |
| `s` | stop the current run now (recorded as *interrupted*) |
| `g` | review gate on/off: hold each proposal for you |
| `r` | review the held proposal: `a` approve · `e` edit in the editor, then approve · `v` veto with a reason (sent back to the model) |
| `k` / `d` | override the last decision: force keep / force discard (the branch and the ledger follow) |
| `x` | re-apply the discarded experiment under the timeline cursor |
| `m` | switch model (from the next proposal; loading shows in the header) |
| `e` | edit `program.md` in place (saved, then reloaded by the engine) |
| `t` | with several trainers: show the next trainer's log and loss curve (after the last: follow the newest run again) |
| `1`-`4` | timeline · live run · proposal · progress (tabs in a small terminal) |
| `Enter` | on a timeline row: show that experiment's diff, log tail and numbers (`Esc` goes back) |
| `Ctrl+P` | command palette: every command by name |
| `F1` | this help |
| `q` | quit |

## Quitting
Quitting **stops cleanly**: the run in flight is killed and recorded as *interrupted*, the engine stops,
and nothing keeps running in the background. Reopening the same workspace (`autoresearch` or
`autoresearch --workspace DIR`) resumes the research where it was left.
"""


class HelpScreen(ModalScreen[None]):
    """Keys and behaviours."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help", classes="dialog"):
            yield Markdown(HELP)
        yield CockpitFooter()

    def action_close(self) -> None:
        self.dismiss(None)
