"""Random search, a Proposer that needs no model: it moves one or two constants of train.py at random.

It reads the constants block (the top-level `NAME = literal` assignments before the first class or def, read
by `agent.trainpy`), picks one or two constants it knows how to move, draws a new value for each from a range
that suits its kind (log-scale within a factor of 4 for rates, decays and fractions, integer steps or
doublings for sizes, a flip for booleans, a log-scale move of 1 - beta for Adam's betas; logging and
infrastructure constants stay put), draws again while a shape constraint that held before breaks
(N_EMBD % N_HEAD == 0, an even head size for rotary embeddings, N_HEAD % N_KV_HEAD == 0), and proposes the
change as ordinary search/replace edits of the assignment lines, trailing comments kept. It is the control arm
against which a model's ideas are measured, and a mode of its own: a proposal takes milliseconds, and a seed
makes the sequence reproducible.
"""

from __future__ import annotations

import ast
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.edits import EditError, apply_edit, apply_edits, file_hash
from agent.events import EventSink, Info
from agent.proposals import Edit, Proposal, ProposalContext
from agent.trainpy import block_assignments, evaluate

MODEL_NAME = "random search"
"""How the random search is named where a model's name would be (header, model picker, ledger)."""

MAX_DRAWS = 200
"""Draws per proposal before the search gives up (each broke a constraint or gave a train.py tried before)."""

FACTOR = 4.0
"""Log-scale moves land within this factor of the current value."""

Value = int | float | bool | tuple[int | float, ...]
"""A constant's literal: a number, a switch, or a tuple of numbers (Adam's betas)."""

Replacements = tuple[tuple[tuple[int, int], str], ...]
"""(UTF-8 byte span in the assignment's line, new text) for each piece of a value that changes."""

_FROZEN_PARTS = frozenset(
    {"LOG", "EVERY", "INTERVAL", "EVAL", "SEED", "PRINT", "VERBOSE", "PATH", "DIR", "FILE", "DEVICE", "DTYPE"}
    | {"VOCAB", "COMPILE", "DEBUG", "CHECKPOINT", "SAVE"}
)
"""Name parts of constants that steer logging, evaluation or infrastructure, not the model: never moved."""


# ---- reading the constants block ------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant:
    """One `NAME = literal` assignment of the constants block."""

    name: str
    value: Value
    text: str
    """The value as written in the file."""
    lineno: int
    """1-based line of the assignment (always a single line)."""
    spans: tuple[tuple[int, int], ...]
    """UTF-8 byte offsets in that line of the value, or of each element of a tuple."""


@dataclass(frozen=True)
class Block:
    """What random search reads of a train.py."""

    constants: tuple[Constant, ...]
    """The literal assignments that are bound nowhere else at the top level, in file order."""
    values: dict[str, object]
    """Each block name's value: the literals, and the expressions over them that evaluate (`64 * N_HEAD`)."""
    statements: tuple[tuple[str, ast.expr], ...]
    """Every plain assignment of the block, to evaluate again with moved values."""

    def values_with(self, changed: dict[str, object]) -> dict[str, object]:
        """The block's values with `changed` in place, the expressions over them evaluated again."""
        return _block_values(self.statements, changed)


def _written_value(node: ast.expr) -> Value | None:
    """The value as written, where it is one a constant may be moved from (an expression is left alone)."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, tuple) and value and all(type(v) in (int, float) for v in value):
        return value
    return None


def _block_values(
    statements: tuple[tuple[str, ast.expr], ...], changed: dict[str, object]
) -> dict[str, object]:
    """Each block name's value, in order, with `changed` in place of what the file says."""
    values: dict[str, object] = {}
    for name, node in statements:
        if name in changed:
            values[name] = changed[name]
            continue
        try:
            values[name] = evaluate(node, values)
        except ValueError:
            values.pop(name, None)
    return values


def _bindings(tree: ast.Module) -> dict[str, int]:
    """How often each name is bound by top-level code (a rebinding later would undo a move)."""
    counts: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                counts[child.id] = counts.get(child.id, 0) + 1
    return counts


