"""The classical control arms: Optuna's TPE and CMA-ES over train.py's constants, told the engine's judged results,
their study kept in the workspace."""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from engine_fakes import FAKE_TRAIN, Recorder, assert_consistent, cli, make_workspace
from optuna.trial import TrialState
from tui_helpers import SwitchingEngine, async_test, open_model_picker

from agent.books import Books
from agent.commands import SetProposer
from agent.config import EngineConfig
from agent.events import Info
from agent.ledger import Ledger
from agent.researcher.optuna_search import STUDY_FILE, OptunaSearch, space
from agent.researcher.random_search import read_block
from agent.session import open_engine
from agent.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
STUDY = STUDY_FILE


def test_the_space_is_read_from_the_shipped_constants() -> None:
    """What is searched, and how: every shipped value lies inside its range; logging stays put."""
    params = {p.name: p for p in space(read_block((ROOT / "nanogpt" / "train.py").read_text()))}
    assert set(params) == {
        "N_LAYER",
        "N_HEAD",
        "N_EMBD",
        "log2(BLOCK_SIZE)",
        "log2(BATCH_SIZE)",
        "LEARNING_RATE",
        "WARMUP_FRACTION",
        "MIN_LR_FRACTION",
        "WEIGHT_DECAY",
        "1-BETAS[0]",
        "1-BETAS[1]",
        "GRAD_CLIP",
    }
    for param in params.values():
        internal = param.distribution.to_internal_repr(param.shipped)
        assert param.distribution._contains(internal), (param.name, param.shipped, param.distribution)
    assert params["LEARNING_RATE"].distribution.log and params["N_EMBD"].distribution.step == 16
    assert params["log2(BLOCK_SIZE)"].written(6) == "64" and params["1-BETAS[1]"].written(0.05) == "0.95"


def _session(tmp_path: Path, sampler: str, experiments: int, seed: int = 1) -> Workspace:
    """`experiments` more experiments of `sampler` on the fake harness's workspace (made at the first call)."""
    ws = Workspace.open(tmp_path / "ws") if (tmp_path / "ws").exists() else make_workspace(tmp_path)
    config = EngineConfig(seeds=1, deadline_s=60.0, max_experiments=experiments)
    engine = open_engine(ws, OptunaSearch(sampler, ws.state_dir / STUDY, seed), config, Recorder())
    engine.run()
    engine.close()
    assert engine.error is None, engine.error
    return ws


def _study(ws: Workspace) -> optuna.Study:
    return optuna.load_study(study_name=None, storage=f"sqlite:///{ws.state_dir / STUDY}")


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_the_sampler_finds_the_known_optimum_and_is_told_each_result(tmp_path: Path, sampler: str) -> None:
    """The fake train.py scores 2.0 + |LEARNING_RATE - 0.5| (plus a wobble), crashes with CRASH = True: from 1.0
    (2.5), the sampler must come within 0.05 of the optimum in 20 experiments; crashes are failed trials."""
    ws = _session(tmp_path, sampler, 20)
    ledger = assert_consistent(ws)
    best = min(e.val_bpb for e in ledger.experiments() if e.status in ("keep", "baseline") and e.val_bpb)
    assert best < 2.05, best
    trials = _study(ws).get_trials()
    by_hash = {t.user_attrs.get("train_hash"): t for t in trials}
    proposed = [e for e in ledger.experiments() if e.proposer == sampler]
    assert len(proposed) == 20
    for exp in proposed:  # each experiment is one trial, told what the engine decided
        trial = by_hash[exp.train_hash]
        assert exp.description.startswith(f"{sampler} #{trial.number}: ")
        if exp.status == "crash":
            assert trial.state in (TrialState.FAIL, TrialState.RUNNING) and trial.params["CRASH"] is True
        elif exp.status in ("keep", "discard"):
            assert trial.state in (TrialState.COMPLETE, TrialState.RUNNING)
            if trial.state == TrialState.COMPLETE:
                assert math.isclose(trial.value, exp.val_bpb)
    assert trials[0].params["LEARNING_RATE"] == 1.0 and trials[0].value == pytest.approx(2.5, abs=0.01)
    if sampler == "tpe":  # CMA-ES leaves switches alone (no categorical dimension): it never crashes here
        assert any(t.state == TrialState.FAIL for t in trials)  # some crashed: told as failed trials
    else:
        assert "CRASH" not in trials[-1].params


