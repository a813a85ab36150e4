"""The memory of a session: what each experiment changed (read from its diff), the findings a model reads for the
rows too old for its history table, dead ends, and the refusal of a program already tried, written differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.edits import file_hash, unified_diff
from agent.findings import constant_changes, dead_ends, findings_table
from agent.proposals import HistoryRow, ProposalContext
from agent.researcher.prompt import HISTORY_ROWS, build_prompt
from agent.researcher.reply import DuplicateIdea, check_reply
from agent.static_noop import normal_form

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = (ROOT / "nanogpt" / "train.py").read_text()


def changed(old: str, new: str) -> str:
    assert old in SHIPPED
    return SHIPPED.replace(old, new, 1)


def test_a_diff_says_which_constants_changed_and_whether_code_did() -> None:
    lr = changed("LEARNING_RATE = ", "LEARNING_RATE = 0.5 * ")
    constants, code = constant_changes(unified_diff(SHIPPED, lr))
    assert [name for name, _old, _new in constants] == ["LEARNING_RATE"] and not code
    assert constants[0][2].startswith("0.5 * ")
    relu = changed("F.gelu(", "F.relu(")
    assert constant_changes(unified_diff(SHIPPED, relu)) == ((), True)
    both = changed("N_EMBD = 128", "N_EMBD = 64").replace("F.gelu(", "F.relu(")
    assert constant_changes(unified_diff(SHIPPED, both)) == ((("N_EMBD", "128", "64"),), True)
    comment = changed("LOG_EVERY = 25  # steps", "LOG_EVERY = 25  # how often to log")
    assert constant_changes(unified_diff(SHIPPED, comment)) == ((), False)  # the same value: nothing changed


def row(
    exp_id: int, status: str, change: float | None, *constants: tuple[str, str, str], **extra: object
) -> HistoryRow:
    return HistoryRow(exp_id, f"idea {exp_id}", status, 2.8, change=change, constants=constants, **extra)  # type: ignore[arg-type]


def test_findings_list_each_constant_and_code_idea_with_its_outcome_against_the_margin() -> None:
    history = [
        HistoryRow(0, "baseline", "baseline", 2.8),
        row(1, "discard", 0.05, ("WEIGHT_DECAY", "0.1", "0.2")),
        row(2, "keep", -0.04, ("N_EMBD", "128", "64")),
        row(3, "discard", 0.004, ("LEARNING_RATE", "4e-3", "2e-3")),
        row(4, "crash", None, code_changed=True, reason="AttributeError: no attribute 'relu_squared'"),
        row(5, "discard", 0.09, ("WEIGHT_DECAY", "0.1", "0.3")),
        row(6, "rejected", None),
    ]
    text = findings_table(history, 0.013)
    assert "#1 to #5" in text and "noise margin 0.0130" in text
    assert "- WEIGHT_DECAY: 0.1->0.2 worse +0.0500 (#1); 0.1->0.3 worse +0.0900 (#5)" in text
    assert "- N_EMBD: 128->64 kept -0.0400 (#2)" in text
    assert "- LEARNING_RATE: 4e-3->2e-3 noise +0.0040 (#3)" in text  # within the margin: not "worse"
    assert "- #4 crash: idea 4 (AttributeError: no attribute 'relu_squared')" in text
    assert "idea 6" not in text  # a rejected proposal never ran
    assert "Dead ends (do not try these again): raising WEIGHT_DECAY (worse 2 of 2)" in text
    assert dead_ends(history[:2], 0.013) == []  # once is not a dead end
    assert findings_table(history[:1], 0.013) == ""


def test_a_direction_with_one_try_within_noise_is_not_a_dead_end() -> None:
    history = [
        row(1, "discard", 0.05, ("BATCH_SIZE", "16", "8")),
        row(2, "discard", 0.01, ("BATCH_SIZE", "16", "4")),
        row(3, "crash", None, ("BATCH_SIZE", "16", "2")),
    ]
    assert dead_ends(history, 0.013) == []
    assert dead_ends(history, 0.005) == ["lowering BATCH_SIZE (worse 2, crash 1 of 3)"]


def test_the_prompt_summarises_every_row_too_old_for_its_table() -> None:
    """In a long session the table shows the newest rows; what left it is still read, per constant."""
    history = [HistoryRow(0, "baseline", "baseline", 2.8)] + [
        row(i, "discard", 0.02, ("LEARNING_RATE", "4e-3", f"{i}e-3")) for i in range(1, 400)
    ]
    context = ProposalContext("", SHIPPED, tuple(history), 2.8, 0.013, "60 s")
    text = build_prompt(context, 100_000).messages[1]["content"]
    summary, table = text.split("# Experiments so far")
    assert "#1 to #" in summary and "4e-3->399e-3" not in summary  # the newest are in the table ...
    assert "4e-3->1e-3 worse" not in summary  # ... the oldest counted, not listed one by one
    assert "and 3" in summary and "older" in summary
    assert "| 399 |" in table and table.count("\n| ") <= HISTORY_ROWS + 1
    assert "Dead ends" in summary and "LEARNING_RATE" in summary


def test_the_summary_moves_with_the_table_so_a_discard_rereads_one_row() -> None:
    history = [row(i, "discard", 0.02, ("N_LAYER", "2", str(i))) for i in range(1, 27)]
    context = ProposalContext("", SHIPPED, tuple(history), 2.8, 0.013, "60 s")
    before = build_prompt(context, 100_000).messages[1]["content"]
    one_more = ProposalContext("", SHIPPED, (*history, row(27, "discard", 0.02)), 2.8, 0.013, "60 s")
    after = build_prompt(one_more, 100_000).messages[1]["content"]
    assert after.startswith(before[: before.index("Propose the next")].rsplit("\n|", 1)[0])


@pytest.mark.parametrize(
    "respelled",
    [
        "LEARNING_RATE = 0.5 * 2e-3  # peak",  # the value written another way
        "LEARNING_RATE = 1e-3  # halved",  # another comment
    ],
)
def test_a_program_already_tried_is_refused_when_written_differently(respelled: str) -> None:
    tried = changed("LEARNING_RATE = 2e-3", "LEARNING_RATE = 0.001")
    form = normal_form(tried)
    assert form is not None and form != normal_form(SHIPPED)
    line = next(line for line in SHIPPED.splitlines() if line.startswith("LEARNING_RATE = 2e-3"))
    reply = json.dumps(
        {
            "reasoning": "r",
            "description": "halve the learning rate",
            "edits": [{"search": line, "replace": respelled}],
        }
    )
    with pytest.raises(DuplicateIdea, match=r'experiment #7 "lower the rate" \(discard, 2.9000\)'):
        check_reply(SHIPPED, reply, {file_hash(tried)}, {form: '#7 "lower the rate" (discard, 2.9000)'})
    check_reply(SHIPPED, reply, {file_hash(tried)})  # the exact-text check alone lets it through
