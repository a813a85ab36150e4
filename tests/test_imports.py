"""The house rules on imports: the contracts in pyproject.toml hold (lint-imports), a violation breaks them, and
importing the headless core loads neither textual nor torch nor matplotlib."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CORE = [
    "agent.cli",
    "agent.engine",
    "agent.books",
    "agent.session",
    "agent.ledger",
    "agent.workspace",
    "agent.printer",
    "agent.report",
    "agent.decisions",
    "agent.sandbox.runner",
    "agent.trainers.local",
    "agent.researcher.proposer",
    "agent.researcher.ideas",
]


def _lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", "--config", str(where / "pyproject.toml")],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contracts_hold() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("agent/engine.py", "from agent.trainers.ray import RayTrainers", "The engine schedules"),
        ("agent/engine.py", "from agent.researcher.proposer import ModelProposer", "The engine schedules"),
        ("agent/books.py", "import ray", "Ray is imported only by the Ray trainer"),
        ("agent/sandbox/spec.py", "import textual", "The core is headless"),
        ("agent/sandbox/runner.py", "from agent.ledger import Ledger", "The sandbox is the bottom"),
    ],
)
def test_a_violation_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The contracts are not vacuous: one forbidden import, in a copy of the code, is reported by name."""
    for name in ("agent", "tui", "nanogpt"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode == 1, done.stdout
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout


def test_importing_the_core_loads_no_ui_and_no_torch() -> None:
    """Heavy and UI imports happen where they are needed (a worker, a run), never at import of the core."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "roots = ('textual', 'textual_plotext', 'tui', 'torch', 'matplotlib', 'ray', 'llama_cpp')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in roots)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


LEDGER_WRITES = re.compile(
    r"\bledger\.(create|insert|update|start_run|finish_run|set_run_pid|set_meta|transaction|enqueue|dequeue|"
    r"record_override|write_results_tsv|queue_reapply)\("
)
GIT_MOVES = re.compile(
    r"\bws\.(repo|commit_candidate|move_branch|save_discarded|restore_harness|keep_ref|drop_ref)\b"
)


@pytest.mark.parametrize("module", ["agent/engine.py", "agent/slots.py", "agent/thinking.py"])
def test_the_scheduler_writes_no_ledger_and_moves_no_git(module: str) -> None:
    """Every ledger and git transition is a named method of agent/books.py (each with a crash point)."""
    text = (ROOT / module).read_text()
    assert LEDGER_WRITES.findall(text) == [] and GIT_MOVES.findall(text) == []


def test_the_books_are_where_the_writes_are() -> None:
    """The patterns above find writes where there are some (else the test before could not fail)."""
    text = (ROOT / "agent" / "books.py").read_text()
    assert {"insert", "update", "transaction", "set_meta", "finish_run"} <= set(LEDGER_WRITES.findall(text))
    assert {"commit_candidate", "move_branch", "save_discarded"} <= set(GIT_MOVES.findall(text))
