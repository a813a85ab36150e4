"""The static no-op check: an edit that cannot change the computation is recorded without a run, in
milliseconds; anything that may change it (or does not parse) is left to the probe and the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.static_noop import static_noop

TRAIN = (Path(__file__).resolve().parent.parent / "nanogpt" / "train.py").read_text()


def edited(old: str, new: str, text: str = TRAIN) -> str:
    assert text.count(old) == 1, f"{old!r} is not in nanogpt/train.py once any more"
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("N_LAYER = 2\n", "N_LAYER = 2  # two blocks\n\n", "only comments or formatting changed"),
        ("BETAS = (0.9, 0.95)", "BETAS = (\n    0.9,\n    0.95,\n)", "only comments or formatting changed"),
        (
            "LEARNING_RATE = 2e-3",
            "LEARNING_RATE = 0.002",
            "the same values written differently (0.002 for 2e-3)",
        ),
        ("N_EMBD = 128", "N_EMBD = 2 * 64", "the same values written differently"),
        (
            "def forward(self, x):\n        B, T",
            'def forward(self, x):\n        """(B, T, C)"""\n        B, T',
            "docstrings",
        ),
        (
            "GRAD_CLIP = 1.0\n",
            "GRAD_CLIP = 1.0\nUNUSED_SCALE = 3.0\n",
            "nothing reads changed (UNUSED_SCALE)",
        ),
        ("\n\nclass MLP", "\n\ndef helper(x, k=2):\n    return x * k\n\n\nclass MLP", "(helper)"),
    ],
    ids=["comment", "layout", "spelling", "arithmetic", "docstring", "unused-constant", "unused-function"],
)
def test_an_edit_that_cannot_change_the_computation_is_a_static_noop(old: str, new: str, reason: str) -> None:
    found = static_noop(TRAIN, edited(old, new))
    assert found is not None and found.startswith("no-op: ") and reason in found
    assert static_noop(TRAIN, TRAIN) == "no-op: train.py is unchanged"


def test_an_unused_constant_changed_in_the_parent_and_the_candidate_is_a_noop() -> None:
    parent = edited("GRAD_CLIP = 1.0\n", "GRAD_CLIP = 1.0\nSPARE = 3\n")
    assert static_noop(parent, edited("SPARE = 3", "SPARE = 4", parent)) == (
        "no-op: only definitions nothing reads changed (SPARE)"
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("LEARNING_RATE = 2e-3", "LEARNING_RATE = 3e-3"),
        ("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 * (1 + 2**-52)"),  # one ulp of a float64
        ("GRAD_CLIP = 1.0", "GRAD_CLIP = 1"),  # an int is not a float
        ("LOG_EVERY = 25", "LOG_EVERY = 50"),  # read by the loop: only a probe can tell it changes no number
        (
            "        optimizer.step()\n        step += 1",
            "        optimizer.step()\n    step += 1",
        ),  # indentation
        ("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 +"),  # does not parse: its crash is its result
    ],
    ids=["value", "float64-ulp", "int-for-float", "used-constant", "moved-out-of-loop", "syntax-error"],
)
def test_an_edit_that_may_change_the_computation_is_not_a_static_noop(old: str, new: str) -> None:
    assert static_noop(TRAIN, edited(old, new)) is None


def test_a_file_that_may_read_its_globals_by_name_keeps_its_unused_constants() -> None:
    parent = edited("GRAD_CLIP = 1.0\n", "GRAD_CLIP = 1.0\nSPARE = 3\nprint(globals()['SPARE'])\n")
    assert static_noop(parent, edited("SPARE = 3", "SPARE = 4", parent)) is None
    called = edited("GRAD_CLIP = 1.0\n", "GRAD_CLIP = 1.0\nSPARE = len([])\n")  # a call may act: kept
    assert static_noop(called, edited("SPARE = len([])", "SPARE = len([1])", called)) is None


@pytest.mark.parametrize(
    ("old", "new", "noop"),
    [
        ("N_EMBD = 128", "N_EMBD = 2**7", True),
        ("N_EMBD = 128", "N_EMBD = -(-128)", True),
        ("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 + 0 * 2**1000", False),  # too large to fold
        ("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 + 1 / 0", False),  # Python raises: the run says so
        ("LEARNING_RATE = 2e-3", "LEARNING_RATE = 2e-3 + (1j // 2).real", False),  # TypeError in Python
        ("BETAS = (0.9, 0.95)", "BETAS = (0.9,) + (0.95,)", False),  # arithmetic on numbers only
    ],
    ids=["power", "double-negation", "huge-power", "division-by-zero", "complex-floor", "tuple"],
)
def test_arithmetic_is_folded_as_python_computes_it_and_nothing_else(old: str, new: str, noop: bool) -> None:
    found = static_noop(TRAIN, edited(old, new))
    assert (found == "no-op: the same values written differently") if noop else found is None, found
