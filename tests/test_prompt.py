"""The prompt: order (stable first), history trimming in blocks, sizing to the context, follow-ups."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent.proposals import HistoryRow, ProposalContext
from agent.researcher.prompt import (
    HISTORY_BLOCK,
    HISTORY_ROWS,
    SYSTEM_PROMPT,
    PromptTooLong,
    build_prompt,
    estimate_tokens,
    followup,
    history_start,
    idea_directions,
    pick_direction,
    render_chatml,
    split_train_py,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = (ROOT / "nanogpt" / "train.py").read_text()
PROGRAM = "# Goal\nLower val_bpb.\n"
TRAIN = "LEARNING_RATE = 4e-3  # peak\nN_LAYER = 2\n" * 20


def context(n_history: int = 3, **changes: object) -> ProposalContext:
    history = tuple(
        HistoryRow(
            exp_id=i,
            description=f"idea number {i}",
            status="discard" if i else "baseline",
            val_bpb=2.7 - i / 1000,
        )
        for i in range(n_history)
    )
    base = ProposalContext(
        program_md=PROGRAM,
        train_py=TRAIN,
        history=history,
        best_bpb=2.6991,
        noise_margin=0.0042,
        budget="60 s",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def user_text(ctx: ProposalContext, budget: int = 100_000) -> str:
    prompt = build_prompt(ctx, budget)
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert prompt.messages[0]["content"] == SYSTEM_PROMPT
    return prompt.messages[1]["content"]


def test_stable_parts_come_first_and_the_changing_numbers_last() -> None:
    text = user_text(context())
    markers = (
        "Lower val_bpb.",
        TRAIN.rstrip("\n"),
        "The val_bpb of this train.py: 2.6991",
        "| 2 |",
        "Propose the next",
    )
    order = [text.index(marker) for marker in markers]
    assert order == sorted(order)
    assert text.rstrip().endswith("as the JSON object only.")
    assert "0.0042" in text and "60 s" in text


def test_a_new_experiment_only_appends_to_the_prompt_before_the_numbers() -> None:
    before = user_text(context(7))
    after = user_text(context(8))
    head = before[: before.index("Propose the next")].rstrip("\n") + "\n"
    assert after.startswith(head), "the history must grow at the end so the cached prefix stays valid"


def test_history_start_moves_in_whole_blocks() -> None:
    assert history_start(0) == 0
    assert history_start(HISTORY_ROWS) == 0
    assert history_start(HISTORY_ROWS + 1) == HISTORY_BLOCK
    assert history_start(HISTORY_ROWS + HISTORY_BLOCK) == HISTORY_BLOCK
    assert history_start(HISTORY_ROWS + HISTORY_BLOCK + 1) == 2 * HISTORY_BLOCK
    for total in range(100):
        shown = total - history_start(total)
        assert shown <= HISTORY_ROWS and (total <= HISTORY_ROWS or shown > HISTORY_ROWS - HISTORY_BLOCK)


def test_long_history_shows_the_most_recent_rows() -> None:
    prompt = build_prompt(context(HISTORY_ROWS + 3), 100_000)
    assert prompt.history_shown == HISTORY_ROWS + 3 - HISTORY_BLOCK
    text = prompt.messages[1]["content"]
    assert f"({HISTORY_BLOCK} older not shown: see above)" in text
    assert "| 0 |" not in text and f"| {HISTORY_ROWS + 2} |" in text
    assert "found (#1 to #4;" in text and "- #4 discard: idea number 4" in text  # summarised above the table


def test_the_history_is_trimmed_first_to_fit_the_context() -> None:
    ctx = context(20)
    full = build_prompt(ctx, 100_000)
    tight = build_prompt(ctx, full.tokens - 50)
    assert tight.tokens <= full.tokens - 50
    assert tight.history_shown < full.history_shown
    assert TRAIN.rstrip("\n") in tight.messages[1]["content"]


def test_a_train_py_larger_than_the_context_is_a_clear_error() -> None:
    with pytest.raises(PromptTooLong, match="too long for this model"):
        build_prompt(context(), estimate_tokens(TRAIN) // 2)


def test_the_last_crash_and_a_veto_are_shown_at_the_end() -> None:
    crash = HistoryRow(9, "bigger batch", "crash", None, crash_tail="Traceback\n  File x\nRuntimeError: boom")
    ctx = context(3, veto_reason="too risky")
    ctx = dataclasses.replace(ctx, history=(*ctx.history, crash))
    text = user_text(ctx)
    now = text[text.index("| 9 |") :]
    assert "RuntimeError: boom" in now and "experiment 9" in now
    assert "too risky" in now
    assert "| 9 | - | crash | bigger batch |" in text


def test_table_cells_cannot_break_the_table() -> None:
    row = HistoryRow(1, "a | b\nc " + "x" * 200, "keep", 2.5)
    text = user_text(dataclasses.replace(context(0), history=(row,)))
    line = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert line.count("|") == 5 and len(line) < 120


def test_empty_program_and_no_history() -> None:
    text = user_text(context(0, program_md="", best_bpb=None, noise_margin=None))
    assert "Experiments so far" not in text and "Noise margin" not in text
    assert "The val_bpb of this train.py: -" in text


def test_followup_appends_the_error_to_the_prompt_without_the_bad_reply() -> None:
    prompt = build_prompt(context(), 100_000)
    messages = followup(prompt.messages, 'the reply is missing the key "edits"\n')
    assert messages[0] == prompt.messages[0] and len(messages) == 2
    assert messages[1]["content"].startswith(prompt.messages[1]["content"])
    tail = messages[1]["content"][len(prompt.messages[1]["content"]) :]
    assert 'rejected: the reply is missing the key "edits"' in tail and "Do not repeat it" in tail


def test_chatml_rendering() -> None:
    text = render_chatml([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"


PROGRAM_IDEAS = """\
# Goal