def read_block(source: str) -> Block:
    """The constants block of a train.py's text (SyntaxError if it does not parse)."""
    tree = ast.parse(source)
    lines = source.split("\n")
    bindings = _bindings(tree)
    statements = block_assignments(tree)
    constants: list[Constant] = []
    for name, node in statements:
        value = _written_value(node)
        if (
            value is None
            or not name.isupper()
            or bindings.get(name) != 1
            or node.lineno != node.end_lineno
            or node.end_col_offset is None
        ):
            continue
        elements = node.elts if isinstance(node, ast.Tuple) else [node]
        spans = tuple((e.col_offset, e.end_col_offset or e.col_offset) for e in elements)
        text = lines[node.lineno - 1].encode("utf-8")[node.col_offset : node.end_col_offset].decode("utf-8")
        constants.append(Constant(name, value, text, node.lineno, spans))
    return Block(tuple(constants), _block_values(statements, {}), statements)


# ---- kinds: how each constant moves ---------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How one kind of constant moves: `move` draws (replacements, the new value's text), or None to draw
    again (the draw changed nothing)."""

    name: str
    move: Callable[[random.Random, Constant], tuple[Replacements, str] | None]


def sig2(x: float) -> float:
    """`x` rounded to two significant digits, as a person would write it."""
    return float(f"{x:.2g}")


def _log_move(rng: random.Random, value: float, low: float, high: float) -> float:
    """A value within FACTOR of `value` on a log scale, clipped to [low, high], two significant digits."""
    moved = value * FACTOR ** rng.uniform(-1.0, 1.0)
    return sig2(min(high, max(low, moved)))


def format_float(value: float, like: str) -> str:
    """A float literal in the style of `like`: '3.1e-3' where the file wrote '2e-3', else '0.0031'."""
    if "e" in like.lower():
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return repr(value)


def _whole(c: Constant, text: str | None) -> tuple[Replacements, str] | None:
    """A move that replaces the whole value."""
    return None if text is None or text == c.text else (((c.spans[0], text),), text)


def _float_kind(
    name: str, low: float, high: float, from_zero: tuple[float, float] | None = None, off: float = 0.0
) -> Kind:
    """A float moved on a log scale within [low, high]; from 0 drawn log-uniformly in `from_zero`; switched
    off (0.0) with probability `off`."""

    def move(rng: random.Random, c: Constant) -> tuple[Replacements, str] | None:
        assert isinstance(c.value, int | float)
        value = float(c.value)
        if value == 0.0:
            if from_zero is None:
                return None
            new = sig2(math.exp(rng.uniform(math.log(from_zero[0]), math.log(from_zero[1]))))
        elif rng.random() < off:
            new = 0.0
        else:
            new = _log_move(rng, value, low, high)
        return None if new == value else _whole(c, format_float(new, c.text))

    return Kind(name, move)


def _moved_beta(rng: random.Random, beta: float) -> str | None:
    """An Adam beta moved on a log scale of 1 - beta (0.95 -> 0.8 .. 0.9875)."""
    new = 1.0 - _log_move(rng, 1.0 - beta, 1e-3, 0.5)
    return None if abs(new - beta) < 1e-9 else format(new, ".6g")


def _move_beta(rng: random.Random, c: Constant) -> tuple[Replacements, str] | None:
    assert isinstance(c.value, int | float)
    return _whole(c, _moved_beta(rng, float(c.value)))


def _move_betas(rng: random.Random, c: Constant) -> tuple[Replacements, str] | None:
    """One element of a tuple of betas moved; the others stay as written."""
    assert isinstance(c.value, tuple)
    index = rng.randrange(len(c.value))
    new = _moved_beta(rng, float(c.value[index]))
    if new is None:
        return None
    shown = [repr(v) for v in c.value]
    shown[index] = new
    return ((c.spans[index], new),), "(" + ", ".join(shown) + ")"


def _int_kind(name: str, candidates: Callable[[int], list[int]], low: int, high: int) -> Kind:
    """An integer moved to one of `candidates(current)` within [low, high]."""

    def move(rng: random.Random, c: Constant) -> tuple[Replacements, str] | None:
        assert isinstance(c.value, int)
        options = sorted({v for v in candidates(c.value) if low <= v <= high and v != c.value})
        return _whole(c, str(rng.choice(options))) if options else None

    return Kind(name, move)


def _steps(current: int) -> list[int]:
    return [current - 2, current - 1, current + 1, current + 2]


def _doublings(current: int) -> list[int]:
    return [current // 2, current * 2] if current > 1 else [2]


def _head_counts(current: int) -> list[int]:
    return [current - 1, current + 1, current // 2, current * 2]


def _widths(current: int) -> list[int]:
    quantum = 16 if current % 16 == 0 else 2
    return [round(current * f / quantum) * quantum for f in (0.5, 0.75, 1.25, 1.5, 2.0)]


def _counts(current: int) -> list[int]:
    if current <= 0:
        return [10, 20, 50, 100]
    return [max(1, round(current * FACTOR**e)) for e in (-1.0, -0.5, 0.5, 1.0)]


def _flip(rng: random.Random, c: Constant) -> tuple[Replacements, str] | None:
    return _whole(c, str(not c.value))


FRACTION = _float_kind("fraction, log-scale in (0, 1)", 1e-3, 0.95, from_zero=(0.01, 0.2))
DROPOUT = _float_kind("dropout, log-scale up to 0.5, or off", 0.01, 0.5, from_zero=(0.02, 0.3), off=0.25)
DECAY = _float_kind("decay, log-scale, or off", 1e-4, 1.0, from_zero=(1e-3, 0.3), off=0.25)
RATE = _float_kind("rate, log-scale", 1e-6, 1.0)
CLIP = _float_kind("clip, log-scale", 0.05, 20.0)
ROPE = _float_kind("rotary base, log-scale", 100.0, 1e7)
NUMBER = _float_kind("number, log-scale", 1e-12, 1e12)
BETA = Kind("beta, log-scale of 1 - beta", _move_beta)
BETAS = Kind("betas, one moved on a log-scale of 1 - beta", _move_betas)
LAYERS = _int_kind("layers, integer steps", _steps, 1, 64)
HEADS = _int_kind("heads, steps or doublings", _head_counts, 1, 64)
KV_HEADS = _int_kind("key/value heads, doublings", _doublings, 1, 64)
WIDTH = _int_kind("width, quarter steps or doublings", _widths, 16, 8192)
HEAD_SIZE = _int_kind("head size, doublings", _doublings, 8, 1024)
CONTEXT = _int_kind("context, doublings", _doublings, 8, 16384)
BATCH = _int_kind("batch size, doublings", _doublings, 1, 4096)
COUNT = _int_kind("count, log-scale", _counts, 1, 1_000_000)
INTEGER = _int_kind("integer, steps", _steps, 1, 1_000_000)
SWITCH = Kind("switch, flipped", _flip)


def classify(name: str, value: object) -> Kind | None:
    """How a constant moves, by its name's parts and its value; None: it stays put."""
    parts = set(name.split("_"))
    betas = any(p.startswith("BETA") for p in parts)
    if parts & _FROZEN_PARTS:
        return None
    if isinstance(value, bool):
        return SWITCH
    if isinstance(value, tuple):
        in_range = all(type(v) in (int, float) and 0.0 < v < 1.0 for v in value)
        return BETAS if betas and value and in_range else None
    if not isinstance(value, int | float) or value < 0:
        return None
    if betas or ("DECAY" in parts and 0.5 < value < 1.0):
        return BETA if 0.0 < value < 1.0 else None
    if isinstance(value, float) or parts & {"FRACTION", "FRAC", "DROPOUT", "DROP", "LR", "RATE", "DECAY"}:
        if parts & {"DROPOUT", "DROP"}:
            return DROPOUT if 0.0 <= value < 1.0 else None
        if parts & {"FRACTION", "FRAC"}:
            return FRACTION if 0.0 <= value < 1.0 else None
        if "DECAY" in parts:
            return DECAY if value >= 0.0 else None
        if value <= 0.0:
            return None
        if parts & {"LR", "RATE", "LEARNING"}:
            return RATE
        if parts & {"CLIP", "NORM"}:
            return CLIP
        if parts & {"ROPE", "THETA"}:
            return ROPE
        return NUMBER
    if parts & {"HEAD", "HEADS"}:
        if parts & {"DIM", "SIZE"}:
            return HEAD_SIZE
        return KV_HEADS if "KV" in parts else HEADS
    if parts & {"LAYER", "LAYERS", "DEPTH"}:
        return LAYERS
    if parts & {"EMBD", "EMBED", "EMBEDDING", "DIM", "WIDTH"} or name == "D_MODEL":
        return WIDTH
    if parts & {"BLOCK", "CONTEXT", "CTX", "SEQ", "SEQUENCE"}:
        return CONTEXT
    if "BATCH" in parts:
        return BATCH
    if parts & {"STEPS", "STEP", "ITERS", "ACCUM"}:
        return COUNT
    if parts & {"CLIP", "NORM"}:
        return CLIP
    if parts & {"ROPE", "THETA"}:
        return ROPE
    return INTEGER


