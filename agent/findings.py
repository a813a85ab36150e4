"""What a session has found, in one compact table a model reads: every decided experiment, not only the last few.

Per constant, each value tried (from the value it replaced) with its outcome against the noise margin; per code
idea, its outcome and reason in a few words; and the directions that failed every time they were tried (dead
ends). Made from the ledger's rows (`HistoryRow`), so every proposer and a resumed session see the same.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Sequence

from agent.ledger import FAILED
from agent.proposals import HistoryRow
from agent.trainpy import assignment, evaluate

VALUES_PER_CONSTANT = 6
"""The newest tries of one constant that are listed (older ones are counted)."""
CODE_IDEAS = 12
"""The newest code ideas listed (older ones are counted)."""
DEAD_END_TRIES = 2
"""A direction (raising or lowering one constant) tried this often, never better and never within noise, is a
dead end."""


def constant_changes(diff: str) -> tuple[tuple[tuple[str, str, str], ...], bool]:
    """The module-level constants a unified diff of train.py changes, as (name, old, new) in the diff's words,
    and whether it changes anything else (a code change)."""
    removed: dict[str, str] = {}
    added: dict[str, str] = {}
    other = False
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "@@")) or line[:1] not in ("-", "+"):
            continue
        body = line[1:]
        found = _constant(body)
        if found is None:
            other = other or (bool(body.strip()) and not body.lstrip().startswith("#"))
            continue
        (removed if line[0] == "-" else added)[found[0]] = found[1]
    changes = tuple(
        (name, removed.get(name, "(none)"), added.get(name, "(removed)"))
        for name in dict.fromkeys([*removed, *added])
        if removed.get(name) != added.get(name)
    )
    return changes, other


def _constant(line: str) -> tuple[str, str] | None:
    """`NAME = value` at the top level of a file (an UPPER_CASE name), as (name, value as written)."""
    if not line[:1].isupper():
        return None
    try:
        tree = ast.parse(line)
    except (SyntaxError, ValueError):
        return None
    found = assignment(tree.body[0]) if len(tree.body) == 1 else None
    if found is None or not found[0].isupper():
        return None
    return found[0], ast.unparse(found[1])


def outcome(row: HistoryRow, margin: float | None) -> str:
    """A decided experiment's outcome in one word (or two): kept, better, noise, worse, or how it failed."""
    if row.status == "keep":
        return "kept"
    if row.status in FAILED or row.status in ("noop", "rejected", "vetoed", "interrupted"):
        return row.status
    if row.change is None:
        return row.status
    if margin is not None and abs(row.change) <= margin:
        return "noise"
    return "better" if row.change < 0 else "worse"


def _number(text: str) -> float | None:
    try:
        value = evaluate(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _outcome_with_change(row: HistoryRow, margin: float | None) -> str:
    """`outcome`, with the change against the parent where the experiment has a number: 'worse +0.0500'."""
    said = outcome(row, margin)
    if row.change is not None and said in ("kept", "better", "noise", "worse"):
        said += f" {row.change:+.4f}"
    return said


def dead_ends(history: Sequence[HistoryRow], margin: float | None) -> list[str]:
    """'raising NAME (worse 3 of 3)' for each direction of one constant that was tried DEAD_END_TRIES times or
    more, alone, and never kept, better or within noise."""
    tries: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in history:
        if row.code_changed or len(row.constants) != 1:
            continue
        name, old, new = row.constants[0]
        before, after = _number(old), _number(new)
        if before is None or after is None or before == after:
            continue
        tries[(name, "raising" if after > before else "lowering")].append(outcome(row, margin))
    ends = []
    for (name, direction), said in tries.items():
        if len(said) >= DEAD_END_TRIES and not {"kept", "better", "noise"} & set(said):
            counts = ", ".join(f"{word} {said.count(word)}" for word in dict.fromkeys(said))
            ends.append(f"{direction} {name} ({counts} of {len(said)})")
    return ends


def findings_table(history: Sequence[HistoryRow], margin: float | None) -> str:
    """The whole session's findings as a short text for the prompt; '' before anything was decided."""
    rows = [
        row
        for row in history
        if row.exp_id != 0 and row.status not in ("baseline", "interrupted", "rejected")
    ]
    if not rows:
        return ""
    by_constant: dict[str, list[str]] = defaultdict(list)
    ideas: list[str] = []
    for row in rows:
        if not row.code_changed and row.constants:
            for name, old, new in row.constants:
                by_constant[name].append(f"{old}->{new} {_outcome_with_change(row, margin)} (#{row.exp_id})")
            continue
        said = _outcome_with_change(row, margin)
        why = (
            f" ({one_line(row.reason, 50)})"
            if row.reason and said.split()[0] not in ("kept", "better", "worse")
            else ""
        )
        ideas.append(f"- #{row.exp_id} {said}: {one_line(row.description, 60)}{why}")
    noise = f", noise margin {margin:.4f}" if margin is not None else ""
    lines = [
        f"# What the earlier experiments found (#{rows[0].exp_id} to #{rows[-1].exp_id}; the number is val_bpb "
        f"minus its parent's{noise})",
        "",
    ]
    if by_constant:
        lines.append("Constants (old->new outcome):")
        for name, entries in by_constant.items():
            older = len(entries) - VALUES_PER_CONSTANT
            shown = "; ".join(entries[-VALUES_PER_CONSTANT:])
            lines.append(f"- {name}: {shown}" + (f"; and {older} older" if older > 0 else ""))
    if ideas:
        older = len(ideas) - CODE_IDEAS
        lines.append(
            "Code changes" + (f" (the newest {CODE_IDEAS}; {older} older)" if older > 0 else "") + ":"
        )
        lines.extend(ideas[-CODE_IDEAS:])
    ends = dead_ends(rows, margin)
    if ends:
        lines.append("Dead ends (do not try these again): " + "; ".join(ends))
    return "\n".join(lines) + "\n"


def one_line(text: str, width: int) -> str:
    """`text` on one line of at most `width` characters, without '|' (it would break a table's cells)."""
    flat = " ".join(text.replace("|", "/").split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
