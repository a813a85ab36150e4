"""The workspace: a git repo on its own branch with the frozen harness recorded, refusing foreign folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_fakes import (
    FAKE_HARNESS_SHA256,
    FAKE_METRIC,
    FAKE_PREPARE,
    FAKE_TRAIN,
    make_source,
    make_workspace,
)

from agent import cli, workspace
from agent.config import EngineConfig
from agent.edits import file_hash
from agent.researcher.ideas import IdeaQueue
from agent.session import open_engine
from agent.workspace import PLACEHOLDER_PROGRAM, Workspace, WorkspaceError, default_tag


def test_init_layout(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    assert ws.branch == "autoresearch/test"
    assert ws.repo.active_branch.name == "autoresearch/test"
    assert sorted(ws.repo.git.ls_files().split()) == [
        "corpus.py",
        "metric.py",
        "prepare.py",
        "program.md",
        "train.py",
    ]
    assert ws.read_train() == FAKE_TRAIN
    assert ws.read_program() == PLACEHOLDER_PROGRAM  # no program.md to copy: a placeholder
    assert ws.meta["harness"] == FAKE_HARNESS_SHA256
    assert ws.harness_hashes() == ws.meta["harness"]
    ws.check_harness()  # made today: nothing to refuse
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
    (ws.path / "prepare.py").write_text(FAKE_PREPARE + "# kinder data\n")
    (ws.path / "metric.py").write_text(FAKE_METRIC + "# kinder metric\n")
    assert ws.harness_problems() == ["prepare.py", "metric.py"]  # corpus.py untouched
    ws.restore_harness()
    assert ws.harness_problems() == []
    assert (ws.path / "metric.py").read_text() == FAKE_METRIC


OLD_PREPARE = (
    FAKE_PREPARE
    + """

def judge(model_path, claims):
    return {"status": "ok", "reason": "", "val_bpb": 2.5}
"""
)
"""A prepare.py from before the split: the judge lived in it."""


@pytest.mark.parametrize(
    ("prepare", "why"),
    [
        (OLD_PREPARE, "before the frozen harness was split by reader .* no frozen corpus.py, metric.py"),
        (FAKE_PREPARE, "before runs were scored by a separate judge"),  # it has no judge at all
    ],
    ids=["before-the-split", "before-the-judge"],
)
def test_a_workspace_older_than_its_harness_is_refused_with_what_to_do(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    prepare: str,
    why: str,
) -> None:
    with monkeypatch.context() as then:
        then.setattr(workspace, "HARNESS", ("prepare.py",))  # `init` as it was: prepare.py alone was frozen
        old = make_workspace(tmp_path, prepare=prepare)
    assert old.meta["harness"] == {"prepare.py": file_hash(prepare)} and not (old.path / "metric.py").exists()
    ws = Workspace.open(old.path)
    expected = f"{why}.* so no run could be scored.* `autoresearch init NEW_FOLDER`.* `autoresearch log`"
    with pytest.raises(WorkspaceError, match=expected):
        ws.check_harness()
    (ws.path / "prepare.py").write_text(prepare + "# a hand edit\n")
    engine = open_engine(ws, IdeaQueue([]), EngineConfig(seeds=1), lambda e: None)
    engine.run()  # recovery resets and restores the files this workspace froze (no metric.py), then refuses
    assert engine.error is not None and "no run could be scored" in engine.error
    assert (ws.path / "prepare.py").read_text() == prepare
    capsys.readouterr()
    assert cli.main(["log", "--workspace", str(ws.path)]) == 0  # the old one stays readable


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
    engine = open_engine(ws, IdeaQueue([]), EngineConfig(seeds=1), lambda e: None)
    engine.run()
    assert engine.error is None
    assert not (Path(ws.repo.git_dir) / "index.lock").exists()


def test_a_hand_edit_of_train_py_is_saved_before_the_reset(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ws.train_path.write_text(FAKE_TRAIN + "# my experiment\n")
    engine = open_engine(ws, IdeaQueue([]), EngineConfig(seeds=1), lambda e: None)
    engine.run()
    [saved] = ws.state_dir.glob("train.py.*.uncommitted")
    assert saved.read_text().endswith("# my experiment\n")
    assert ws.read_train() == FAKE_TRAIN


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
