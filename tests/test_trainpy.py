"""The shape of train.py: its constants block ends at the first class or function, and one evaluator of
constant expressions computes values as Python does, running nothing."""

from __future__ import annotations

import ast

import pytest

from agent.trainpy import assignment, block, block_assignments, evaluate, first_definition

SOURCE = '''\
"""A train.py."""
import math

N_HEAD = 4
N_EMBD: int = 32 * N_HEAD
a, b = 1, 2
LEARNING_RATE = 2e-3


@decorated
def schedule(progress):
    return LEARNING_RATE


AFTER = 1
'''


def expression(text: str) -> ast.expr:
    node = ast.parse(text, mode="eval").body
    assert isinstance(node, ast.expr)
    return node


def test_the_block_is_what_comes_before_the_first_class_or_function() -> None:
    tree = ast.parse(SOURCE)
    first = first_definition(tree)
    assert isinstance(first, ast.FunctionDef) and first.name == "schedule"
    assert len(block(tree)) == 6  # docstring, import, four assignments; AFTER is code
    assert [name for name, _ in block_assignments(tree)] == ["N_HEAD", "N_EMBD", "LEARNING_RATE"]
    assert first_definition(ast.parse("A = 1\n")) is None and len(block(ast.parse("A = 1\nB = 2\n"))) == 2


def test_an_assignment_is_one_plain_name_bound() -> None:
    def assigned(text: str) -> str | None:
        found = assignment(ast.parse(text).body[0])
        return None if found is None else f"{found[0]} = {ast.unparse(found[1])}"

    assert assigned("X = 1") == "X = 1" and assigned("X: float = 1.5") == "X = 1.5"
    assert [assigned(t) for t in ("X = Y = 1", "x, y = 1, 2", "X += 1", "X: int", "o.x = 1")] == [None] * 5


def test_values_are_computed_as_python_does() -> None:
    names = {"N_HEAD": 4}
    assert evaluate(expression("32 * N_HEAD"), names) == 128
    assert evaluate(expression("(0.9, 1 - 0.05)")) == (0.9, 1 - 0.05)
    assert evaluate(expression("2**7 // 3 % 5")) == 2**7 // 3 % 5
    assert evaluate(expression("-True + 7 / 2")) == 2.5  # a switch is an int to Python
    assert evaluate(expression("2 ** 64")) == 2**64 and evaluate(expression("2.0 ** -64")) == 2.0**-64


@pytest.mark.parametrize(
    "text",
    ["N_LAYER", "len(x)", "'a' * 3", "(1,) + (2,)", "2**65", "(2**64 + 1) ** 2", "1 / 0", "1j // 2", "x.y"],
)
def test_anything_else_is_a_value_error_and_runs_nothing(text: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expression(text), {"N_HEAD": 4})
