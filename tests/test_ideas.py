"""The ideas file: JSON lines of edits; a bad file is refused with its line number."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.proposals import Edit, ProposalContext
from agent.researcher.ideas import IdeaFileError, IdeaQueue, load_ideas, parse_ideas

GOOD = '{"description": "halve lr", "edits": [{"search": "LR = 1", "replace": "LR = 0.5"}]}'


def _context() -> ProposalContext:
    return ProposalContext(
        program_md="", train_py="", history=(), best_bpb=None, noise_margin=None, budget="5 s"
    )


def test_parse_good_file() -> None:
    text = (
        "# tonight\n\n"
        + GOOD
        + "\n"
        + '{"description": "b", "edits": [{"search": "x", "replace": "y", "file": "train.py"}], "reasoning": "r"}\n'
    )
    ideas = parse_ideas(text, Path("ideas.jsonl"))
    assert [i.description for i in ideas] == ["halve lr", "b"]
    assert ideas[0].edits == (Edit("LR = 1", "LR = 0.5"),)
    assert ideas[1].reasoning == "r" and ideas[0].proposer == "ideas"
    assert ideas[0].key and ideas[0].key != ideas[1].key
    assert parse_ideas(GOOD, Path("other.jsonl"))[0].key == ideas[0].key  # the key is the idea, not the file


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"edits": [{"search": "a", "replace": "b"}]}', '"description"'),
        ('{"description": "d"}', '"edits"'),
        ('{"description": "d", "edits": []}', '"edits"'),
        ('{"description": "d", "edits": [{"search": "a"}]}', 'string "replace"'),
        ('{"description": "d", "edits": [{"search": " ", "replace": "b"}]}', 'empty "search"'),
        ('{"description": "d", "edits": ["a"]}', "edit 1 must be an object"),
        ('{"description": "d", "edits": [{"search": "a", "replace": "b", "x": 1}]}', "unknown keys"),
        ('{"description": "d", "edits": [{"search": "a", "replace": "b"}], "extra": 1}', "unknown keys"),
    ],
)
def test_bad_line_names_its_number(line: str, message: str) -> None:
    text = GOOD + "\n\n" + line + "\n" + GOOD + "\n"
    with pytest.raises(IdeaFileError) as info:
        parse_ideas(text, Path("ideas.jsonl"))
    assert str(info.value).startswith("ideas.jsonl:3: ")
    assert message in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(IdeaFileError, match="no such ideas file"):
        load_ideas(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("# nothing yet\n")
    with pytest.raises(IdeaFileError, match="holds no ideas"):
        load_ideas(empty)


def test_queue_hands_out_ideas_in_order_then_none(tmp_path: Path) -> None:
    path = tmp_path / "ideas.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace("halve lr", "second") + "\n")
    queue = IdeaQueue.from_file(path)
    assert len(queue) == 2 and queue.name == "ideas" and queue.model_name is None
    cancel = threading.Event()
    first = queue.propose(_context(), lambda e: None, cancel)
    second = queue.propose(_context(), lambda e: None, cancel)
    assert first is not None and second is not None
    assert (first.description, second.description) == ("halve lr", "second")
    assert queue.propose(_context(), lambda e: None, cancel) is None
    assert len(queue) == 0
