"""The shape of train.py: its constants block and values.

train.py opens with its constants (imports and `NAME = value` lines, under a comment that says so) and goes on
with its code from the first top-level class or function. The prompt shows the two apart
(`researcher.prompt.split_train_py`), random search moves the constants (`researcher.random_search.read_block`)
and the static no-op check compares values however they are written (`static_noop`): they read the block with
`first_definition`, `block` and `assignment`, and compute a value with `evaluate`, the one evaluator of
constant expressions, which runs nothing of the file.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
Number = int | float | complex
"""What `evaluate` does arithmetic on (bool too: an int to Python)."""

MAX_EXPONENT = 64
"""`evaluate` computes `a ** b` only for |b| up to this ..."""
MAX_BASE = 2**64
"""... and |a| up to this: no huge numbers from a proposal."""

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def first_definition(tree: ast.Module) -> ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | None:
    """The first top-level class or function, where the constants block ends; None when there is none."""
    for node in tree.body:
        if isinstance(node, _DEFINITIONS):
            return node
    return None


def block(tree: ast.Module) -> list[ast.stmt]:
    """The top-level statements before the first class or function: the docstring, imports and constants."""
    end = first_definition(tree)
    return tree.body if end is None else tree.body[: tree.body.index(end)]


def assignment(node: ast.stmt) -> tuple[str, ast.expr] | None:
    """(name, value) of `NAME = value` or `NAME: T = value` with one plain name as target, else None."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return node.target.id, node.value
    return None


def block_assignments(tree: ast.Module) -> tuple[tuple[str, ast.expr], ...]:
    """The (name, value) of each plain assignment of the constants block, in file order."""
    return tuple(assigned for node in block(tree) if (assigned := assignment(node)) is not None)


def evaluate(node: ast.expr, names: Mapping[str, object] | None = None) -> object:
    """The value of a constant expression as Python computes it, without running anything.

    Number literals (switches included: `True` is 1 to Python), the `names` given, tuples of these, and
    `+ - * / // % **` and unary `- +` on numbers. ValueError for anything else: a call, a name not given, a
    power too large (see MAX_EXPONENT), an operation Python refuses (a division by zero, `1j // 2`).
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, Number):
        return node.value
    if isinstance(node, ast.Name) and names is not None and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(evaluate(element, names) for element in node.elts)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _compute(_UNARY[type(node.op)], evaluate(node.operand, names))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = evaluate(node.left, names), evaluate(node.right, names)
        if isinstance(node.op, ast.Pow) and _too_large(left, right):
            raise ValueError("a power too large to compute")
        return _compute(_BINARY[type(node.op)], left, right)
    raise ValueError("not a constant expression")


def _too_large(base: object, exponent: object) -> bool:
    if not isinstance(base, Number) or not isinstance(exponent, Number):
        return False  # _compute refuses it
    return abs(exponent) > MAX_EXPONENT or abs(base) > MAX_BASE


def _compute(op: Callable[..., Any], *operands: object) -> object:
    if not all(isinstance(operand, Number) for operand in operands):
        raise ValueError("arithmetic on something other than numbers")
    try:
        return op(*operands)
    except (ArithmeticError, TypeError, ValueError) as exc:
        raise ValueError(f"Python refuses it: {exc}") from None