def test_a_trial_asked_and_never_recorded_is_proposed_again_and_the_study_resumes(tmp_path: Path) -> None:
    """A kill -9 between asking the sampler and recording the proposal loses nothing and repeats nothing: the
    next process proposes that trial again; a resumed session goes on with the same study."""
    workspace = _session(tmp_path, "tpe", 3)
    ledger = Ledger(workspace.ledger_path)
    books = Books(workspace, ledger, Recorder(), 0.01)
    context = books.proposal_context("", "5", None)
    cancel = threading.Event()
    asked = OptunaSearch("tpe", workspace.state_dir / STUDY, 2).propose(context, lambda e: None, cancel)
    assert asked is not None  # ... and the process dies before the engine records it
    again = OptunaSearch("tpe", workspace.state_dir / STUDY, 3).propose(context, lambda e: None, cancel)
    assert again is not None and again.description == asked.description and again.train_py == asked.train_py
    ledger.close()
    _session(tmp_path, "tpe", 3)  # the session resumed: three more
    ledger = assert_consistent(workspace)
    proposed = [e for e in ledger.experiments() if e.proposer == "tpe"]
    numbers = [int(e.description.split("#")[1].split(":")[0]) for e in proposed]
    assert (
        len(proposed) == 6
        and len(set(numbers)) == 6
        and asked.description in [e.description for e in proposed]
    )
    trials = _study(workspace).get_trials()
    hashes = [t.user_attrs.get("train_hash") for t in trials if t.user_attrs.get("train_hash")]
    assert len(hashes) == len(set(hashes)) == 1 + 6  # the shipped values, then one trial per experiment
    assert {e.train_hash for e in proposed} < set(hashes)


def test_nothing_to_search_ends_with_a_word(tmp_path: Path) -> None:
    events: list[object] = []
    ws = make_workspace(tmp_path)
    books = Books(ws, Ledger(ws.ledger_path), Recorder(), 0.01)
    context = books.proposal_context("", "5", None)
    bare = replace(context, train_py="print('no constants')\n")
    searcher = OptunaSearch("cmaes", tmp_path / STUDY, 1)
    assert searcher.propose(bare, events.append, threading.Event()) is None
    assert isinstance(events[-1], Info) and "no constant it can search" in events[-1].message
    searched = {p.name for p in space(read_block(FAKE_TRAIN))}
    assert searched == {"LEARNING_RATE", "CRASH", "WOBBLE"}  # what the two sessions above search


def test_the_command_line_option(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    argv = ["run", "--headless", "--workspace", str(ws.path), "--proposer", "cmaes", "--seed", "4"]
    run = cli(*argv, "--max-experiments", "2", "--seeds", "1", "--budget", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("cmaes #") >= 2 and "a new study 'cmaes-" in run.stdout
    assert [e.proposer for e in assert_consistent(ws).experiments()] == ["baseline", "cmaes", "cmaes"]
    assert len(_study(ws).get_trials()) == 3  # the shipped values and two trials


@async_test
async def test_the_model_picker_offers_tpe_and_cmaes_with_the_study_in_the_workspace(tmp_path: Path) -> None:
    from tui.app import CockpitApp
    from tui.demo import demo_header
    from tui.screens import ModelChoice
    from tui.screens.models import OPTUNA_CHOICES, RANDOM_SEARCH_CHOICE

    choices = [ModelChoice("model-a", 1000, "Q4_K_M", "test"), RANDOM_SEARCH_CHOICE, *OPTUNA_CHOICES]
    app = CockpitApp(header=demo_header(), model_loader=lambda: list(choices), seed=9, workspace=tmp_path)
    engine = SwitchingEngine()
    async with app.run_test(size=(120, 40)) as pilot:
        app.engine = engine  # type: ignore[assignment]
        app.state.header.model = "model-b"
        await open_model_picker(pilot, app)
        await pilot.press("down", "down", "enter")  # model-a, random search, TPE
        await pilot.pause()
        (command,) = engine.calls
        assert isinstance(command, SetProposer) and isinstance(command.proposer, OptunaSearch)
        assert command.proposer.name == "tpe" and command.proposer.seed == 9
        assert command.proposer.storage == tmp_path / ".autoresearch" / STUDY
        app.engine = None  # nothing to shut down
