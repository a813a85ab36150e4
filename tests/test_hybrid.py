"""The hybrid researcher: CMA-ES proposes most turns, the model the rest with the optimiser's state in its prompt;
the model's constants become trials of the study, a kept code change re-bases it, and each experiment names who
proposed it (real engine, real git, real Optuna, the fake harness; a scripted local server as the model)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import optuna
import pytest
from endpoint_fakes import ScriptedServer
from engine_fakes import FAKE_TRAIN, Recorder, assert_consistent, make_workspace

from agent.books import Books
from agent.config import EngineConfig
from agent.edits import file_hash
from agent.events import Info
from agent.ledger import Ledger
from agent.researcher.hybrid import MODEL_SHARE, HybridResearcher, hybrid, models_turn
from agent.researcher.optuna_search import STUDY_FILE, OptunaSearch
from agent.researcher.proposer import ModelProposer
from agent.session import open_engine
from agent.workspace import Workspace


def test_the_model_has_its_share_of_the_turns_spread_evenly() -> None:
    turns = [models_turn(t, MODEL_SHARE) for t in range(100)]
    assert sum(turns) == 30 and turns[:3] == [False, False, False] and turns[3]
    assert max(len(run) for run in "".join("m" if t else "o" for t in turns).split("m")) <= 3
    assert not any(models_turn(t, 0.0) for t in range(50)) and all(models_turn(t, 1.0) for t in range(50))


def _session(
    ws: Workspace, url: str, experiments: int, share: float = MODEL_SHARE
) -> tuple[Recorder, object]:
    model = ModelProposer(f"{url}#tiny-model", seed=1)
    researcher = HybridResearcher(model, OptunaSearch("cmaes", ws.state_dir / STUDY_FILE, 1), share)
    events = Recorder()
    engine = open_engine(
        ws, researcher, EngineConfig(seeds=1, deadline_s=60.0, max_experiments=experiments), events
    )
    engine.run()
    engine.close()
    assert engine.error is None, engine.error
    return events, engine


def _studies(ws: Workspace) -> list[optuna.Study]:
    storage = f"sqlite:///{ws.state_dir / STUDY_FILE}"
    return [
        optuna.load_study(study_name=s.study_name, storage=storage)
        for s in optuna.get_all_study_summaries(storage)
    ]


def test_the_model_proposes_on_its_turn_with_the_optimisers_state_and_its_constants_become_a_trial(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path)
    with ScriptedServer() as server:
        _session(ws, server.url, 3, share=0.0)  # three turns of CMA-ES, the model never asked
        assert server.requests == []
    ledger = Ledger(ws.ledger_path)
    context = Books(ws, ledger, Recorder(), 0.01).proposal_context("", "5", None)
    line = next(line for line in context.train_py.splitlines() if line.startswith("LEARNING_RATE = "))
    reply = json.dumps(
        {
            "reasoning": "r",
            "description": "a rate of 0.6",
            "edits": [{"search": line, "replace": "LEARNING_RATE = 0.6"}],
        }
    )
    events: list[object] = []
    with ScriptedServer(replies=[reply]) as server:
        model = ModelProposer(f"{server.url}#tiny-model", seed=1)
        researcher = HybridResearcher(model, OptunaSearch("cmaes", ws.state_dir / STUDY_FILE, 1))
        assert models_turn(3, researcher.share)  # the fourth turn is the model's
        proposal = researcher.propose(context, events.append, threading.Event())
    assert proposal is not None and proposal.proposer == "llama" and len(server.requests) == 1
    prompt = server.requests[0][1]["messages"][1]["content"]
    assert "# The optimiser's state: CMA-ES (Optuna) over 2 constants of train.py, 4 trials scored" in prompt
    assert "- LEARNING_RATE: best " in prompt and "The best 4 configurations" in prompt
    assert "The last 4 trials, oldest first:" in prompt and "this turn is yours" in prompt
    (study,) = _studies(ws)
    mine = [t for t in study.get_trials() if t.user_attrs.get("proposer") == "llama"]
    assert len(mine) == 1 and mine[0].params["LEARNING_RATE"] == pytest.approx(0.6)
    assert mine[0].user_attrs["train_hash"] == file_hash(proposal.train_py or "")
    assert any(isinstance(e, Info) and "a trial of the cmaes study" in e.message for e in events)
    ledger.close()


CODE_CHANGE = json.dumps(
    {
        "reasoning": "A lower floor.",
        "description": "lower the floor of the score",
        "edits": [{"search": "report(2.0 + ", "replace": "report(1.5 + "}],
    }
)


def test_a_kept_code_change_rebases_the_study_on_the_new_best(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    with ScriptedServer(replies=[CODE_CHANGE]) as server:
        events, _engine = _session(ws, server.url, 5)
    ledger = assert_consistent(ws)
    exps = ledger.experiments()
    assert [(e.proposer, e.status) for e in exps][1:5] == [("cmaes", e.status) for e in exps[1:4]] + [
        ("llama", "keep")
    ]
    assert exps[5].proposer == "cmaes" and len(server.requests) == 1
    said = [e.message for e in events.of(Info) if "cmaes:" in e.message]
    assert any("the code changed" in m and "a new study" in m for m in said), said
    old, new = sorted(_studies(ws), key=lambda s: len(s.get_trials()), reverse=True)
    assert not any(
        t.user_attrs.get("proposer") == "llama" for t in old.get_trials()
    )  # a code change: no trial
    first = new.get_trials()[0]  # the new study starts from the new best, told its number
    assert first.value == pytest.approx(exps[4].val_bpb, abs=1e-6) and "report(1.5 + " in ws.file_at(
        exps[5].commit
    )


def test_the_default_researcher_of_the_command_line_is_the_hybrid(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    researcher = hybrid(ModelProposer("http://127.0.0.1:9/v1#m"), ws.state_dir, 3)
    assert researcher.name == "hybrid" and researcher.model_name == "m"
    assert researcher.optimiser.name == "cmaes" and researcher.optimiser.storage == ws.state_dir / STUDY_FILE
    assert "report" in FAKE_TRAIN
