"""What a proposer is given and what it returns: the contract between the engine and its idea sources."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from agent.events import EventSink


@dataclass(frozen=True)
class Edit:
    """Replace the text `search` (which must occur exactly once in train.py) by `replace`."""

    search: str
    replace: str
    path: str = "train.py"
    """The file the edit is for; the engine refuses any other file than train.py (the harness is frozen)."""


@dataclass(frozen=True)
class Proposal:
    """One idea: a description and the edits to train.py that implement it."""

    description: str
    edits: tuple[Edit, ...]
    reasoning: str = ""
    proposer: str = ""
    """Who made it: 'ideas', 'llama', 'user', 'reapply'."""
    model: str | None = None
    """The model name when a model made it."""
    temperature: float | None = None
    seed: int | None = None
    replies: tuple[str, ...] = ()
    """Every raw model reply that led to this proposal (failed tries included)."""
    key: str | None = None
    """A stable identity of the idea in its source (an ideas-file entry), so a resumed run does not repeat it."""
    train_py: str | None = field(default=None, compare=False, repr=False)
    """train.py with the edits applied, where the proposer made it (its dry run) ..."""
    base_hash: str | None = field(default=None, compare=False, repr=False)
    """... on the train.py with this SHA-256 (`context.train_py`): the engine takes the text as it is while the
    best is still that file, and applies the edits again only when the best has moved. Neither is stored."""


@dataclass(frozen=True)
class HistoryRow:
    """One past experiment as a proposer sees it."""

    exp_id: int
    description: str
    status: str
    val_bpb: float | None
    crash_tail: str = ""
    train_hash: str | None = None
    """SHA-256 of the train.py it ran (an optimiser tells its trial by it)."""
    change: float | None = None
    """val_bpb minus its parent's (the best it was made on), where both are known."""
    constants: tuple[tuple[str, str, str], ...] = ()
    """The module-level constants its diff changed: (name, old value, new value) as written."""
    code_changed: bool = False
    """Its diff changed more than constants' values (an idea no constant expresses)."""
    reason: str = ""
    """Why it ended as it did, in the engine's words (a crash's error, a no-op's cause)."""


@dataclass(frozen=True)
class ProposalContext:
    """Everything a proposer may look at to propose the next experiment."""

    program_md: str
    train_py: str
    """The current best train.py."""
    history: tuple[HistoryRow, ...]
    """Oldest first."""
    best_bpb: float | None
    noise_margin: float | None
    budget: str
    """Human-readable budget, e.g. '60 s' or '3.0e12 FLOPs'."""
    tried_hashes: frozenset[str] = field(default_factory=frozenset)
    """SHA-256 of every train.py already tried: a proposal producing one of these is a duplicate."""
    tried_forms: Mapping[str, str] = field(default_factory=dict)
    """The same for the program itself (`static_noop.normal_form`: comments, formatting and how values are
    written set aside): normal form -> the experiment it was, in words ('#7 "…" (discard, 2.8912)')."""
    veto_reason: str | None = None
    """Why the user vetoed the previous proposal, to be passed back to the model."""
    advice: str = ""
    """What another proposer knows, for the model's prompt (the hybrid researcher: the optimiser's state)."""
    trial: Trial | None = field(default=None, compare=False, repr=False)
    """Where the trainers can: run a candidate train.py for the few probe steps its first run starts with, to
    hear before handing it in whether it crashes (a crash is a reply to retry, not an experiment)."""


Trial = Callable[[str, threading.Event], "str | None"]
"""`trial(train_py, cancel)`: why the candidate crashed (its error and the traceback's last lines), or None."""


class ProposalFailed(Exception):
    """A proposer could not produce a valid proposal; the engine records it as `rejected`."""

    def __init__(
        self, reason: str, replies: tuple[str, ...] = (), model: str | None = None, proposer: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.replies = replies
        self.model = model
        self.proposer = proposer
        """Who failed, where the engine's proposer is made of several (the hybrid's model: 'llama')."""


class Proposer(Protocol):
    """A source of proposals. `propose` returns None when it has nothing left to propose."""

    name: str

    def propose(
        self, context: ProposalContext, emit: EventSink, cancel: threading.Event
    ) -> Proposal | None: ...


@runtime_checkable
class SwitchableProposer(Protocol):
    """A proposer whose model can be switched between proposals (the local model, a local server)."""

    name: str

    @property
    def model_name(self) -> str | None:
        """The model in use, or the one the next proposal loads."""
        ...

    def use_model(self, name: str, emit: EventSink) -> None:
        """Switch to model `name` (ModelError keeps the current one)."""
        ...


def model_name(proposer: Proposer) -> str | None:
    """The model a proposer proposes with, where it names one."""
    name = getattr(proposer, "model_name", None)  # optional: a model-less proposer need not say None
    return name if isinstance(name, str) else None


PROPOSERS = {"llama": "model", "cmaes": "CMA-ES", "tpe": "TPE"}
"""Who proposed an experiment, as the timeline and the report name them; the others by their own names (random,
user, ideas, reapply)."""


def proposer_label(name: str) -> str:
    return PROPOSERS.get(name, name)
