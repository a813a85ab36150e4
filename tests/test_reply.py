"""The reply parser and the dry run: hand-written malformed replies, and a property that only ReplyError escapes."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.edits import EditError, file_hash
from agent.proposals import Edit
from agent.researcher.prompt import SYSTEM_PROMPT
from agent.researcher.reply import (
    MAX_DESCRIPTION,
    MAX_EDIT_TEXT,
    MAX_EDITS,
    REPLY_GRAMMAR,
    REPLY_SCHEMA,
    DuplicateIdea,
    ParsedReply,
    ReplyError,
    check_reply,
    close_open_string,
    dry_run,
    parse_reply,
)

TRAIN = """\
import math

N_LAYER = 2  # transformer blocks
N_EMBD = 128  # model width
LEARNING_RATE = 4e-3  # peak AdamW learning rate


def learning_rate(progress: float) -> float:
    if progress < 0.1:
        return LEARNING_RATE * progress / 0.1
    return LEARNING_RATE


def main() -> None:
    for step in range(10):
        lr = learning_rate(step / 10)
        print(f"step {step} | lr {lr}")
    for step in range(10):
        lr = learning_rate(step / 10)
        print(f"step {step} | lr {lr}")


if __name__ == "__main__":
    main()
"""


def reply(*edits: tuple[str, str], description: str = "raise the learning rate", reasoning: str = "r") -> str:
    return json.dumps(
        {
            "reasoning": reasoning,
            "description": description,
            "edits": [{"search": s, "replace": r} for s, r in edits],
        }
    )


LR_EDIT = (
    "LEARNING_RATE = 4e-3  # peak AdamW learning rate",
    "LEARNING_RATE = 6e-3  # peak AdamW learning rate",
)


def test_a_good_reply_parses_and_applies() -> None:
    parsed, new = check_reply(TRAIN, reply(LR_EDIT))
    assert parsed == ParsedReply("r", "raise the learning rate", (Edit(*LR_EDIT),))
    assert "LEARNING_RATE = 6e-3" in new and "4e-3" not in new


def test_code_fences_and_chatter_around_the_json_are_tolerated() -> None:
    text = "Here is my idea:\n```json\n" + reply(LR_EDIT) + "\n```\nGood luck!"
    assert parse_reply(text).edits == (Edit(*LR_EDIT),)


def test_a_brace_in_the_chatter_before_the_json_is_skipped() -> None:
    text = "I think {this} is best: " + reply(LR_EDIT)
    assert parse_reply(text).description == "raise the learning rate"


def test_the_description_is_flattened_to_one_line() -> None:
    assert parse_reply(reply(LR_EDIT, description="  raise\n the   lr ")).description == "raise the lr"


def test_reasoning_may_be_missing() -> None:
    text = json.dumps({"description": "d", "edits": [{"search": "a", "replace": "b"}]})
    assert parse_reply(text).reasoning == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no JSON object"),
        ("I would raise the learning rate.", "no JSON object"),
        ('{"description": "d", "edits": [', "not valid JSON"),
        ("[1, 2, 3]", "no JSON object"),
        ('{"reasoning": "r", "edits": [{"search": "a", "replace": "b"}]}', 'missing the key "description"'),
        ('{"reasoning": "r", "description": "d"}', 'missing the key "edits"'),
        ('{"description": "d", "edits": {"search": "a", "replace": "b"}}', "must be a list"),
        ('{"description": "d", "edits": []}', '"edits" is empty'),
        ('{"description": "d", "edits": ["LEARNING_RATE = 1"]}', "must be an object"),
        ('{"description": "d", "edits": [{"replace": "b"}]}', 'missing the key "search" in edit 1'),
        ('{"description": "d", "edits": [{"search": "a"}]}', 'missing the key "replace" in edit 1'),
        ('{"description": "d", "edits": [{"search": 3, "replace": "b"}]}', "must be a string, not int"),
        (
            '{"description": null, "edits": [{"search": "a", "replace": "b"}]}',
            "must be a string, not NoneType",
        ),
        ('{"description": "  ", "edits": [{"search": "a", "replace": "b"}]}', '"description" is empty'),
        ('{"description": "d", "edits": [{"search": "a\\u0000", "replace": "b"}]}', "NUL"),
        ('{"description": "d", "edits": [{"search": "\\ud800", "replace": "b"}]}', "lone surrogate"),
        (
            '{"description": "d", "edits": [{"file": "prepare.py", "search": "a", "replace": "b"}]}',
            "only train.py may be edited",
        ),
        (
            '{"description": "d", "edits": [{"path": "nanogpt/prepare.py", "search": "a", "replace": "b"}]}',
            "only train.py may be edited",
        ),
    ],
)
def test_malformed_replies_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ReplyError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_reply(text)


def test_an_edit_naming_train_py_is_accepted() -> None:
    text = json.dumps(
        {"description": "d", "edits": [{"file": "nanogpt/train.py", "search": "a", "replace": "b"}]}
    )
    assert parse_reply(text).edits == (Edit("a", "b"),)


def test_two_edits_of_the_same_text_are_two_ideas() -> None:
    with pytest.raises(ReplyError, match="edits 1 and 2 replace the same text"):
        parse_reply(reply(LR_EDIT, (LR_EDIT[0], "LEARNING_RATE = 7e-3")))


def test_too_many_edits_is_more_than_one_idea() -> None:
    with pytest.raises(ReplyError, match="at most"):
        parse_reply(reply(*[(f"a{i}", "b") for i in range(MAX_EDITS + 1)]))


def test_huge_strings_are_refused_not_processed() -> None:
    with pytest.raises(ReplyError, match="characters long"):
        parse_reply(reply(("x" * (MAX_EDIT_TEXT + 1), "y")))
    with pytest.raises(ReplyError, match="characters long"):
        parse_reply(reply(LR_EDIT, description="d" * (MAX_DESCRIPTION + 1)))


def test_a_huge_junk_reply_is_refused_quickly() -> None:
    with pytest.raises(ReplyError):
        parse_reply("{" * 200_000)
    with pytest.raises(ReplyError):
        parse_reply('{"a": ' * 50_000)


def test_unicode_survives_the_round_trip() -> None:
    edit = ('print(f"step {step} | lr {lr}")\n    for', 'print(f"étape {step} → lr {lr} 🚀")\n    for')
    parsed, new = check_reply(TRAIN, reply(edit, description="ünïcode ✓"))
    assert parsed.description == "ünïcode ✓"
    assert "étape" in new and "🚀" in new


# -- the dry run -------------------------------------------------------------------------------------------


def test_search_text_that_is_absent_names_the_closest_lines() -> None:
    wrong = ("LEARNING_RATE = 5e-3  # peak AdamW learning rate", "LEARNING_RATE = 6e-3")
    with pytest.raises(EditError, match="not found") as info:
        check_reply(TRAIN, reply(wrong))
    message = str(info.value)
    assert 'Your SEARCH text was "LEARNING_RATE = 5e-3  # peak AdamW learning rate"' in message
    assert "\nLEARNING_RATE = 4e-3  # peak AdamW learning rate\n" in message


def test_the_failing_edit_is_named_in_words_for_the_model_and_in_fields_for_code() -> None:
    wrong = ("N_EMBD = 96  # model width", "N_EMBD = 64  # model width")
    with pytest.raises(EditError) as info:
        check_reply(TRAIN, reply(LR_EDIT, wrong))
    assert str(info.value).startswith(
        "edit 2 of 2: the SEARCH text was not found in train.py; it must be copied exactly. "
        'Your SEARCH text was "N_EMBD = 96  # model width", but train.py does not contain it. '
        "The nearest lines of train.py are:\n```python\n"
    )
    assert (info.value.kind, info.value.index, info.value.search) == ("not_found", 1, wrong[0])


def test_a_paraphrased_search_is_answered_with_the_real_lines_around_it() -> None:
    paraphrase = (
        "def learning_rate(p): return LEARNING_RATE if p >= 0.1 else LEARNING_RATE * p / 0.1",
        "x = 1",
    )
    with pytest.raises(EditError, match="The nearest lines of train.py are") as info:
        check_reply(TRAIN, reply(paraphrase))
    shown = str(info.value).split("```python\n")[1]
    assert "def learning_rate(progress: float) -> float:\n    if progress < 0.1:" in shown


def test_a_search_without_the_trailing_comment_is_shown_the_real_line() -> None:
    with pytest.raises(EditError, match="The nearest lines of train.py are") as info:
        check_reply(TRAIN, reply(("LEARNING_RATE = 4e-3;", "LEARNING_RATE = 6e-3;")))
    assert "LEARNING_RATE = 4e-3  # peak AdamW learning rate" in str(info.value).split("```python\n")[1]


def test_single_quotes_for_the_files_double_quotes_are_refused_with_how_to_escape() -> None:
    quoted = ("if __name__ == '__main__':", "if __name__ == '__main__' and True:")
    with pytest.raises(EditError, match="not found") as info:
        check_reply(TRAIN, reply(quoted))
    assert 'train.py has double quotes there: inside a JSON string write each as \\".' in str(info.value)
    with pytest.raises(EditError) as info:
        check_reply(TRAIN, reply(("LEARNING_RATE = '4e-3'", "x = 1")))
    assert "double quotes" not in str(info.value)


def test_the_example_reply_in_the_system_prompt_is_a_valid_reply() -> None:
    example = SYSTEM_PROMPT.rstrip().splitlines()[-1]
    parsed = parse_reply(example)
    assert parsed.edits[0].search == 'y = f(x, mode="fast")  # fast'


def test_ambiguous_search_text_asks_for_more_context() -> None:
    with pytest.raises(EditError, match="occurs 2 times"):
        check_reply(TRAIN, reply(("        lr = learning_rate(step / 10)", "        lr = 0.1")))


def test_a_replace_identical_to_the_search_changes_nothing() -> None:
    with pytest.raises(EditError, match="identical"):
        check_reply(TRAIN, reply((LR_EDIT[0], LR_EDIT[0])))


def test_edits_that_undo_each_other_change_nothing() -> None:
    with pytest.raises(EditError, match="change nothing"):
        check_reply(TRAIN, reply(LR_EDIT, (LR_EDIT[1], LR_EDIT[0])))


def test_an_edit_that_breaks_the_syntax_is_refused() -> None:
    with pytest.raises(EditError, match="does not parse"):
        check_reply(TRAIN, reply(("def main() -> None:", "def main( -> None:")))


def test_an_edit_giving_a_train_py_already_tried_is_a_duplicate() -> None:
    parsed = parse_reply(reply(LR_EDIT))
    tried = {file_hash(dry_run(TRAIN, parsed))}
    with pytest.raises(DuplicateIdea, match="already tried"):
        dry_run(TRAIN, parsed, tried)


def test_reindented_search_text_still_applies() -> None:
    edit = ('lr = learning_rate(step / 10)\nprint(f"step {step} | lr {lr}")\n    for', "x = 1\n    for")
    with pytest.raises(EditError):  # matches twice, up to indentation: ambiguous, never guessed
        check_reply(TRAIN, reply(edit))
    edit = (
        "if progress < 0.1:\n    return LEARNING_RATE * progress / 0.1",
        "if progress < 0.2:\n    return 0.0",
    )
    _, new = check_reply(TRAIN, reply(edit))
    assert "    if progress < 0.2:\n        return 0.0" in new


# -- schema and grammar ------------------------------------------------------------------------------------


def test_schema_and_grammar_name_the_same_keys_in_the_same_order() -> None:
    assert list(REPLY_SCHEMA["properties"]) == ["reasoning", "description", "edits"]
    positions = [REPLY_GRAMMAR.index(f'\\"{key}\\"') for key in ("reasoning", "description", "edits")]
    assert positions == sorted(positions)
    assert (
        REPLY_SCHEMA["properties"]["edits"]["maxItems"]
        == MAX_EDITS
        == 1 + int(REPLY_GRAMMAR.split("{0,")[1].split("}")[0])
    )


# -- property: nothing but ReplyError escapes the parser ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
reply_like = st.fixed_dictionaries(
    {},
    optional={
        "reasoning": json_values,
        "description": json_values | st.text(max_size=200),
        "edits": st.lists(
            st.fixed_dictionaries(
                {}, optional={"search": json_values, "replace": json_values, "file": json_values}
            )
            | json_values,
            max_size=6,
        )
        | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_only_ever_raises_reply_error(text: str) -> None:
    with contextlib.suppress(ReplyError):
        parse_reply(text)


@settings(max_examples=300, deadline=None)
@given(reply_like, st.sampled_from(["", "```json\n", "Sure! "]))
def test_arbitrary_reply_shaped_json_only_ever_raises_reply_error(
    data: dict[str, object], prefix: str
) -> None:
    try:
        parsed = parse_reply(prefix + json.dumps(data))
    except ReplyError:
        return
    assert parsed.description and parsed.edits


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_arbitrary_edits_only_ever_raise_edit_or_reply_errors(search: str, replace: str) -> None:
    with contextlib.suppress(ReplyError, EditError):
        check_reply(TRAIN, reply((search, replace)))


# Replies of the 1.5B model in a benchmark session (bench_proposal_latency.py): Qwen's one token for ")}" ended
# each edit text without its closing quote, and the grammar let the model go on writing inside the string.
OPEN_STRING_REPLIES = [
    '{"reasoning": "r", "description": "learning rate from the start", "edits": [{"search": '
    '"return LEARNING_RATE * progress / 0.1", "replace": "return LEARNING_RATE * min(1.0, progress / 0.1)}]}'
    "**Note:** The change keeps the warm-up. If you apply it after the loop",
    '{"reasoning": "r", "description": "learning rate from the start", "edits": [{"search": '
    '"return LEARNING_RATE * progress / 0.1", "replace": "return LEARNING_RATE * min(1.0, progress / 0.1)}]}" '
    '},{ "search": "N_LAYER = 2", "replace": "N_LAYER = 3"}]}',
]


@pytest.mark.parametrize("text", OPEN_STRING_REPLIES, ids=["prose after the end", "a quote after the end"])
def test_a_reply_ended_inside_an_unclosed_string_is_closed_where_the_model_ended_it(text: str) -> None:
    parsed, new = check_reply(TRAIN, text)
    assert parsed.edits == (
        Edit("return LEARNING_RATE * progress / 0.1", "return LEARNING_RATE * min(1.0, progress / 0.1)"),
    )
    assert "min(1.0, progress / 0.1)\n" in new


def test_only_a_string_left_open_is_closed() -> None:
    good = reply(LR_EDIT)
    assert close_open_string(good) is None  # its "}]}" follows a closing quote
    assert close_open_string('{"reasoning": "a)}]}", "description": "d"') is None  # before "edits"
    assert close_open_string(good[: -len("}]}")]) is None  # cut off before the end: nothing to close
    with pytest.raises(ReplyError, match="not valid JSON"):
        parse_reply('{"reasoning": "r", "description": "d", "edits": [{"search": "a", "replace": "b)}')


def test_a_description_cut_by_the_length_cap_ends_at_its_last_whole_word() -> None:
    written = "use a cosine schedule with a longer warmup and add weight decay to the embeddings of the model"
    cut = written[:MAX_DESCRIPTION]  # what the grammar lets through: "... weight decay to the embedding"
    assert len(cut) == MAX_DESCRIPTION and not written[MAX_DESCRIPTION].isspace()
    described = parse_reply(reply(LR_EDIT, description=cut)).description
    assert (
        described == "use a cosine schedule with a longer warmup and add weight decay"
    )  # no "to the embedding"
    short = "halve the learning rate"
    assert parse_reply(reply(LR_EDIT, description=short)).description == short  # as the model wrote it
