"""The `autoresearch` command: clear one-line errors with exit code 2, and every subcommand end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from engine_fakes import BETTER, CRASHES, WORSE, assert_consistent, cli, make_workspace, write_ideas

from agent import cli as cli_module
from agent import paths
from agent.ledger import Ledger


@pytest.fixture(autouse=True)
def _budget_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() exports --budget; make sure it does not leak out of an in-process test."""
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "unused")
    monkeypatch.delenv("AUTORESEARCH_BUDGET")


def _one_line_error(proc: Any) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return str(lines[0])


def test_a_bad_ideas_file_names_its_line(tmp_path: Path) -> None:
    ideas = tmp_path / "ideas.jsonl"
    ideas.write_text(json.dumps(BETTER) + "\n" + '{"description": "oops", "edits": [}\n')
    proc = cli("run", "--headless", "--workspace", str(tmp_path / "ws"), "--ideas", str(ideas))
    line = _one_line_error(proc)
    assert line.startswith("autoresearch: error: ")
    assert f"{ideas}:2: not valid JSON" in line
    assert not (tmp_path / "ws").exists()  # refused before anything was created


def test_init_refuses_a_folder_that_is_not_a_workspace(tmp_path: Path) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    line = _one_line_error(cli("init", str(folder)))
    assert "is not empty and is not a research workspace" in line
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_init_then_init_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ws"
    assert cli_module.main(["init", str(folder), "--tag", "exp1"]) == 0
    out = capsys.readouterr().out
    assert "branch autoresearch/exp1" in out
    assert sorted(p.name for p in folder.iterdir()) == [
        ".autoresearch",
        ".git",
        "prepare.py",
        "program.md",
        "train.py",
    ]
    assert cli_module.main(["init", str(folder)]) == 2
    assert "already a research workspace" in capsys.readouterr().err


def test_init_defaults_to_the_user_workspace(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_module.main(["init"]) == 0
    assert (paths.default_workspace() / ".git").is_dir()
    assert str(paths.data_dir()) in str(paths.default_workspace())  # under AUTORESEARCH_HOME in tests


def test_status_of_a_missing_workspace(tmp_path: Path) -> None:
    line = _one_line_error(cli("status", "--workspace", str(tmp_path / "nowhere")))
    assert "is not a research workspace" in line and "autoresearch init" in line


def test_bad_budget_and_bad_flags() -> None:
    assert "not understood" in _one_line_error(cli("status", "--budget", "soon"))
    line = _one_line_error(cli("run", "--ideas", "x.jsonl"))
    assert "--ideas need --headless" in line


def test_run_without_a_model_proposer_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "agent.llm", None)  # import fails
    assert cli_module.main(["run", "--headless", "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "the local-model proposer is not available" in err and "--ideas" in err


def test_run_status_log_report_reapply(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER, WORSE, CRASHES])
    workspace = ["--workspace", str(ws.path)]
    run = cli("run", "--headless", *workspace, "--ideas", str(ideas), "--seeds", "2", "--budget", "5")
    assert run.returncode == 0, run.stderr
    assert "#1 KEEP" in run.stdout and "#2 DISCARD" in run.stdout and "#3 CRASH" in run.stdout
    assert "noise floor" in run.stdout
    ledger = assert_consistent(ws)
    assert [e.status for e in ledger.experiments()] == ["baseline", "keep", "discard", "crash"]

    status = cli("status", *workspace)
    assert status.returncode == 0
    assert "best       2.100100 (#1: lower the learning rate)" in status.stdout
    assert "margin     0.002000" in status.stdout and "engine     not running" in status.stdout

    log = cli("log", *workspace, "--json")
    records = [json.loads(line) for line in log.stdout.splitlines()]
    assert [r["status"] for r in records] == ["baseline", "keep", "discard", "crash"]
    assert cli("log", *workspace, "-n", "1").stdout.startswith("#3")

    report = cli("report", *workspace)
    assert report.returncode == 0, report.stderr
    assert "baseline 2.500150 -> best 2.100100 (#1)" in report.stdout
    assert "1. #1" in report.stdout
    assert (ws.path / "progress.png").read_bytes()[:4] == b"\x89PNG"
    assert ws.repo.git.status("--porcelain") == ""  # progress.png and results.tsv stay untracked

    reapply = cli("reapply", "2", *workspace)
    assert reapply.returncode == 0, reapply.stderr
    assert "#2 queued again" in reapply.stdout and "#4 DISCARD" in reapply.stdout
    assert "budget 5 s" in reapply.stdout  # the workspace's budget, without --budget
    assert "no experiment #99" in _one_line_error(cli("reapply", "99", *workspace))


def test_json_events(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path)
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER])
    run = cli(
        "run", "--headless", "--json", "--workspace", str(ws.path), "--ideas", str(ideas), "--seeds", "1"
    )
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    kinds = {r["kind"] for r in records}
    assert {
        "RunStarted",
        "LogLine",
        "StepMetric",
        "RunFinished",
        "NoiseFloor",
        "Decided",
        "StateChanged",
    } <= kinds
    assert [r["status"] for r in records if r["kind"] == "Decided"] == ["baseline", "keep"]
    assert all(isinstance(r["ts"], float) for r in records)


def test_no_command_opens_the_cockpit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    class FakeApp:
        @staticmethod
        def run_app(workspace: Path, budget: str | None, model: str | None) -> int:
            calls.append({"workspace": workspace, "budget": budget, "model": model})
            return 0

    monkeypatch.setitem(sys.modules, "tui.app", FakeApp)
    assert cli_module.main(["--workspace", str(tmp_path), "--budget", "30", "--model", "tiny"]) == 0
    assert cli_module.main([]) == 0
    assert calls == [
        {"workspace": tmp_path, "budget": "30", "model": "tiny"},
        {"workspace": paths.default_workspace(), "budget": None, "model": None},
    ]


def test_models_is_delegated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[Path]] = []

    class FakeModels:
        @staticmethod
        def print_models(extra: list[Path]) -> int:
            seen.append(extra)
            return 0

    monkeypatch.setitem(sys.modules, "agent.models", FakeModels)
    assert cli_module.main(["models", str(tmp_path / "a.gguf")]) == 0
    assert seen == [[tmp_path / "a.gguf"]]


def test_options_after_the_subcommand_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = make_workspace(tmp_path)
    Ledger(ws.ledger_path).close()
    assert cli_module.main(["--workspace", "/nonexistent", "status", "--workspace", str(ws.path)]) == 0
    assert str(ws.path) in capsys.readouterr().out
    assert cli_module.main(["--workspace", str(ws.path), "status"]) == 0
