"""The budget as a value (parsed once, the harness's grammar and mode names), the engine's configuration, and
the deadline a run gets from its budget."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agent.budget import CPU_FLOPS_PER_S, DEFAULT_CPU_SECONDS, DEFAULT_CUDA_SECONDS, Budget, BudgetMode
from agent.config import EngineConfig
from agent.sandbox.sandbox import Sandbox
from agent.sandbox.spec import RunRequest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = [
    ("60", BudgetMode.TIME, 60.0),
    (" 60s ", BudgetMode.TIME, 60.0),
    ("2.5s", BudgetMode.TIME, 2.5),
    ("60 seconds", BudgetMode.TIME, 60.0),
    ("120cpu", BudgetMode.CPU, 120.0),
    ("90 CPUS", BudgetMode.CPU, 90.0),
    ("1e12flops", BudgetMode.FLOPS, 1e12),
    ("3.5E11FLOPS", BudgetMode.FLOPS, 3.5e11),
    ("2.5e12flops", BudgetMode.FLOPS, 2.5e12),
]
NOT_BUDGETS = ["soon", "0", "-5", "60 minutes", "", "1e12 flop", "cpu"]


def _harness(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """nanogpt/prepare.py, imported by path for this test only (the frozen harness cannot import `agent`)."""
    spec = importlib.util.spec_from_file_location("harness_under_test", ROOT / "nanogpt" / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("text", "mode", "amount"), BUDGETS)
def test_a_budget_is_read_once_into_a_value(text: str, mode: BudgetMode, amount: float) -> None:
    budget = Budget.parse(text)
    assert (budget.mode, budget.amount) == (mode, amount)
    assert Budget.parse(budget.text) == budget  # the text it is exported as reads back the same


@pytest.mark.parametrize("text", NOT_BUDGETS)
def test_a_bad_budget_says_what_is_valid(text: str) -> None:
    with pytest.raises(ValueError, match="wall seconds .* CPU seconds .* FLOPs"):
        Budget.parse(text)


def test_the_engine_and_the_harness_read_every_budget_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness keeps its own copy of the grammar (it is frozen and cannot import agent): the two readings
    are the same (mode, amount), mode names included, and so are the defaults and the CPU FLOPs rate."""
    harness = _harness(monkeypatch)
    for text, _, _ in BUDGETS:
        theirs = harness.parse_budget(text)
        ours = Budget.parse(text)
        assert (theirs.mode, theirs.amount) == (ours.mode, ours.amount), text
        assert str(theirs) == ours.describe()
    for text in NOT_BUDGETS[:-3]:
        with pytest.raises(ValueError):
            harness.parse_budget(text)
    for device, harness_device in (("cpu (2 cores)", "cpu"), ("cuda: H100", "cuda")):
        default = harness.parse_budget(None, harness_device)
        assert (default.mode, default.amount) == (Budget.default(device).mode, Budget.default(device).amount)
    assert harness.DEFAULT_CPU_WALL_SECONDS == DEFAULT_CPU_SECONDS
    assert harness.DEFAULT_TIME_SECONDS_CUDA == DEFAULT_CUDA_SECONDS
    assert pytest.approx(harness.DEFAULT_CPU_FLOPS / 60.0) == CPU_FLOPS_PER_S


def test_what_a_budget_says_and_costs() -> None:
    assert (
        Budget.parse("60").describe() == "60 s" and Budget.parse("2.5e12flops").describe() == "2.50e+12 FLOPs"
    )
    assert Budget.parse("120cpu").describe() == "120 CPU s"
    assert (
        Budget.default("cpu (2 cores)").describe() == "60 s"
        and Budget.default("cuda: H200").describe() == "300 s"
    )
    assert Budget.parse("30").estimate_seconds() == (30.0, False)
    assert Budget.parse("2.9e12flops").estimate_seconds() == (pytest.approx(60.0), True)
    assert Budget.parse("120cpu").estimate_seconds()[1] is True
    assert Budget.parse("60").measured_outside and Budget.parse("9cpu").measured_outside
    assert not Budget.parse("1e12flops").measured_outside  # the run's own count: only the deadline bounds it


def test_the_configuration_is_frozen() -> None:
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = Budget.parse("60")  # type: ignore[misc]


def test_the_deadline_follows_the_budget(tmp_path: Path) -> None:
    def deadline(budget: str, observed: float | None = None, **config: float) -> float:
        sandbox = Sandbox(
            harness=tmp_path,
            harness_hashes=None,
            scratch_root=tmp_path / "scratch",
            config=EngineConfig(**config),  # type: ignore[arg-type]
            env={},
            emit=lambda event: None,
        )
        request = RunRequest(
            0, 0, 1, "", Budget.parse(budget), tmp_path / "run.log", observed_training_s=observed
        )
        return sandbox.deadline(request)

    assert deadline("10", eval_s=5, grace_s=2) == 17.0
    assert deadline("2.9e12flops", eval_s=5, grace_s=2) == pytest.approx(60.0 * 3 + 7)
    # Slower than the estimate (the baseline measured it): the deadline follows.
    assert deadline("2.9e12flops", 100.0, eval_s=5, grace_s=2) == pytest.approx(100.0 * 3 + 7)
    assert deadline("10", 100.0, eval_s=5, grace_s=2) == 17.0  # a wall budget is no estimate
    assert deadline("10", deadline_s=4.0) == 4.0
