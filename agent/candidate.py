"""A candidate's train.py from a proposal: pure functions of texts (no ledger, no git history).

A proposal is made against the best train.py its proposer saw. When the best is still that file, the proposer's
own text is the candidate (its edits were applied once, in its dry run). When the best moved meanwhile (another
keep landed), the change is applied where it was made and merged onto the new best with a 3-way merge; a
re-applied experiment's change is merged the same way, from its own parent and commit.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from agent.edits import EditError, apply_edits, file_hash
from agent.proposals import Proposal
from agent.workspace import HARNESS, TRAIN


def check_targets(proposal: Proposal) -> None:
    """EditError unless every edit is for train.py (the harness is frozen, nothing else is the experiment's)."""
    for number, edit in enumerate(proposal.edits, start=1):
        if edit.path != TRAIN:
            frozen = " (the frozen harness)" if edit.path in HARNESS else ""
            raise EditError(
                f"edit {number} targets {edit.path}{frozen}: only train.py may be changed",
                index=number - 1,
                search=edit.search,
                kind="path",
            )


def candidate_text(
    proposal: Proposal, base_text: str, made_on: str | None = None, made: str | None = None
) -> str:
    """train.py after `proposal` on the best, `base_text` (EditError if it cannot be made).

    `made_on` is the train.py the proposal was made on, where that is not the best any more, and `made` the
    text it gave there when that is known (a re-applied experiment's commit): the change from `made_on` to
    `made` (else to `made_on` with the edits) is merged onto the best where the edits do not apply to it."""
    check_targets(proposal)
    if made is None and proposal.train_py is not None and proposal.base_hash == file_hash(base_text):
        return proposal.train_py  # made on this very text: its edits were applied once already
    try:
        return apply_edits(base_text, proposal.edits)
    except EditError:
        if made_on is None:
            raise
        theirs = made if made is not None else _applied_or_none(made_on, proposal)
        merged = merge3(made_on, theirs, base_text) if theirs is not None else None
        if merged is None:
            raise
        return merged


def _applied_or_none(text: str, proposal: Proposal) -> str | None:
    try:
        return apply_edits(text, proposal.edits)
    except EditError:
        return None


def merge3(ancestor: str, theirs: str, ours: str) -> str | None:
    """`theirs`'s change from `ancestor` applied to `ours` by a 3-way merge (`git merge-file`); None on a
    conflict or when it changes nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, text in (("ours", ours), ("base", ancestor), ("theirs", theirs)):
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            files.append(str(path))
        proc = subprocess.run(["git", "merge-file", "-p", "-q", *files], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 and proc.stdout != ours else None
