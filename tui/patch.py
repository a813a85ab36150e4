"""Applying a unified diff of one file to its text (to rebuild a proposal's train.py for the editor)."""

from __future__ import annotations

import re

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ValueError):
    """The diff does not apply to the text."""


def _hunks(diff: str) -> list[tuple[int, list[str]]]:
    """(1-based old start line, body lines) of every hunk."""
    hunks: list[tuple[int, list[str]]] = []
    body: list[str] | None = None
    for line in diff.splitlines():
        match = _HUNK.match(line)
        if match:
            body = []
            hunks.append((int(match.group(1)), body))
        elif body is not None and line[:1] in (" ", "-", "+"):
            body.append(line)
        elif body is not None and line == "":
            body.append(" ")
    return hunks


def apply_unified_diff(text: str, diff: str, *, reverse: bool = False) -> str:
    """`text` with the diff applied (or undone, with `reverse`); PatchError when a hunk does not fit.

    Hunks must match exactly where they say, give or take an offset (they are searched for nearby).
    """
    lines = text.splitlines()
    trailing_newline = text.endswith("\n")
    out: list[str] = []
    cursor = 0
    hunks = _hunks(diff)
    if not hunks:
        raise PatchError("the diff has no hunks")
    for start, body in hunks:
        old = [line[1:] for line in body if line[0] in (" ", "+" if reverse else "-")]
        new = [line[1:] for line in body if line[0] in (" ", "-" if reverse else "+")]
        at = _find(lines, old, max(cursor, start - 1 if old else start), cursor)
        if at is None:
            raise PatchError(f"hunk at line {start} does not apply")
        out.extend(lines[cursor:at])
        out.extend(new)
        cursor = at + len(old)
    out.extend(lines[cursor:])
    result = "\n".join(out)
    return result + "\n" if (trailing_newline or not text) and out else result


def _find(lines: list[str], old: list[str], hint: int, floor: int) -> int | None:
    """Where `old` occurs at or after `floor`, nearest to `hint`."""
    n = len(old)
    candidates = range(floor, len(lines) - n + 1)
    for at in sorted(candidates, key=lambda i: abs(i - hint)):
        if lines[at : at + n] == old:
            return at
    return None
