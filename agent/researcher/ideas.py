"""The idea queue: a file of edits written by a person ("try these ideas tonight"), a real Proposer.

One JSON object per line:
    {"description": "halve the learning rate", "edits": [{"search": "LEARNING_RATE = 4e-3", "replace": "..."}]}
An edit may name its file with "file" (default train.py; the engine refuses any other). Optional:
"reasoning". Blank lines and lines starting with '#' are skipped.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from agent.events import EventSink
from agent.proposals import Edit, Proposal, ProposalContext

_IDEA_KEYS = {"description", "edits", "reasoning"}
_EDIT_KEYS = {"search", "replace", "file"}


class IdeaFileError(ValueError):
    """A malformed ideas file; the message names the file and line."""


def _fail(path: Path, number: int, message: str) -> IdeaFileError:
    return IdeaFileError(f"{path}:{number}: {message}")


def _edit(path: Path, number: int, index: int, data: Any) -> Edit:
    where = f"edit {index}"
    if not isinstance(data, dict):
        raise _fail(path, number, f'{where} must be an object with "search" and "replace"')
    unknown = set(data) - _EDIT_KEYS
    if unknown:
        raise _fail(
            path, number, f"{where} has unknown keys {sorted(unknown)} (allowed: search, replace, file)"
        )
    for key in ("search", "replace"):
        if not isinstance(data.get(key), str):
            raise _fail(path, number, f'{where} needs a string "{key}"')
    if not data["search"].strip():
        raise _fail(path, number, f'{where} has an empty "search"')
    file = data.get("file", "train.py")
    if not isinstance(file, str) or not file:
        raise _fail(path, number, f'{where}: "file" must be a file name')
    return Edit(search=data["search"], replace=data["replace"], path=file)


def parse_ideas(text: str, path: Path) -> list[Proposal]:
    """The proposals of an ideas file's text, or IdeaFileError naming the first bad line."""
    ideas: list[Proposal] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise _fail(path, number, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(data, dict):
            raise _fail(path, number, 'each line must be a JSON object with "description" and "edits"')
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
            raise _fail(
                path, number, f"holds {bad}, which is not valid UTF-8 text (a lone surrogate)"
            ) from None
        unknown = set(data) - _IDEA_KEYS
        if unknown:
            raise _fail(
                path, number, f"unknown keys {sorted(unknown)} (allowed: description, edits, reasoning)"
            )
        description = data.get("description")
        if not isinstance(description, str) or not description.strip():
            raise _fail(path, number, '"description" must be a non-empty string')
        edits = data.get("edits")
        if not isinstance(edits, list) or not edits:
            raise _fail(path, number, '"edits" must be a non-empty list of {"search", "replace"} objects')
        reasoning = data.get("reasoning", "")
        if not isinstance(reasoning, str):
            raise _fail(path, number, '"reasoning" must be a string')
        parsed = tuple(_edit(path, number, i, edit) for i, edit in enumerate(edits, start=1))
        canonical = json.dumps({"description": description, "edits": edits}, sort_keys=True)
        ideas.append(
            Proposal(
                description=description.strip(),
                edits=parsed,
                reasoning=reasoning,
                proposer="ideas",
                key="idea:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16],
            )
        )
    return ideas


def load_ideas(path: Path) -> list[Proposal]:
    """Read and parse an ideas file (IdeaFileError if it is missing, unreadable or malformed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdeaFileError(f"{path}: no such ideas file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdeaFileError(f"{path}: cannot read the ideas file: {exc}") from None
    ideas = parse_ideas(text, Path(path))
    if not ideas:
        raise IdeaFileError(f"{path}: the ideas file holds no ideas")
    return ideas


class IdeaQueue:
    """A Proposer that hands out the ideas of a file in order, then None (the run ends)."""

    name = "ideas"
    model_name: str | None = None

    def __init__(self, ideas: list[Proposal], source: Path | None = None) -> None:
        self.ideas = list(ideas)
        self.source = source
        self._next = 0
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> IdeaQueue:
        return cls(load_ideas(path), source=Path(path))

    def __len__(self) -> int:
        return len(self.ideas) - self._next

    def propose(self, context: ProposalContext, emit: EventSink, cancel: threading.Event) -> Proposal | None:
        """The next idea, or None when the queue is empty. (The engine skips ideas it already tried.)"""
        with self._lock:
            if self._next >= len(self.ideas):
                return None
            idea = self.ideas[self._next]
            self._next += 1
            return idea
