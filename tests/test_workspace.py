"""The workspace: a git repo on its own branch with the frozen harness recorded, refusing foreign folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_fakes import FAKE_PREPARE, FAKE_TRAIN, make_source, make_workspace

from agent.config import (
    CPU_FLOPS_PER_S,
    DEFAULT_CPU_WALL_SECONDS,
    DEFAULT_CUDA_SECONDS,
    EngineConfig,
    budget_seconds,
    check_budget,
    describe_budget,
    estimate_training_seconds,
    resolve_budget,
)
from agent.edits import file_hash
from agent.engine import Engine
from agent.ideas import IdeaQueue
from agent.workspace import PLACEHOLDER_PROGRAM, Workspace, WorkspaceError, default_tag


def test_init_layout(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    assert ws.branch == "autoresearch/test"
    assert ws.repo.active_branch.name == "autoresearch/test"
    assert sorted(ws.repo.git.ls_files().split()) == ["prepare.py", "program.md", "train.py"]
    assert ws.read_train() == FAKE_TRAIN
    assert ws.read_program() == PLACEHOLDER_PROGRAM  # no program.md to copy: a placeholder
    assert ws.meta["harness"] == {"prepare.py": file_hash(FAKE_PREPARE)}
    assert ws.head() == ws.initial_commit
    exclude = (ws.path / ".git" / "info" / "exclude").read_text()
    assert "results.tsv" in exclude and "runs/" in exclude and ".autoresearch/" in exclude
    (ws.path / "results.tsv").write_text("x")
    (ws.path / "runs").mkdir()
    (ws.path / "runs" / "log").write_text("x")
    assert ws.repo.git.status("--porcelain") == ""
    assert Workspace.open(ws.path).branch == ws.branch


def test_program_md_is_copied(tmp_path: Path) -> None:
    program = tmp_path / "program.md"
    program.write_text("# mine\n")
    source = make_source(tmp_path / "src")
    ws = Workspace.init(tmp_path / "ws", tag="t", source=source, program=program)
    assert ws.read_program() == "# mine\n"


def test_default_tag_is_the_date() -> None:
    tag = default_tag()
    assert tag[:3].isalpha() and tag[3:].isdigit() and tag == tag.lower()


def test_refusals(tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(WorkspaceError, match="not empty"):
        Workspace.init(busy, source=source)
    with pytest.raises(WorkspaceError, match="is a file"):
        Workspace.init(busy / "x", source=source)
    with pytest.raises(WorkspaceError, match="tag"):
        Workspace.init(tmp_path / "new", tag="no spaces please", source=source)
    with pytest.raises(WorkspaceError, match="missing"):
        Workspace.init(tmp_path / "new", source=tmp_path / "nothing")
    with pytest.raises(WorkspaceError, match="not a research workspace"):
        Workspace.open(busy)
    ws = Workspace.init(tmp_path / "empty-is-fine", source=source)
    with pytest.raises(WorkspaceError, match="already a research workspace"):
        Workspace.init(ws.path, source=source)
    assert Workspace.open_or_init(ws.path).path == ws.path


def test_harness_check_and_restore(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    (ws.path / "prepare.py").write_text(FAKE_PREPARE + "# kinder metric\n")
    assert ws.harness_problems() == ["prepare.py"]
    ws.restore_harness()
    assert ws.harness_problems() == []


def test_one_engine_per_workspace(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    assert not ws.engine_running()
    with ws.engine_lock():
        assert ws.engine_running()
        with pytest.raises(WorkspaceError, match="another engine"), ws.engine_lock():
            pass
    assert not ws.engine_running()


def test_recover_clears_a_stale_git_lock(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    (Path(ws.repo.git_dir) / "index.lock").write_text("")
    engine = Engine(ws, IdeaQueue([]), EngineConfig(seeds=1), lambda e: None)
    engine.run()
    assert engine.error is None
    assert not (Path(ws.repo.git_dir) / "index.lock").exists()


def test_budgets() -> None:
    assert check_budget(" 60s ") == "60s"
    for good in ("60", "60s", "60 seconds", "120cpu", "2.5e12flops", "3e11FLOPS"):
        check_budget(good)
    for bad in ("soon", "0", "-5", "60 minutes"):
        with pytest.raises(ValueError):
            check_budget(bad)
    assert (
        budget_seconds("60s") == 60.0 and budget_seconds("1e12flops") is None and budget_seconds(None) is None
    )
    assert describe_budget("60") == "60 s" and describe_budget("2.5e12flops") == "2.50e+12 FLOPs"
    assert describe_budget(None) == "harness default" and describe_budget(None, "cpu (2 cores)") == "60 s"
    assert describe_budget(None, "cuda: H200") == "300 s"
    assert estimate_training_seconds("30", "cpu") == (30.0, False)
    assert estimate_training_seconds("2.9e12flops", "cpu") == (pytest.approx(60.0), True)
    assert estimate_training_seconds(None, "cuda: H100") == (300.0, False)
    assert estimate_training_seconds("120cpu", "cpu")[1] is True and describe_budget("120cpu") == "120 CPU s"


def test_deadline(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    engine = Engine(ws, IdeaQueue([]), EngineConfig(budget="10", eval_s=5, grace_s=2), lambda e: None)
    assert engine._deadline() == 17.0
    flops = Engine(ws, IdeaQueue([]), EngineConfig(budget="2.9e12flops", eval_s=5, grace_s=2), lambda e: None)
    assert flops._deadline() == pytest.approx(60.0 * 3 + 7)
    flops.ledger.set_meta(
        "baseline_training_seconds", 100.0
    )  # slower than the estimate: the deadline follows
    assert flops._deadline() == pytest.approx(100.0 * 3 + 7)
    fixed = Engine(ws, IdeaQueue([]), EngineConfig(deadline_s=4.0), lambda e: None)
    assert fixed._deadline() == 4.0


def test_a_hand_edit_of_train_py_is_saved_before_the_reset(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ws.train_path.write_text(FAKE_TRAIN + "# my experiment\n")
    engine = Engine(ws, IdeaQueue([]), EngineConfig(seeds=1), lambda e: None)
    engine.run()
    [saved] = ws.state_dir.glob("train.py.*.uncommitted")
    assert saved.read_text().endswith("# my experiment\n")
    assert ws.read_train() == FAKE_TRAIN


def test_the_engine_and_the_harness_agree_on_budgets() -> None:
    """agent.config mirrors the harness's budget grammar and CPU rate without importing torch."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nanogpt"))
    import prepare

    assert pytest.approx(prepare.DEFAULT_CPU_FLOPS / 60.0) == CPU_FLOPS_PER_S
    assert prepare.DEFAULT_CPU_WALL_SECONDS == DEFAULT_CPU_WALL_SECONDS
    assert prepare.DEFAULT_TIME_SECONDS_CUDA == DEFAULT_CUDA_SECONDS
    default = prepare.parse_budget(None, "cpu")
    assert resolve_budget(None, "cpu (2 cores)") == (default.mode, default.amount)
    for spec in ("60", "60s", "2.5s", "1e12flops", "3.5E11FLOPS", "120cpu", "90 CPUS"):
        check_budget(spec)
        assert prepare.describe_budget(spec) == describe_budget(spec)
        assert prepare.estimate_seconds(spec) == pytest.approx(estimate_training_seconds(spec, "cpu")[0])


def test_git_hooks_and_fsmonitor_planted_in_a_workspace_never_run(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    canary = tmp_path / "hook-ran"
    hooks = Path(ws.repo.git_dir) / "hooks"
    for name in ("pre-commit", "post-commit", "post-checkout", "reference-transaction", "fsmonitor-watchman"):
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> {canary}\n")
        (hooks / name).chmod(0o755)
    ws.repo.git.config("core.fsmonitor", str(hooks / "fsmonitor-watchman"))
    reopened = Workspace.open(ws.path)
    commit = reopened.commit_candidate(FAKE_TRAIN + "# changed\n", reopened.head(), "an experiment")
    reopened.move_branch(commit)  # a keep
    reopened.move_branch(reopened.initial_commit)
    reopened.save_discarded(1, commit)
    reopened.changed_tracked_files()
    assert not canary.exists(), canary.read_text()
