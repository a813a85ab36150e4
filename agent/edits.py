"""Applying search/replace edits to train.py: exact match first, then whitespace-tolerant, never fuzzy."""

from __future__ import annotations

import ast
import difflib
import hashlib
from collections.abc import Sequence

from agent.proposals import Edit


class EditError(ValueError):
    """An edit that cannot be applied; the message says why, in words a model can act on.

    `kind` says what went wrong, for code (never parse the message): "empty" (no SEARCH text), "unchanged"
    (REPLACE equals SEARCH), "ambiguous" (SEARCH matches several places), "not_found", "path" (an edit of
    another file than train.py), "no_edits", "no_change" (the edits together change nothing), "syntax" (the
    result does not parse). `index` is the failing edit's position (0-based) and `search` its SEARCH text, where
    one edit is to blame.
    """

    def __init__(self, message: str, *, kind: str = "", index: int | None = None, search: str | None = None):
        super().__init__(message)
        self.kind, self.index, self.search = kind, index, search


NOT_FOUND = "the SEARCH text was not found in train.py; it must be copied exactly."
"""What a "not_found" EditError says first; a hint of the closest lines follows (`reply.dry_run` gives more)."""


def file_hash(text: str) -> str:
    """SHA-256 of a file's text, the identity of a train.py variant."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unified_diff(old: str, new: str, name: str = "train.py") -> str:
    """A unified diff of two versions of one file."""
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{name}", f"b/{name}"
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _closest(source_lines: list[str], search_lines: list[str]) -> str:
    """The window of source lines most like the search text, numbered, for the error message."""
    n = max(1, len(search_lines))
    target = "\n".join(line.strip() for line in search_lines)
    best_ratio, best_start = -1.0, 0
    for start in range(0, max(1, len(source_lines) - n + 1)):
        window = "\n".join(line.strip() for line in source_lines[start : start + n])
        ratio = difflib.SequenceMatcher(None, target, window, autojunk=False).ratio()
        if ratio > best_ratio:
            best_ratio, best_start = ratio, start
    shown = source_lines[best_start : best_start + n]
    return "\n".join(f"{best_start + i + 1:4d}| {line}" for i, line in enumerate(shown))


def _tolerant_matches(source_lines: list[str], search_lines: list[str]) -> list[tuple[int, str]]:
    """Windows equal to the search lines up to trailing whitespace and one uniform indentation shift.

    Returns (start line, indentation the source adds) for each match.
    """
    n = len(search_lines)
    stripped = [line.rstrip() for line in search_lines]
    matches: list[tuple[int, str]] = []
    for start in range(0, len(source_lines) - n + 1):
        window = [line.rstrip() for line in source_lines[start : start + n]]
        shift: str | None = None
        removed: str | None = None
        ok = True
        for want, have in zip(stripped, window, strict=True):
            if not want and not have:
                continue
            if want.strip() != have.strip():
                ok = False
                break
            want_indent, have_indent = _indent(want), _indent(have)
            if have_indent.endswith(want_indent):
                delta, cut = have_indent[: len(have_indent) - len(want_indent)], ""
            elif want_indent.endswith(have_indent):
                delta, cut = "", want_indent[: len(want_indent) - len(have_indent)]
            else:
                ok = False
                break
            if shift is None:
                shift, removed = delta, cut
            elif (shift, removed) != (delta, cut):
                ok = False
                break
        if ok and shift is not None and not removed:
            matches.append((start, shift))
        elif ok and removed:
            matches.append((start, "-" + removed))
    return matches


def _reindent(lines: list[str], shift: str) -> list[str]:
    if shift.startswith("-"):
        cut = shift[1:]
        return [line[len(cut) :] if line.startswith(cut) else line.lstrip() for line in lines]
    return [shift + line if line.strip() else line for line in lines]


def apply_edit(source: str, edit: Edit) -> str:
    """Apply one edit, or raise EditError saying what was wrong."""
    if not edit.search.strip():
        raise EditError("the SEARCH text is empty: copy the exact lines of train.py to replace", kind="empty")
    if edit.search == edit.replace:
        raise EditError(
            "the REPLACE text is identical to the SEARCH text: the edit changes nothing", kind="unchanged"
        )
    count = source.count(edit.search)
    if count == 1:
        return source.replace(edit.search, edit.replace, 1)
    if count > 1:
        raise EditError(
            f"the SEARCH text occurs {count} times in train.py: include more surrounding lines "
            "so that it matches exactly one place",
            kind="ambiguous",
        )
    source_lines = source.split("\n")
    search_lines = edit.search.strip("\n").split("\n")
    matches = _tolerant_matches(source_lines, search_lines)
    if len(matches) > 1:
        raise EditError(
            f"the SEARCH text matches {len(matches)} places in train.py (ignoring indentation): "
            "include more surrounding lines",
            kind="ambiguous",
        )
    if not matches:
        raise EditError(
            f"{NOT_FOUND} The closest lines are:\n{_closest(source_lines, search_lines)}", kind="not_found"
        )
    start, shift = matches[0]
    replace_lines = edit.replace.strip("\n").split("\n") if edit.replace.strip("\n") else []
    new_lines = (
        source_lines[:start] + _reindent(replace_lines, shift) + source_lines[start + len(search_lines) :]
    )
    return "\n".join(new_lines)


def check_python(text: str, name: str = "train.py") -> None:
    """Raise EditError if `text` is not valid Python."""
    try:
        ast.parse(text, filename=name)
    except SyntaxError as exc:
        raise EditError(
            f"the edited {name} does not parse: {exc.msg} at line {exc.lineno}", kind="syntax"
        ) from None


def apply_edits(source: str, edits: Sequence[Edit]) -> str:
    """Dry-run a list of edits on a copy of `source`: the new text, or EditError naming the failing edit."""
    if not edits:
        raise EditError("the proposal has no edits", kind="no_edits")
    text = source
    for number, edit in enumerate(edits, start=1):
        try:
            text = apply_edit(text, edit)
        except EditError as exc:
            message = f"edit {number} of {len(edits)}: {exc}"
            raise EditError(message, kind=exc.kind, index=number - 1, search=edit.search) from None
    if text == source:
        raise EditError("the edits together change nothing", kind="no_change")
    check_python(text)
    return text