Lower val_bpb. (An idea here is not a direction.)

- not an idea either

## Ideas worth trying

- Learning rate: try a higher or lower peak,
  or a longer warm-up.
* Batch size: smaller.

# What you must not change

- prepare.py
"""


def test_the_directions_are_the_bullets_under_an_ideas_heading() -> None:
    assert idea_directions(PROGRAM_IDEAS) == [
        "Learning rate: try a higher or lower peak, or a longer warm-up.",
        "Batch size: smaller.",
    ]
    assert idea_directions("# Goal\n\n- lower val_bpb\n") == []


def test_directions_come_in_turn_and_a_retry_avoids_the_last_one() -> None:
    directions = ["a", "b", "c"]
    assert [pick_direction(directions, turn) for turn in range(4)] == ["a", "b", "c", "a"]
    assert all(pick_direction(directions, turn, avoid="b") != "b" for turn in range(6))
    assert pick_direction(["a"], 3, avoid="a") == "a"
    assert pick_direction([], 0) is None


def test_a_direction_is_suggested_after_the_history_and_in_a_followup() -> None:
    prompt = build_prompt(context(), 100_000, direction="Batch size: smaller.")
    text = prompt.messages[1]["content"]
    assert prompt.direction == "Batch size: smaller."
    assert text.index("| 2 |") < text.index("Batch size: smaller.") < text.index("Propose the next")
    assert "Batch size" not in user_text(context())
    retry = followup(prompt.messages, "this exact change was already tried", "Learning rate: lower.")
    assert retry[-1]["content"].endswith("Try a different direction instead: Learning rate: lower.")
    assert "Try a different" not in followup(prompt.messages, "bad search")[-1]["content"]


# -- train.py in two parts: a keep re-reads its constants, not the file ------------------------------------


def test_the_shipped_train_py_splits_into_its_top_and_its_code() -> None:
    parts = split_train_py(SHIPPED)
    assert parts is not None
    top, code = parts
    assert top.startswith('"""') and top.rstrip().endswith("LOG_EVERY = 25  # steps")
    assert "import torch" in top and "LEARNING_RATE = " in top and "class " not in top
    assert code.startswith("class CausalSelfAttention(") and code.rstrip().endswith("main()")
    assert f"{top}\n\n\n{code}\n" == SHIPPED


