"""Random search: every proposal is a valid edit that moves exactly the constants it names, within their
ranges and the shape constraints, reproducible by seed; on the shipped train.py, the GPU profile's and edited
variants; then through the real engine (fake harness), the command line and the cockpit's model picker."""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from engine_fakes import BETTER, FAKE_TRAIN, Recorder, assert_consistent, cli, make_workspace, write_ideas
from tui_helpers import SwitchingEngine, async_test, open_model_picker

from agent import cli as cli_module
from agent.commands import SetProposer, UseModel
from agent.config import EngineConfig
from agent.edits import apply_edits, file_hash
from agent.events import Event, Info, ModelLoaded, ProposalStarted
from agent.ledger import RAN
from agent.proposals import Proposal, ProposalContext
from agent.researcher.ideas import IdeaQueue
from agent.researcher.random_search import (
    BETAS,
    HEADS,
    RATE,
    WIDTH,
    RandomSearch,
    classify,
    constraint_problems,
    read_block,
)
from agent.session import open_engine

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = (ROOT / "nanogpt" / "train.py").read_text()
GPU = (ROOT / "nanogpt" / "profiles" / "gpu" / "train.py").read_text()


# ---- variants of train.py ---------------------------------------------------------------------------------


def _sub(text: str, old: str, new: str) -> str:
    """`old` replaced by `new`, failing if `old` is not there (a variant that silently changed nothing would
    test the shipped file twice)."""
    assert old in text, old
    return text.replace(old, new)


def _renamed(text: str) -> str:
    """N_EMBD -> D_MODEL, LEARNING_RATE -> LR, an annotated constant, a non-ASCII comment, and a constant whose
    line also occurs inside another line (`LR = 2e-3  # peak` in `FINAL_LR = 2e-3  # peak`)."""
    text = re.sub(r"\bN_EMBD\b", "D_MODEL", text)
    text = re.sub(r"\bLEARNING_RATE\b", "LR", text)
    text = _sub(text, "\nBATCH_SIZE = 16\n", "\nBATCH_SIZE: int = 16\n")
    text = _sub(text, "\nN_HEAD = 4\n", "\nN_HEAD = 4  # têtes d'attention\n")
    return _sub(text, "\nLR = 2e-3  # peak\n", "\nLR = 2e-3  # peak\nFINAL_LR = 2e-3  # peak\n")


def _removed(text: str) -> str:
    """GRAD_CLIP, WEIGHT_DECAY and BETAS written in place: their constants are gone."""
    for name in ("GRAD_CLIP", "WEIGHT_DECAY", "BETAS"):
        match = re.search(rf"^{name} = ([^#\n]+?)(\s+#.*)?$", text, re.MULTILINE)
        assert match is not None, name
        text = text.replace(match.group(0) + "\n", "", 1)
        text = re.sub(rf"\b{name}\b", match.group(1), text)
    return text


