"""The model's reply format: its JSON schema and grammar, a pure parser, and the dry run that checks a proposal."""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from agent.edits import NOT_FOUND, EditError, apply_edits, file_hash
from agent.proposals import Edit
from agent.static_noop import normal_form

MAX_REASONING = 160
MAX_DESCRIPTION = 80
MAX_EDITS = 4
MAX_EDIT_TEXT = 4000
EDITABLE_FILE = "train.py"

REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "maxLength": MAX_REASONING},
        "description": {"type": "string", "minLength": 1, "maxLength": MAX_DESCRIPTION},
        "edits": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_EDITS,
            "items": {
                "type": "object",
                "properties": {
                    "search": {"type": "string", "minLength": 1, "maxLength": MAX_EDIT_TEXT},
                    "replace": {"type": "string", "maxLength": MAX_EDIT_TEXT},
                },
                "required": ["search", "replace"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["reasoning", "description", "edits"],
    "additionalProperties": False,
}
"""The reply as a JSON schema (for OpenAI-compatible servers; in-process llama.cpp uses REPLY_GRAMMAR)."""

# A hand-written GBNF for exactly REPLY_SCHEMA, keys in this order. Written out rather than converted from the
# schema because llama-cpp-python's converter spells each maxLength as that many nested optional groups. The
# short fields are capped here (a small model rambles: every token costs ~0.1 s on a CPU); the edit texts are
# bounded by max_tokens and checked by parse_reply. The JSON is compact (no newlines or indents between
# keys): layout costs tokens, and a model cannot loop on it.
REPLY_GRAMMAR = r"""
root        ::= "{" ws "\"reasoning\":" ws reasoning "," ws "\"description\":" ws description "," ws "\"edits\":" ws "[" ws edit ( "," ws edit ){0,3} ws "]" ws "}"
reasoning   ::= "\"" char{0,MAX_REASONING} "\""
description ::= "\"" char{1,MAX_DESCRIPTION} "\""
edit        ::= "{" ws "\"search\":" ws nonempty "," ws "\"replace\":" ws string ws "}"
string      ::= "\"" char* "\""
nonempty    ::= "\"" char+ "\""
char        ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
ws          ::= | " "
""".replace("MAX_REASONING", str(MAX_REASONING)).replace("MAX_DESCRIPTION", str(MAX_DESCRIPTION))


class ReplyError(ValueError):
    """A reply that is not a usable proposal; the message is written for the model to act on."""


class DuplicateIdea(EditError):
    """The edits apply but give a train.py that an earlier experiment already ran."""


@dataclass(frozen=True)
class ParsedReply:
    """A reply that parsed: still to be dry-run against train.py."""

    reasoning: str
    description: str
    edits: tuple[Edit, ...]


def _json_object(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, allowing code fences or chatter around it."""
    start = text.find("{")
    if start < 0:
        raise ReplyError(
            'the reply contains no JSON object; reply with {"reasoning": ..., "description": ..., "edits": [...]}'
        )
    decoder = json.JSONDecoder()
    last_error = ""
    attempts = 0
    # A few starting points are enough for chatter before the object; more would make junk input quadratic.
    while start >= 0 and attempts < 16:
        attempts += 1
        try:
            value, _ = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError) as exc:
            last_error = str(exc) if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise ReplyError(f"the reply is not valid JSON ({last_error}); it may have been cut off: keep it shorter")


def _string_field(data: dict[str, Any], key: str, limit: int, where: str = "") -> str:
    if key not in data:
        raise ReplyError(f'the reply is missing the key "{key}"{where}')
    value = data[key]
    if not isinstance(value, str):
        raise ReplyError(f'"{key}"{where} must be a string, not {type(value).__name__}')
    if len(value) > limit:
        raise ReplyError(f'"{key}"{where} is {len(value)} characters long; keep it under {limit}')
    if "\x00" in value:
        raise ReplyError(f'"{key}"{where} contains a NUL character')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ReplyError(f'"{key}"{where} contains an invalid unicode escape (a lone surrogate)') from None
    return value


REPLY_END = "}]}"
"""How a reply ends: the last edit, the list of edits and the reply closed at once."""


def close_open_string(text: str) -> str | None:
    """The reply closed where its model ended it, if it ended it inside a string it forgot to close.

    Qwen's tokenizer has one token for `)}`. Where an edit's text ends in `)`, a small model often writes
    `)}` `]}` (believing it closed the string) instead of `)` `"}` `]}`; the string stays open, and under the
    grammar the model then writes prose into it until max_tokens (a minute on 2 cores, and a wasted try).
    Here the reply is cut at the first `}]}` after "edits" and the string closed before it: what the model
    meant (code with `}]}` in it is not Python). None when that `}]}` follows a closing quote already (nothing
    was left open) or there is none.
    """
    start = text.find('"edits"')
    end = text.find(REPLY_END, start) if start >= 0 else -1
    if end < 0 or text[:end].endswith('"'):
        return None
    return text[:end] + '"' + REPLY_END


DANGLING = frozenset(
    {"a", "an", "the", "and", "or", "for", "to", "of", "in", "on", "with", "by", "at", "from"}
)
"""Words a phrase cut short must not end on."""


def whole_words(description: str, limit: int = MAX_DESCRIPTION) -> str:
    """A description the grammar's length cap cut short, back to its last whole word and without a dangling
    "to the": "use a cosine schedule with a longer warmup and add weight decay to the embedding" (80 characters,
    cut in "embeddings") becomes "use a cosine schedule with a longer warmup and add weight decay". A shorter
    one is as the model wrote it."""
    if len(description) < limit or " " not in description:
        return description
    words = description.rsplit(" ", 1)[0].rstrip(" ,;:-(").split(" ")
    while len(words) > 1 and words[-1].lower() in DANGLING:
        words.pop()
    return " ".join(words).rstrip(" ,;:-(")


def parse_reply(text: str) -> ParsedReply:
    """Parse a model reply into a description and edits; ReplyError (only) if it is malformed."""
    if not isinstance(text, str):
        raise ReplyError("the reply is not text")
    closed = close_open_string(text)
    try:
        data = _json_object(closed if closed is not None else text)
    except ReplyError:
        if closed is None:
            raise
        data = _json_object(text)
    reasoning = _string_field(data, "reasoning", MAX_REASONING) if "reasoning" in data else ""
    description = whole_words(" ".join(_string_field(data, "description", MAX_DESCRIPTION).split()))
    if not description:
        raise ReplyError('"description" is empty: say in a few words what the change is')
    if "edits" not in data:
        raise ReplyError('the reply is missing the key "edits"')
    raw_edits = data["edits"]
    if not isinstance(raw_edits, list):
        raise ReplyError('"edits" must be a list of {"search": ..., "replace": ...} objects')
    if not raw_edits:
        raise ReplyError('"edits" is empty: give at least one {"search": ..., "replace": ...}')
    if len(raw_edits) > MAX_EDITS:
        raise ReplyError(f'"edits" has {len(raw_edits)} entries; one idea needs at most {MAX_EDITS}')
    edits: list[Edit] = []
    for number, item in enumerate(raw_edits, start=1):
        where = f" in edit {number}"
        if not isinstance(item, dict):
            raise ReplyError(f'edit {number} must be an object {{"search": ..., "replace": ...}}')
        for key in ("file", "path", "filename"):
            target = item.get(key)
            if target is not None and (
                not isinstance(target, str) or target.rsplit("/", 1)[-1] != EDITABLE_FILE
            ):
                raise ReplyError(f"edit {number} targets {target!r}: only {EDITABLE_FILE} may be edited")
        search = _string_field(item, "search", MAX_EDIT_TEXT, where)
        replace = _string_field(item, "replace", MAX_EDIT_TEXT, where)
        for earlier, edit in enumerate(edits, start=1):
            if edit.search == search:
                raise ReplyError(
                    f"edits {earlier} and {number} replace the same text: that is two ideas, or one edit "
                    "written twice; give one edit per place"
                )
        edits.append(Edit(search=search, replace=replace))
    return ParsedReply(reasoning=reasoning.strip(), description=description, edits=tuple(edits))


def surrounding(source: str, search: str, before: int = 2, after: int = 4) -> str:
    """The lines of `source` around the line most like any line of `search`: more to copy from than the
    closest-lines hint alone when the model paraphrased a statement that spans several lines."""
    lines = source.split("\n")
    wanted = [line.strip() for line in search.split("\n") if line.strip()][:20]
    if not lines or not wanted:
        return ""

    def score(index: int) -> float:
        have = lines[index].strip()
        # Models drop trailing comments: compare with the code alone too, or `X = 1  # a long comment`
        # loses to any short line that mentions X.
        code = have.split("  #", 1)[0].split(" # ", 1)[0].rstrip()
        if not have:
            return 0.0
        return max(
            difflib.SequenceMatcher(None, text, want, autojunk=False).ratio()
            for want in wanted
            for text in {have, code}
        )

    best = max(range(len(lines)), key=score)
    start, stop = max(0, best - before), min(len(lines), best + len(wanted) + after)
    return "\n".join(lines[start:stop])


def _quoted(text: str, limit: int = 200) -> str:
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[: limit - 4] + '..."'


def dry_run(
    source: str,
    reply: ParsedReply,
    tried_hashes: Collection[str] = (),
    tried_forms: Mapping[str, str] | None = None,
) -> str:
    """Apply the edits to a copy of train.py: the new text, or EditError saying what to fix.

    Refuses edits that do not apply, change nothing, do not parse, or give a train.py already tried: the same
    text, or (`tried_forms`: normal form -> the experiment it was) the same program written differently.
    """
    try:
        new_text = apply_edits(source, reply.edits)
    except EditError as exc:
        if exc.kind != "not_found" or exc.index is None or exc.search is None:
            raise
        # The closest-line hint of apply_edits is one window as long as the search text; a paraphrase of a
        # multi-line statement (or a search without its trailing comment) needs the real lines around it.
        head = f"edit {exc.index + 1} of {len(reply.edits)}: {NOT_FOUND}"
        search = exc.search
        hint = ""
        if "'" in search and search.replace("'", '"') in source:
            # A model that avoids escaping writes 'cuda' for "cuda": say how to write the real text.
            hint = ' train.py has double quotes there: inside a JSON string write each as \\".'
        raise EditError(
            f"{head} Your SEARCH text was {_quoted(search)}, but train.py does not contain it.{hint} "
            f"The nearest lines of train.py are:\n```python\n{surrounding(source, search)}\n```",
            kind=exc.kind,
            index=exc.index,
            search=search,
        ) from None
    if file_hash(new_text) in tried_hashes:
        raise DuplicateIdea(
            "this exact change was already tried in an earlier experiment (see the history): "
            "propose a different idea"
        )
    repeated = (tried_forms or {}).get(normal_form(new_text) or "")
    if repeated is not None:
        raise DuplicateIdea(
            f"this change computes exactly what experiment {repeated} computed (only how it is written "
            "differs): propose a different idea"
        )
    return new_text


def check_reply(
    source: str,
    text: str,
    tried_hashes: Collection[str] = (),
    tried_forms: Mapping[str, str] | None = None,
) -> tuple[ParsedReply, str]:
    """Parse and dry-run one reply: (parsed, new train.py), or ReplyError / EditError."""
    parsed = parse_reply(text)
    return parsed, dry_run(source, parsed, tried_hashes, tried_forms)