def movable(block: Block) -> list[tuple[Constant, Kind]]:
    """The constants of a block random search may move, with their kinds, in file order."""
    return [(c, kind) for c in block.constants if (kind := classify(c.name, c.value)) is not None]


# ---- constraints ----------------------------------------------------------------------------------------


def _role(values: dict[str, object], kind: Kind) -> int | None:
    """The value of the block's first integer of `kind` (the model width, the head count), if any."""
    for name, value in values.items():
        if type(value) is int and classify(name, value) is kind:
            return value
    return None


def constraint_problems(values: dict[str, object]) -> list[str]:
    """The shape constraints a block's values break: the width divisible by the heads, an even head size
    (rotary embeddings turn pairs of channels), the heads divisible by the key/value heads."""
    problems = []
    width, heads, kv_heads = _role(values, WIDTH), _role(values, HEADS), _role(values, KV_HEADS)
    if width is not None and heads:
        if width % heads:
            problems.append(f"width {width} is not divisible by {heads} heads")
        elif (width // heads) % 2:
            problems.append(f"head size {width // heads} is odd")
    if heads is not None and kv_heads and heads % kv_heads:
        problems.append(f"{heads} heads are not divisible by {kv_heads} key/value heads")
    return problems


# ---- edits ----------------------------------------------------------------------------------------------


def replace_spans(line: str, replacements: list[tuple[tuple[int, int], str]]) -> str:
    data = line.encode("utf-8")
    for (start, end), text in sorted(replacements, reverse=True):
        data = data[:start] + text.encode("utf-8") + data[end:]
    return data.decode("utf-8")


def _unique_window(lines: list[str], index: int, text: str) -> tuple[int, int]:
    """The fewest lines around `index` whose text occurs exactly once in `text`: the edit's search."""
    for radius in range(len(lines)):
        for before, after in ((0, radius), (radius, 0), (radius, radius)):
            start, end = max(0, index - before), min(len(lines), index + after + 1)
            if text.count("\n".join(lines[start:end])) == 1:
                return start, end
    return 0, len(lines)


def line_edits(source: str, new_lines: dict[int, str]) -> tuple[Edit, ...]:
    """Search/replace edits, applied in order, that replace the 1-based lines `new_lines` of `source`.

    Each edit's search is its line's exact text, widened to the neighbouring lines where that text occurs
    more than once (`LR = 1e-3` is also a part of `MIN_LR = 1e-3`).
    """
    edits = []
    current = source
    for lineno in sorted(new_lines):
        lines = current.split("\n")
        start, end = _unique_window(lines, lineno - 1, current)
        replaced = lines[start:end]
        replaced[lineno - 1 - start] = new_lines[lineno]
        edit = Edit(search="\n".join(lines[start:end]), replace="\n".join(replaced))
        current = apply_edit(current, edit)
        edits.append(edit)
    return tuple(edits)


# ---- the proposer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Move:
    constant: Constant
    kind: Kind
    replacements: Replacements
    shown: str
    """The new value as Python text, as the description shows it."""


class RandomSearch:
    """A Proposer that moves one or two constants of the current best train.py to random values."""

    name = "random"
    model_name: str | None = MODEL_NAME

    def __init__(self, seed: int | None = None) -> None:
        """`seed` makes the sequence of proposals reproducible (None: seeded by the OS)."""
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def propose(self, context: ProposalContext, emit: EventSink, cancel: threading.Event) -> Proposal | None:
        """One or two constants moved, as edits that apply to context.train_py and give a train.py not tried
        before. None, with a word why, when train.py has no constant it can move or MAX_DRAWS draws found no
        untried change within the constraints (the engine then ends the loop)."""
        with self._lock:
            draw_seed = self._rng.randrange(2**32)
        try:
            block = read_block(context.train_py)
        except SyntaxError as exc:
            emit(Info(message=f"random search: train.py does not parse ({exc.msg}); nothing to move"))
            return None
        candidates = movable(block)
        if not candidates:
            emit(Info(message="random search: train.py has no constant it can move"))
            return None
        rng = random.Random(draw_seed)
        # A constraint the file already breaks cannot be kept; then none is checked.
        check = not constraint_problems(block.values)
        for _ in range(MAX_DRAWS):
            if cancel.is_set():
                return None
            drawn = _draw(rng, context.train_py, block, candidates, check, context.tried_hashes)
            if drawn is not None:
                description, edits, reasoning, train_py = drawn
                return Proposal(
                    description=description,
                    edits=edits,
                    reasoning=reasoning,
                    proposer=self.name,
                    model=MODEL_NAME,
                    seed=draw_seed,
                    train_py=train_py,
                    base_hash=file_hash(context.train_py),
                )
        emit(Info(message=f"random search: no untried change within the constraints in {MAX_DRAWS} draws"))
        return None


def _draw(
    rng: random.Random,
    source: str,
    block: Block,
    candidates: list[tuple[Constant, Kind]],
    check: bool,
    tried: frozenset[str],
) -> tuple[str, tuple[Edit, ...], str, str] | None:
    """One draw: (description, edits, reasoning, the new train.py), or None if it changed nothing, broke a
    constraint or gave a train.py tried before."""
    count = rng.choice((1, 2)) if len(candidates) > 1 else 1
    moves = []
    for index in sorted(rng.sample(range(len(candidates)), count)):
        constant, kind = candidates[index]
        moved = kind.move(rng, constant)
        if moved is None:
            return None
        moves.append(_Move(constant, kind, *moved))
    if check:
        changed = {m.constant.name: ast.literal_eval(m.shown) for m in moves}
        if constraint_problems(block.values_with(changed)):
            return None
    lines = source.split("\n")
    per_line: dict[int, list[tuple[tuple[int, int], str]]] = {}
    for m in moves:
        per_line.setdefault(m.constant.lineno, []).extend(m.replacements)
    try:
        edits = line_edits(source, {n: replace_spans(lines[n - 1], r) for n, r in per_line.items()})
        new_source = apply_edits(source, edits)
    except EditError:
        return None
    if file_hash(new_source) in tried:
        return None
    description = "random: " + ", ".join(f"{m.constant.name} {m.constant.text} -> {m.shown}" for m in moves)
    reasoning = "Random search moved " + "; ".join(
        f"{m.constant.name} ({m.kind.name}) from {m.constant.text} to {m.shown}" for m in moves
    )
    return description, edits, reasoning + ".", new_source