def _reordered(text: str) -> str:
    """The constants block upside down."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("# Hyperparameters")) + 1
    end = lines.index("", start)
    return "\n".join(lines[:start] + lines[start:end][::-1] + lines[end:])


def _derived(text: str) -> str:
    """N_EMBD computed from N_HEAD (not a literal: it moves with N_HEAD, never by itself)."""
    return _sub(text, "\nN_EMBD = 128\n", "\nN_EMBD = 32 * N_HEAD\n")


def _six_heads(text: str) -> str:
    """6 heads of 16: a head count of 5 or 7, or a width of 120 with 12 heads, would break the constraints."""
    return _sub(_sub(text, "\nN_HEAD = 4\n", "\nN_HEAD = 6\n"), "\nN_EMBD = 128\n", "\nN_EMBD = 96\n")


VARIANTS = {
    "shipped": (SHIPPED, "N_EMBD"),
    "gpu": (GPU, "N_EMBD"),
    "renamed": (_renamed(SHIPPED), "D_MODEL"),
    "removed": (_removed(SHIPPED), "N_EMBD"),
    "reordered": (_reordered(SHIPPED), "N_EMBD"),
    "reordered-gpu": (_reordered(GPU), "N_EMBD"),
    "derived": (_derived(SHIPPED), "N_EMBD"),
    "six-heads": (_six_heads(SHIPPED), "N_EMBD"),
}
"""Name: (train.py text, the name of its width constant)."""


# ---- helpers that read the result independently of the module -----------------------------------------------


def context(train_py: str, tried: frozenset[str] = frozenset()) -> ProposalContext:
    return ProposalContext(
        program_md="",
        train_py=train_py,
        history=(),
        best_bpb=None,
        noise_margin=None,
        budget="60 s",
        tried_hashes=tried | {file_hash(train_py)},
    )


def constants(text: str) -> dict[str, object]:
    """Each top-level assignment before the first class or def: its literal value, else its source."""
    found: dict[str, object] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            break
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and value is not None:
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                found[target.id] = ast.unparse(value)
    return found


def named_moves(description: str) -> dict[str, tuple[object, object]]:
    """{NAME: (old, new)} from 'random: A 2e-3 -> 3.1e-3, BETAS (0.9, 0.95) -> (0.9, 0.98)'."""
    assert description.startswith("random: "), description
    body = description.removeprefix("random: ")
    pattern = r"([A-Z][A-Z0-9_]*) (.+?) -> (.+?)(?=, [A-Z][A-Z0-9_]* |$)"
    moves = {m[1]: (ast.literal_eval(m[2]), ast.literal_eval(m[3])) for m in re.finditer(pattern, body)}
    assert moves, description
    return moves


def propose(
    searcher: RandomSearch, ctx: ProposalContext, events: list[Event] | None = None
) -> Proposal | None:
    sink = events.append if events is not None else (lambda event: None)
    return searcher.propose(ctx, sink, threading.Event())


def sequence(seed: int | None, text: str, count: int) -> list[Proposal]:
    """`count` proposals on the same train.py, each result counted as tried (as if all were discarded)."""
    searcher, tried, found = RandomSearch(seed), frozenset[str](), []
    for _ in range(count):
        proposal = propose(searcher, context(text, tried))
        assert proposal is not None
        found.append(proposal)
        tried |= {file_hash(apply_edits(text, proposal.edits))}
    return found


def check_proposal(old: str, proposal: Proposal, width: str) -> dict[str, tuple[object, object]]:
    """Everything a proposal must be; returns its moves."""
    new = apply_edits(old, proposal.edits)  # applies as the engine applies it, and parses
    assert proposal.train_py == new and proposal.base_hash == file_hash(old)  # what its dry run made, on what
    moves = named_moves(proposal.description)
    assert 1 <= len(moves) <= 2
    before, after = constants(old), constants(new)
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == set(moves), proposal.description
    for name, (was, now) in moves.items():
        assert before[name] == was and after[name] == now, (name, was, now)
    # only the named assignments' lines changed, their comments kept
    old_lines, new_lines = old.split("\n"), new.split("\n")
    assert len(old_lines) == len(new_lines)
    diff = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    assert {re.match(r"[A-Z][A-Z0-9_]*", old_lines[i])[0] for i in diff} == set(moves)  # type: ignore[index]
    for i in diff:
        assert old_lines[i].partition("#")[2] == new_lines[i].partition("#")[2]
    # ranges and constraints
    assert "LOG_EVERY" not in moves
    heads = after["N_HEAD"]
    if isinstance(after[width], int) and isinstance(heads, int):
        assert after[width] % heads == 0 and (after[width] // heads) % 2 == 0, proposal.description
    for name, (_, now) in moves.items():
        if name.endswith("FRACTION"):
            assert isinstance(now, float) and 0.0 < now < 1.0
        if name == "DROPOUT":
            assert isinstance(now, float) and 0.0 <= now <= 0.5
        if name == "BETAS":
            assert isinstance(now, tuple) and all(0.5 <= b < 1.0 for b in now)
        if isinstance(now, int) and not isinstance(now, bool):
            assert now >= 1
        if isinstance(now, float) and not name.endswith(("DECAY", "DROPOUT")):
            assert now > 0
    return moves


# ---- the tests -------------------------------------------------------------------------------------------


def test_the_shipped_constants_and_their_kinds() -> None:
    block = read_block(SHIPPED)
    names = [c.name for c in block.constants]
    assert names == [
        "N_LAYER",
        "N_HEAD",
        "N_EMBD",
        "BLOCK_SIZE",
        "BATCH_SIZE",
        "LEARNING_RATE",
        "WARMUP_FRACTION",
        "MIN_LR_FRACTION",
        "WEIGHT_DECAY",
        "BETAS",
        "GRAD_CLIP",
        "LOG_EVERY",
    ]
    kinds = {c.name: classify(c.name, c.value) for c in block.constants}
    assert kinds["LOG_EVERY"] is None
    assert (kinds["N_HEAD"], kinds["N_EMBD"], kinds["LEARNING_RATE"], kinds["BETAS"]) == (
        HEADS,
        WIDTH,
        RATE,
        BETAS,
    )
    assert kinds["MIN_LR_FRACTION"] is not RATE  # a fraction, although its name holds LR
    gpu = {c.name: classify(c.name, c.value) for c in read_block(GPU).constants}
    assert {"WARMUP_STEPS", "DROPOUT", "ROPE_BASE"} <= {n for n, k in gpu.items() if k is not None}
    assert gpu["LOG_EVERY"] is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_proposal_is_a_valid_edit_of_exactly_the_constants_it_names(variant: str) -> None:
    text, width = VARIANTS[variant]
    seen: dict[str, int] = {}
    for proposal in sequence(seed=11, text=text, count=60):
        assert (proposal.proposer, proposal.model) == ("random", "random search")
        for name in check_proposal(text, proposal, width):
            seen[name] = seen.get(name, 0) + 1
    assert len(seen) >= 5, seen  # the draws spread over the block
    if variant == "removed":
        assert not {"GRAD_CLIP", "WEIGHT_DECAY", "BETAS"} & set(seen)
    if variant == "derived":
        assert "N_EMBD" not in seen
    if variant == "renamed":
        assert "D_MODEL" in seen or "LR" in seen


def test_the_same_seed_gives_the_same_sequence_and_different_seeds_differ() -> None:
    def shown(proposals: list[Proposal]) -> list[tuple[str, tuple[Any, ...]]]:
        return [(p.description, p.edits) for p in proposals]

    first = shown(sequence(seed=5, text=SHIPPED, count=20))
    assert first == shown(sequence(seed=5, text=SHIPPED, count=20))
    assert first != shown(sequence(seed=6, text=SHIPPED, count=20))
    assert len({description for description, _ in first}) == 20  # never the same train.py twice


def test_a_line_that_also_occurs_inside_another_gets_a_wider_search() -> None:
    text = _renamed(SHIPPED)
    for proposal in sequence(seed=3, text=text, count=80):
        for edit in proposal.edits:
            assert (
                text.count(edit.search) == 1 or edit.search not in text
            )  # unique (or after an earlier edit)
        if "LR" in named_moves(proposal.description):
            assert any("\n" in edit.search for edit in proposal.edits)
            return
    pytest.fail("LR was never moved")


def test_the_constraints() -> None:
    assert constraint_problems({"N_EMBD": 128, "N_HEAD": 4}) == []
    assert constraint_problems({"N_EMBD": 96, "N_HEAD": 5}) == ["width 96 is not divisible by 5 heads"]
    assert constraint_problems({"D_MODEL": 90, "N_HEAD": 10}) == ["head size 9 is odd"]
    assert constraint_problems({"N_EMBD": 128, "N_HEAD": 8, "N_KV_HEAD": 3}) == [
        "8 heads are not divisible by 3 key/value heads"
    ]
    assert constraint_problems({"N_EMBD": 96, "HEAD_SIZE": 7, "N_HEAD": 6}) == []  # a head size is no count


def test_a_width_written_as_an_expression_is_held_to_the_constraints() -> None:
    block = read_block("N_HEAD = 4\nN_EMBD = 2**7\nN_KV_HEAD = N_HEAD // 2\n")
    assert [c.name for c in block.constants] == ["N_HEAD"]  # an expression is not moved itself ...
    assert block.values == {"N_HEAD": 4, "N_EMBD": 128, "N_KV_HEAD": 2}  # ... but its value counts
    assert constraint_problems(block.values_with({"N_HEAD": 3})) == ["width 128 is not divisible by 3 heads"]


def test_nothing_to_move_and_nothing_left_end_the_search_with_a_word() -> None:
    events: list[Event] = []
    assert propose(RandomSearch(1), context('"""Logs only."""\nLOG_EVERY = 10\nNAME = "x"\n'), events) is None
    assert isinstance(events[-1], Info) and "no constant it can move" in events[-1].message
    text = "FLAG = False\n\n\ndef f():\n    return FLAG\n"
    searcher = RandomSearch(1)
    first = propose(searcher, context(text))
    assert first is not None and first.description == "random: FLAG False -> True"
    flipped = apply_edits(text, first.edits)
    assert propose(searcher, context(text, frozenset({file_hash(flipped)})), events) is None
    assert isinstance(events[-1], Info) and "no untried change" in events[-1].message
    assert propose(RandomSearch(1), context("def broken(:\n"), events) is None
    assert isinstance(events[-1], Info) and "does not parse" in events[-1].message


def test_a_cancelled_search_proposes_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    assert RandomSearch(1).propose(context(SHIPPED), lambda event: None, cancel) is None


# ---- through the engine, the command line and the cockpit ---------------------------------------------------


def test_three_random_proposals_through_the_engine(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    events = Recorder()
    config = EngineConfig(seeds=2, deadline_s=60.0, max_experiments=3)
    engine = open_engine(ws, RandomSearch(seed=7), config, events)
    engine.run()
    assert engine.error is None
    ledger = assert_consistent(ws)
    baseline, *proposed = ledger.experiments()
    assert baseline.status == "baseline" and len(proposed) == 3
    for exp in proposed:
        assert exp.proposer == "random" and exp.model == "random search" and exp.seed is not None
        assert exp.status in RAN and exp.status != "baseline", (exp.status, exp.reason)
        assert exp.commit is not None and exp.parent_commit is not None
        old, new = ws.file_at(exp.parent_commit), ws.file_at(exp.commit)
        moves = named_moves(exp.description)
        before, after = constants(old), constants(new)
        assert {n for n in before if before[n] != after[n]} == set(moves)
    assert {e.model for e in events.of(ProposalStarted)} == {"random search"}


def test_the_engine_swaps_in_random_search_between_proposals(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    events = Recorder()
    engine = open_engine(ws, IdeaQueue([]), EngineConfig(seeds=2, deadline_s=60.0, max_experiments=1), events)
    # Handled at the first safe point, before the first proposal.
    engine.send(SetProposer(RandomSearch(seed=1)))
    engine.run()
    assert engine.error is None
    assert [e.name for e in events.of(ModelLoaded)] == ["random search"]
    experiments = assert_consistent(ws).experiments()
    assert [e.proposer for e in experiments] == ["baseline", "random"]
    assert engine.snapshot().model == "random search"


def test_the_command_line_option() -> None:
    parser = cli_module.build_parser()
    args = parser.parse_args(["run", "--headless", "--proposer", "random", "--seed", "3"])
    assert (args.proposer, args.seed) == ("random", 3)
    assert parser.parse_args(["run", "--headless"]).proposer is None  # the local model
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--headless", "--proposer", "oracle"])


def test_the_command_line_refuses_what_does_not_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER])
    workspace = ["--workspace", str(tmp_path / "ws")]
    assert (
        cli_module.main(["run", "--headless", *workspace, "--proposer", "random", "--ideas", str(ideas)]) == 2
    )
    assert "--ideas takes the proposals from the file" in capsys.readouterr().err
    assert cli_module.main(["run", "--headless", *workspace, "--proposer", "random", "--model", "tiny"]) == 2
    assert "--proposer random needs none" in capsys.readouterr().err
    assert cli_module.main(["run", *workspace, "--proposer", "random"]) == 2
    assert "--proposer need --headless" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_a_headless_random_run_from_the_command_line(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    argv = ["run", "--headless", "--workspace", str(ws.path), "--proposer", "random", "--seed", "4"]
    run = cli(*argv, "--max-experiments", "2", "--seeds", "2", "--budget", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("random: ") >= 2
    experiments = assert_consistent(ws).experiments()
    assert [e.proposer for e in experiments] == ["baseline", "random", "random"]
    first = propose(RandomSearch(4), context(FAKE_TRAIN))  # --seed 4 reached the search
    assert first is not None and experiments[1].description == first.description


@async_test
async def test_the_model_picker_swaps_random_search_in_and_back_out() -> None:
    from tui.app import CockpitApp
    from tui.demo import demo_header
    from tui.screens import ModelChoice
    from tui.screens.models import RANDOM_SEARCH_CHOICE

    choices = [ModelChoice("model-a", 1000, "Q4_K_M", "test"), RANDOM_SEARCH_CHOICE]
    app = CockpitApp(header=demo_header(), model_loader=lambda: list(choices), seed=9)
    engine = SwitchingEngine()
    async with app.run_test(size=(120, 40)) as pilot:
        app.engine = engine  # type: ignore[assignment]
        app.state.header.model = "model-b"

        async def pick(*keys: str) -> None:
            await open_model_picker(pilot, app)
            await pilot.press(*keys)
            await pilot.pause()

        await pick("down", "enter")
        (command,) = engine.calls
        assert isinstance(command, SetProposer) and isinstance(command.proposer, RandomSearch)
        assert command.proposer.seed == 9
        app.state.header.model = "random search"  # as the engine's ModelLoaded answer sets it
        await pick("up", "enter")  # back to a model: the kept proposer returns, then switches to model-a
        assert engine.calls[1:] == [SetProposer(engine.proposer), UseModel("model-a")]
        app.engine = None  # nothing to shut down
