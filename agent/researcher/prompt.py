"""The researcher's prompt: rules, program.md, train.py's code, its constants, the findings of the experiments
too old for the history table (`agent.findings`), the history, then the request.

The order is chosen for llama.cpp's prefix reuse: each part comes before the parts that change more often. A
keep usually edits the constants at the top of train.py, so the file is shown in two parts, its code (from the
first class or function on) first and its top (docstring, imports, constants) after it: a keep then costs a
re-read of the top and the history (a few hundred tokens), not of the whole file. The history is appended
oldest-first, so a discarded experiment only adds a row, and the request comes last. The rows that leave the
table (in blocks of HISTORY_BLOCK) are summarised above it, per constant and per code idea, so the model reads
the whole session and the summary changes only when the table's first row moves.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.findings import findings_table, one_line
from agent.proposals import HistoryRow, ProposalContext
from agent.trainpy import first_definition

Message = dict[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": ...}."""

TokenCounter = Callable[[str], int]

SYSTEM_PROMPT = """\
You are a machine-learning researcher. You improve a small GPT training script, train.py, one experiment at a \
time: each run trains for a fixed budget and is scored by val_bpb (validation bits per byte, lower is better).

Rules:
- Edit only train.py. prepare.py and corpus.py (data, tokenizer, budget) and metric.py (the score) are frozen. \
Use only torch and the standard library: no new packages.
- One idea per proposal. Keep it small and simple.
- Do not repeat an experiment from the history table.

Reply with one JSON object with three keys, and nothing else:
- "reasoning": why your change should lower val_bpb, in at most 20 words.
- "description": your change as a whole phrase in plain words (not code), at most 8 words.
- "edits": a list of objects with "search" and "replace". "search" is one or more whole lines of train.py, \
copied exactly, with their comments, enough to match one place only. "replace" is the new text for those lines.

The shape, for an imaginary file (not an idea to copy):
{"reasoning": "Exact mode avoids rounding errors that slow learning.", "description": "use exact mode when calling f", \
"edits": [{"search": "y = f(x, mode=\\"fast\\")  # fast", "replace": "y = f(x, mode=\\"exact\\")  # fast"}]}"""

FOLLOWUP = """

Your previous reply was rejected: {error}
Do not repeat it. Reply with a corrected JSON object for one idea; copy each "search" exactly from train.py."""

DIRECTION = "Suggested direction (from program.md): {direction}\n"
ADVICE = (
    "The optimiser proposes values for these constants on most turns; this turn is yours. Propose values it "
    "has not tried that its results suggest, or an idea no constant expresses (a change to the code).\n\n"
)
DIRECTION_AFTER_DUPLICATE = "Try a different direction instead: {direction}"

HISTORY_ROWS = 20
"""At most this many past experiments are shown."""
HISTORY_BLOCK = 5
"""The oldest shown row moves in steps of this many, so the shown table (and the cached prefix) rarely shifts."""
CRASH_TAIL_LINES = 12
DESCRIPTION_WIDTH = 70


class PromptTooLong(ValueError):
    """Even without history the prompt does not fit the model's context."""


def estimate_tokens(text: str) -> int:
    """A rough token count (about 3.5 characters per token for code), for when no tokenizer is at hand."""
    return len(text) * 2 // 7 + 1


@dataclass(frozen=True)
class Prompt:
    """The messages to send and how they were sized."""

    messages: tuple[Message, ...]
    tokens: int
    """Estimated (or counted) prompt tokens, template overhead not included."""
    history_shown: int
    history_total: int
    direction: str | None = None
    """The idea direction suggested in the request, if any."""


