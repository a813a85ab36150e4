"""The default researcher where a model is loaded: an optimiser proposes most turns, the local model the rest.

After "Centaur" (arXiv 2603.24647: on autoresearch, CMA-ES proposing every trial and an LLM that sees its state
overriding it on ~30 % of them beat both alone; more of the turns for the LLM made it worse). Here CMA-ES
(`OptunaSearch`) proposes whole configurations of train.py's constants; on MODEL_SHARE of the turns the model
proposes instead, shown the optimiser's state in its prompt (`OptunaSearch.state`), and may answer with
constants or with a code change no constant expresses. A model's proposal that only moves searched constants
becomes a trial of the study (`OptunaSearch.adopt`), so the optimiser learns from it; a kept code change
re-bases the study on the new best. Each proposal names who made it (`Proposal.proposer`): the ledger, the
timeline and `report` show it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

from agent.events import EventSink, Info
from agent.proposals import Proposal, ProposalContext
from agent.researcher.optuna_search import STUDY_FILE, OptunaSearch
from agent.researcher.proposer import ModelProposer

MODEL_SHARE = 0.3
"""The share of turns the model proposes (Centaur's; 0.8 was worse there)."""
SIGMA0 = 0.05
"""CMA-ES's first step, as a share of each constant's range (Optuna's default is 1/6: moves of about 2x in a
rate, all constants at once, suited to the paper's ~300 trials, not to a session of tens)."""


def models_turn(turn: int, share: float) -> bool:
    """Whether the model proposes on `turn` (0, 1, ...): evenly spread, `share` of the turns, the same turns
    after a restart (the turn is the number of experiments decided)."""
    return math.floor((turn + 1) * share + 1e-9) > math.floor(turn * share + 1e-9)


class HybridResearcher:
    """A Proposer (and SwitchableProposer: the model can be switched) made of an optimiser and a model."""

    name = "hybrid"

    def __init__(self, model: ModelProposer, optimiser: OptunaSearch, share: float = MODEL_SHARE) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError("the model's share of the turns is between 0 and 1")
        self.model, self.optimiser, self.share = model, optimiser, share

    @property
    def model_name(self) -> str | None:
        return self.model.model_name

    def use_model(self, name: str, emit: EventSink) -> None:
        self.model.use_model(name, emit)

    def load(self, emit: EventSink) -> None:
        """Load the model now (its first turn does otherwise)."""
        self.model.load(emit)

    def close(self) -> None:
        self.model.close()

    def propose(self, context: ProposalContext, emit: EventSink, cancel: threading.Event) -> Proposal | None:
        """The optimiser's next configuration, or on the model's turns (and when the optimiser has nothing to
        search) the model's proposal made with the optimiser's state in view."""
        turn = sum(1 for row in context.history if row.exp_id != 0)
        if not models_turn(turn, self.share):
            proposal = self.optimiser.propose(context, emit, cancel)
            if proposal is not None or cancel.is_set():
                return proposal
            emit(Info(message=f"{self.optimiser.name} has nothing to propose: the model proposes"))
        advice = self.optimiser.state(context, emit)
        proposal = self.model.propose(replace(context, advice=advice), emit, cancel)
        if proposal is not None and self.optimiser.adopt(proposal, context):
            emit(Info(message=f"the model's constants are a trial of the {self.optimiser.name} study"))
        return proposal


def hybrid(
    model: ModelProposer, state_dir: Path, seed: int | None, share: float = MODEL_SHARE
) -> HybridResearcher:
    """The default researcher of a workspace: `model` and CMA-ES, its study in the workspace's `state_dir`."""
    return HybridResearcher(model, OptunaSearch("cmaes", state_dir / STUDY_FILE, seed, SIGMA0), share)