def test_the_gpu_profile_splits_at_its_first_function() -> None:
    parts = split_train_py((ROOT / "nanogpt" / "profiles" / "gpu" / "train.py").read_text())
    assert parts is not None
    assert parts[0].rstrip().endswith("LOG_EVERY = 50  # steps") and parts[1].startswith("def rotate(")


def test_comments_and_decorators_above_the_first_definition_go_with_the_code() -> None:
    text = "import functools\nA = 1\n\n# the model\n# (cached)\n@functools.cache\ndef f():\n    return A\n"
    assert split_train_py(text) == (
        "import functools\nA = 1",
        "# the model\n# (cached)\n@functools.cache\ndef f():\n    return A",
    )


@pytest.mark.parametrize(
    "text",
    [TRAIN, "def f():\n    return 1\n", "# only a comment\ndef f():\n    return 1\n", "A = (\n", "\x00"],
    ids=["no definition", "nothing above", "only a comment above", "syntax error", "NUL"],
)
def test_a_train_py_that_cannot_be_split_is_shown_whole(text: str) -> None:
    assert split_train_py(text) is None
    shown = user_text(context(train_py=text))
    assert f"```python\n{text.rstrip(chr(10))}\n```" in shown and "part 2" not in shown


def test_every_line_of_train_py_is_in_the_prompt_and_the_constants_come_after_the_code() -> None:
    text = user_text(context(train_py=SHIPPED))
    position = 0
    top, code = split_train_py(SHIPPED) or ("", "")
    for line in code.splitlines() + top.splitlines():  # the model copies "search" text from either part
        position = text.index(line, position if line.strip() else 0)
    order = [
        text.index(m) for m in ("Lower val_bpb.", "class GPT(", "N_LAYER = 2", "2.6991", "| 2 |", "Propose")
    ]
    assert order == sorted(order)


def keep(ctx: ProposalContext, old: str, new: str) -> ProposalContext:
    """The context after a keep: train.py edited, a row with the new best, the best score moved."""
    row = HistoryRow(len(ctx.history), f"{old} -> {new}", "keep", 2.65)
    return dataclasses.replace(
        ctx, train_py=ctx.train_py.replace(old, new, 1), history=(*ctx.history, row), best_bpb=2.65
    )


def changed_tail(before: str, after: str) -> str:
    """What a prefix cache has to read of `after` when it holds `before`."""
    return after[len(os.path.commonprefix([before, after])) :]


@pytest.mark.parametrize("old,new", [("N_LAYER = 2", "N_LAYER = 3"), ("LOG_EVERY = 25", "LOG_EVERY = 50")])
def test_a_keep_of_a_constant_rereads_the_constants_and_the_history_not_the_file(old: str, new: str) -> None:
    ctx = context(8, train_py=SHIPPED)
    before, after = user_text(ctx), user_text(keep(ctx, old, new))
    tail = changed_tail(before, after)
    assert "class GPT(" not in tail and "def main()" not in tail
    assert estimate_tokens(tail) < estimate_tokens(before) // 4


def test_a_discard_rereads_one_history_row_and_the_request() -> None:
    ctx = context(8, train_py=SHIPPED)
    row = HistoryRow(8, "a new idea", "discard", 2.7)
    before = user_text(ctx)
    tail = changed_tail(before, user_text(dataclasses.replace(ctx, history=(*ctx.history, row))))
    assert tail.startswith("| 8 | 2.7000 | discard | a new idea |")
    assert estimate_tokens(tail) < 80