def _fmt_bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def history_start(total: int, max_rows: int = HISTORY_ROWS, block: int = HISTORY_BLOCK) -> int:
    """Index of the oldest row shown: the last `max_rows` at most, moved in whole blocks for a stable prefix."""
    overflow = max(0, total - max_rows)
    return -(-overflow // block) * block


def history_table(rows: Sequence[HistoryRow]) -> str:
    lines = ["| exp | val_bpb | status | description |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.exp_id} | {_fmt_bpb(row.val_bpb)} | {row.status} | {one_line(row.description, DESCRIPTION_WIDTH)} |"
        )
    return "\n".join(lines)


def split_train_py(train_py: str) -> tuple[str, str] | None:
    """train.py as (top, code): the lines before its first top-level class or function, and the rest.

    Comment lines right above that class or function go with the code. None when the file does not parse or
    has no top (or no code) to split off: it is then shown whole.
    """
    try:
        tree = ast.parse(train_py)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    first = first_definition(tree)
    if first is None:
        return None
    lines = train_py.split("\n")
    start = min([first.lineno, *(d.lineno for d in first.decorator_list)]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    top = "\n".join(lines[:start]).strip("\n")
    code = "\n".join(lines[start:]).strip("\n")
    if not top.strip() or not code.strip():
        return None
    return top, code


def _status(context: ProposalContext) -> str:
    status = (
        f"The val_bpb of this train.py: {_fmt_bpb(context.best_bpb)} (lower is better). "
        f"Training budget per run: {context.budget}."
    )
    if context.noise_margin is not None:
        status += (
            f" Noise margin: {context.noise_margin:.4f} (a change must beat the best by more to be kept)."
        )
    return status + "\n"


def file_texts(context: ProposalContext) -> tuple[str, str]:
    """program.md and train.py as (the part a keep rarely changes, the part it usually changes).

    The first holds the instructions and train.py's code; the second train.py's top (imports and constants),
    with the best score, the budget and the noise margin, which also move only with a keep. A train.py that
    cannot be split is shown whole in the first part.
    """
    program = context.program_md.strip() or "(no program.md: lower val_bpb within the budget)"
    instructions = f"# Research instructions (program.md)\n\n{program}\n\n"
    parts = split_train_py(context.train_py)
    if parts is None:
        train = context.train_py.rstrip("\n")
        whole = f"# train.py (the current best version)\n\n```python\n{train}\n```\n"
        return instructions + whole, _status(context)
    top, code = parts
    code_part = (
        "# train.py (the current best version), in two parts\n\n"
        "Part 1 is train.py from its first class or function to its end; part 2, below it, is the start of "
        "train.py: its imports and its constants. Both are copied exactly from train.py.\n\n"
        f"## train.py, part 1: from the first class or function to the end\n\n```python\n{code}\n```\n\n"
    )
    top_part = (
        "## train.py, part 2: the start of the file, above part 1 (imports and constants)\n\n"
        f"```python\n{top}\n```\n"
    )
    return instructions + code_part, top_part + _status(context)


def idea_directions(program_md: str) -> list[str]:
    """The bullet points of program.md's sections whose heading mentions ideas, each on one line.

    A small model left alone keeps circling its favourite idea (the learning rate); naming one of the human's
    directions in the request spreads its proposals over the list.
    """
    directions: list[str] = []
    in_ideas = False
    for line in program_md.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            in_ideas = "idea" in stripped.lower()
        elif not in_ideas or not stripped:
            continue
        elif stripped.startswith(("- ", "* ")):
            directions.append(stripped[2:].strip())
        elif directions and line[:1].isspace():  # a bullet continued on the next line
            directions[-1] += " " + stripped
    return [" ".join(d.split()) for d in directions if d]


def pick_direction(directions: Sequence[str], turn: int, avoid: str | None = None) -> str | None:
    """The direction for this turn: the list in order, round and round; never `avoid` when there is another."""
    choices = [d for d in directions if d != avoid] or list(directions)
    return choices[turn % len(choices)] if choices else None


def _crash_tail(history: Sequence[HistoryRow], lines: int) -> str:
    for row in reversed(history):
        if row.crash_tail.strip():
            tail = "\n".join(row.crash_tail.strip().splitlines()[-lines:])
            return f"The last crash (experiment {row.exp_id}, {one_line(row.description, 50)}) ended with:\n```\n{tail}\n```\n"
    return ""


def dynamic_text(
    context: ProposalContext, crash_lines: int = CRASH_TAIL_LINES, direction: str | None = None
) -> str:
    """The part after the history: another proposer's advice (the optimiser's state), the last crash, a veto, a
    direction, and the request."""
    parts = []
    if context.advice:
        parts.append(context.advice.rstrip("\n") + "\n" + ADVICE)
    if crash_lines > 0:
        parts.append(_crash_tail(context.history, crash_lines))
    if context.veto_reason:
        parts.append(f"The user vetoed the previous proposal: {context.veto_reason.strip()}\n")
    if direction:
        parts.append(DIRECTION.format(direction=direction))
    parts.append("Propose the next experiment: one new idea, as the JSON object only.")
    return "".join(parts)


def build_prompt(
    context: ProposalContext,
    budget_tokens: int,
    count_tokens: TokenCounter = estimate_tokens,
    max_history: int = HISTORY_ROWS,
    direction: str | None = None,
) -> Prompt:
    """System and user messages that fit in `budget_tokens`; the history is trimmed first, then the crash tail.

    `direction`, one of `idea_directions(program_md)`, is suggested in the request.

    Raises PromptTooLong if the rules, program.md and train.py alone do not fit.
    """
    code_part, top_part = file_texts(context)
    history = list(context.history)
    start = history_start(len(history), max_history)
    base = count_tokens(SYSTEM_PROMPT) + count_tokens(code_part) + count_tokens(top_part)
    crash_lines = CRASH_TAIL_LINES
    summarise = True
    while True:
        shown = history[start:]
        findings = findings_table(history[:start], context.noise_margin) if summarise else ""
        table = f"{findings}\n" if findings else ""
        if shown:
            omitted = f" ({start} older not shown: see above)" if start and findings else ""
            omitted = omitted or (f" ({start} older not shown)" if start else "")
            table += f"# Experiments so far, oldest first{omitted}\n\n{history_table(shown)}\n\n"
        dynamic = dynamic_text(context, crash_lines, direction)
        total = base + count_tokens(table) + count_tokens(dynamic)
        if total <= budget_tokens:
            break
        if start < len(history):
            start = min(len(history), start + HISTORY_BLOCK)
        elif crash_lines > 0:
            crash_lines = crash_lines // 2 if crash_lines > 3 else 0
        elif summarise:
            summarise = False
        else:
            raise PromptTooLong(
                f"the prompt needs about {total} tokens but only {budget_tokens} fit in the model's context: "
                "train.py and program.md are too long for this model (use a model with a longer context)"
            )
    user = f"{code_part}{top_part}\n{table}{dynamic}"
    messages: tuple[Message, ...] = (
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
    )
    return Prompt(
        messages=messages,
        tokens=total,
        history_shown=len(shown),
        history_total=len(history),
        direction=direction,
    )


def followup(messages: Sequence[Message], error: str, direction: str | None = None) -> tuple[Message, ...]:
    """The prompt again with what was wrong with the rejected reply added at its very end.

    The rejected reply itself is left out: a small model shown its own mistake tends to copy it again. Only
    the added tail is new to the KV cache. `direction` (after a duplicate idea) names another one to try.
    """
    *head, last = messages
    tail = FOLLOWUP.format(error=error.strip())
    if direction:
        tail += "\n" + DIRECTION_AFTER_DUPLICATE.format(direction=direction)
    return (*head, {"role": last["role"], "content": last["content"] + tail})


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """ChatML, the format of Qwen and SmolLM; used when a GGUF carries no chat template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
