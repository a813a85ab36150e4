"""The `autoresearch` command: clear one-line errors with exit code 2, and every subcommand end to end."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from engine_fakes import BETTER, CRASHES, WORSE, assert_consistent, cli, make_workspace, write_ideas

from agent import cli as cli_module
from agent import paths
from agent.budget import Budget
from agent.ledger import Ledger
from agent.sandbox.containment import probe


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
        "corpus.py",
        "metric.py",
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
    monkeypatch.setitem(sys.modules, "agent.researcher.proposer", None)  # import fails
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
    assert f"runs       {probe().summary}" in status.stdout  # which containment runs get here

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
        "NoiseMeasured",
        "Decided",
        "StateChanged",
    } <= kinds
    assert [r["status"] for r in records if r["kind"] == "Decided"] == ["baseline", "keep"]
    assert all(isinstance(r["ts"], float) for r in records)


def test_no_command_opens_the_cockpit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    class FakeApp:
        @staticmethod
        def run_app(
            workspace: Path, budget: Budget | None, model: str | None, seed: int | None, **scheduling: Any
        ) -> int:
            calls.append(
                {"workspace": workspace, "budget": budget, "model": model, "seed": seed, **scheduling}
            )
            return 0

    monkeypatch.setitem(sys.modules, "tui.app", FakeApp)
    assert cli_module.main(["--workspace", str(tmp_path), "--budget", "30", "--model", "tiny"]) == 0
    assert cli_module.main([]) == 0
    assert cli_module.main(["run", "--seed", "4"]) == 0  # run without --headless is the cockpit
    assert cli_module.main(["--trainers", "2", "--ray", "local", "--overlap", "on"]) == 0
    assert cli_module.main(["run", "--trainers", "3", "--overlap", "off"]) == 0
    one = {"trainers": 1, "ray": None}
    assert calls == [
        {"workspace": tmp_path, "budget": Budget.parse("30"), "model": "tiny", "seed": None, **one},
        {"workspace": paths.default_workspace(), "budget": None, "model": None, "seed": None, **one},
        {"workspace": paths.default_workspace(), "budget": None, "model": None, "seed": 4, **one},
        {
            "workspace": paths.default_workspace(),
            "budget": None,
            "model": None,
            "seed": None,
            "trainers": 2,
            "ray": "local",
            "overlap": True,
        },
        {
            "workspace": paths.default_workspace(),
            "budget": None,
            "model": None,
            "seed": None,
            "trainers": 3,
            "ray": None,
            "overlap": False,
        },
    ]
    assert cli_module.main(["--trainers", "0"]) == 2 and len(calls) == 5  # refused before the cockpit
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "45cpu")  # the budget where no --budget is given
    assert cli_module.main([]) == 0 and cli_module.main(["--budget", "20"]) == 0
    assert [call["budget"] for call in calls[5:]] == [Budget.parse("45cpu"), Budget.parse("20")]
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "soon")
    assert cli_module.main([]) == 2 and len(calls) == 7  # refused, said in one line, like --budget soon


def test_models_lists_the_models_and_the_files_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_module.main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NAME ") and "qwen2.5-coder-1.5b *" in out
    assert cli_module.main(["models", str(tmp_path / "a.gguf")]) == 1  # a given file that is not there
    assert f"a: {tmp_path / 'a.gguf'}: no such file" in capsys.readouterr().out


def test_options_after_the_subcommand_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = make_workspace(tmp_path)
    Ledger(ws.ledger_path).close()
    assert cli_module.main(["--workspace", "/nonexistent", "status", "--workspace", str(ws.path)]) == 0
    assert str(ws.path) in capsys.readouterr().out
    assert cli_module.main(["--workspace", str(ws.path), "status"]) == 0


# ---- the command line does what the README and --help say ---------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
PARSER = cli_module.build_parser()
SAMPLE = "3"
"""The value given to every option and positional that takes one (an int, a path and a word all read it)."""


def parse(argv: list[str]) -> argparse.Namespace:
    return PARSER.parse_args(argv)


def refused(argv: list[str]) -> str:
    """The one line argparse prints when it refuses `argv` (exit code 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2, argv
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, err.getvalue()
    return lines[0]


def help_text(command: str | None) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse([command, "--help"] if command else ["--help"])
    return out.getvalue()


def help_options(command: str | None) -> list[tuple[tuple[str, ...], str | None]]:
    """Each option of `autoresearch [COMMAND] --help` as (its aliases, its metavar), -h/--help left out."""
    options = []
    for line in help_text(command).splitlines():
        if not re.match(r"  -", line):
            continue
        invocation = re.split(r"\s{2,}", line.strip())[0]
        forms = [form.split(" ", 1) for form in invocation.split(", ")]
        aliases = tuple(form[0] for form in forms)
        if "--help" not in aliases:
            options.append((aliases, forms[0][1] if len(forms[0]) > 1 else None))
    return options


def help_commands() -> list[str]:
    """The subcommands `autoresearch --help` lists."""
    text = help_text(None)
    return re.findall(r"^    ([a-z][a-z-]*)\b", text, re.MULTILINE)


@dataclass(frozen=True)
class Usage:
    """One usage the README shows, e.g. `autoresearch run --headless [--ideas FILE] [-v]`."""

    text: str
    command: str | None
    required: tuple[tuple[str, str | None], ...]
    """Options (name, metavar) and positionals (metavar, None) written without brackets."""
    optional: tuple[tuple[str, str | None], ...]
    """The bracketed ones."""


def samples(written: str) -> list[str]:
    """What to pass where a usage writes `written`: SAMPLE for a metavar (`DIR`; twice for `PATH...`), the
    first choice of `{cpu,gpu}` or `cpu|gpu`, or the word itself (`http://localhost:8080/v1`)."""
    if re.fullmatch(r"[A-Z][A-Z_]*(\|[A-Z][A-Z_]*)*(\.\.\.)?", written):
        return [SAMPLE, SAMPLE + "4"] if written.endswith("...") else [SAMPLE]
    choices = re.split(r"[|,]", written.strip("{}"))
    return [choices[0]]


def takes_value(command: str | None) -> set[str]:
    """The options of `autoresearch [COMMAND] --help` that take a value."""
    return {alias for aliases, metavar in help_options(command) if metavar for alias in aliases}


def usages(text: str) -> list[Usage]:
    """The usages in `text`: `autoresearch [COMMAND] ...`, alternatives separated by ` | `."""
    found = []
    for line in text.splitlines():
        words = re.findall(r"\[[^\]]*\]|[^\s\[\]]+", line.split(" #")[0])
        if not words or words[0] != "autoresearch":
            continue
        segments: list[list[str]] = [[]]
        for word in words[1:]:
            if word == "|":
                segments.append([])
            else:
                segments[-1].append(word)
        for segment in segments:
            command = segment.pop(0) if segment and re.fullmatch(r"[a-z][a-z-]*", segment[0]) else None
            required: list[tuple[str, str | None]] = []
            optional: list[tuple[str, str | None]] = []
            valued = takes_value(command)
            for word in segment:
                if required and required[-1][0] in valued and required[-1][1] is None:
                    required[-1] = (required[-1][0], word)  # `--workspace DIR` written without brackets
                    continue
                parts = word.strip("[]").split(" ", 1)
                item = (parts[0], parts[1] if len(parts) > 1 else None)
                (optional if word.startswith("[") else required).append(item)
            found.append(Usage(line.strip(), command, tuple(required), tuple(optional)))
    return found


def readme_usages() -> list[Usage]:
    """Every usage the README shows: the command-line section's blocks, and `autoresearch ...` code spans."""
    text = README.read_text()
    section = text.split("\n## The command line\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    spans = [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]
    return usages("\n".join(blocks)) + usages("\n".join(s for s in spans if s.startswith("autoresearch")))


def readme_option_spans() -> list[str]:
    """The options the command-line section names in prose (`--seed N`, `--budget`)."""
    section = README.read_text().split("\n## The command line\n", 1)[1].split("\n## ", 1)[0]
    spans = [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", section)]
    return [span.split(" ")[0] for span in spans if span.startswith("-")]


def argv_of(items: Sequence[tuple[str, str | None]]) -> list[str]:
    argv: list[str] = []
    for name, metavar in items:
        if name.startswith("-"):
            argv += [name, *samples(metavar)[:1]] if metavar else [name]
        else:
            argv += samples(name)
    return argv


def as_text(value: object) -> object:
    """A parsed value as the command line wrote it: True for a flag, a list of texts for `PATH...`."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return value if value is True else str(value)


def changes(baseline: list[str], argv: list[str]) -> dict[str, object]:
    """What `argv` sets beyond `baseline`, values as text."""
    before, after = vars(parse(baseline)), vars(parse(argv))
    return {key: as_text(value) for key, value in after.items() if before.get(key, object()) != value}


def dest(aliases: Sequence[str]) -> str:
    """The attribute an option is meant to set: named after its first long form."""
    name = next((a for a in aliases if a.startswith("--")), aliases[0])
    return name.lstrip("-").replace("-", "_")


def command_argv(command: str | None, without: str | None = None) -> list[str]:
    """The command with the least its README usages require (`run --headless`, `reapply ID`), `without` one
    option: the baseline an option is added to."""
    shown = [usage.required for usage in readme_usages() if usage.command == command]
    required = min(shown, key=len, default=())
    return ([command] if command else []) + argv_of([item for item in required if item[0] != without])


def test_the_readme_shows_usages_of_every_command() -> None:
    shown = {usage.command for usage in readme_usages()}
    assert None in shown and {"run", "init", "status", "log", "report", "reapply", "models"} <= shown
    assert set(help_commands()) <= shown, "a command of `autoresearch --help` is missing from the README"


def test_every_option_the_readme_shows_is_accepted_and_sets_what_it_names() -> None:
    checked = 0
    for usage in readme_usages():
        aliases_of = {alias: aliases for aliases, _ in help_options(usage.command) for alias in aliases}
        base = [usage.command] if usage.command else []
        items = usage.required + usage.optional
        for name, metavar in items:
            baseline = base + argv_of([item for item in usage.required if item != (name, metavar)])
            given = argv_of([(name, metavar)])
            where = f"{name} in `{usage.text}`"
            if not name.startswith("-"):  # a positional: it must land somewhere, as given
                landed = [as_text(value) for value in vars(parse(baseline + given)).values()]
                assert given in landed or given[0] in landed, where  # a list for `PATH...`
                continue
            assert name in aliases_of, f"{where} is not in `autoresearch {usage.command or ''} --help`"
            expected: object = True if metavar is None else samples(metavar)[0]
            assert changes(baseline, baseline + given) == {dest(aliases_of[name]): expected}, where
            checked += 1
    assert checked >= 15


def test_every_option_the_readme_names_in_prose_exists() -> None:
    named = set(readme_option_spans())
    assert {"--budget", "--seed", "--seeds", "--ideas"} <= named
    known = {
        alias
        for command in [None, *help_commands()]
        for aliases, _ in help_options(command)
        for alias in aliases
    }
    assert named <= known


def test_every_option_in_help_is_accepted_and_sets_its_own_destination() -> None:
    for command in [None, *help_commands()]:
        for aliases, metavar in help_options(command):
            for alias in aliases:
                baseline = command_argv(command, without=aliases[0])
                given = [alias, *samples(metavar)[:1]] if metavar else [alias]
                expected: object = True if metavar is None else samples(metavar)[0]
                assert changes(baseline, baseline + given) == {dest(aliases): expected}, (command, alias)


def test_no_option_is_abbreviated() -> None:
    tried = 0
    for command in [None, *help_commands()]:
        baseline = command_argv(command)
        known = {alias for aliases, _ in help_options(command) for alias in aliases}
        for option in sorted(alias for alias in known if alias.startswith("--")):
            for prefix in (option[:end] for end in range(3, len(option)) if option[:end] not in known):
                assert "unrecognized arguments" in refused([*baseline, f"{prefix}={SAMPLE}"]), prefix
                tried += 1
    assert tried > 100


def test_seed_is_the_proposers_and_seeds_the_baselines() -> None:
    assert (parse(["run", "--seed", "2"]).seed, parse(["run", "--seed", "2"]).seeds) == (2, None)
    assert (parse(["run", "--seeds", "2"]).seed, parse(["run", "--seeds", "2"]).seeds) == (None, 2)
    assert parse(["--seed", "5", "run", "--headless"]).seed == 5  # before the command, as --workspace
    assert parse(["--seed", "5"]).seed == 5


def test_seed_reaches_the_model_proposer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import agent.researcher.proposer

    asked: list[tuple[str | None, int | None]] = []

    def make_proposer(model: str | None, seed: int | None) -> Any:
        asked.append((model, seed))
        raise cli_module.CliError("stopped before the engine")

    monkeypatch.setattr(agent.researcher.proposer, "make_proposer", make_proposer)
    workspace = ["--workspace", str(tmp_path / "ws")]
    assert cli_module.main(["run", "--headless", *workspace, "--seed", "7", "--model", "tiny"]) == 2
    assert cli_module.main(["run", "--headless", *workspace]) == 2
    assert asked == [("tiny", 7), (None, None)]
    assert "stopped before the engine" in capsys.readouterr().err


def test_seed_where_it_means_nothing_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ideas = write_ideas(tmp_path / "ideas.jsonl", [BETTER])
    assert cli_module.main(["run", "--headless", "--ideas", str(ideas), "--seed", "1"]) == 2
    assert "--ideas takes the proposals from the file" in capsys.readouterr().err
    assert cli_module.main(["--seed", "1", "status"]) == 2
    assert "not `status`" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_parser_errors_are_one_line_with_exit_code_2() -> None:
    line = _one_line_error(cli("run", "--sed", "2"))
    assert line.startswith("autoresearch: error: unrecognized arguments: --sed 2")
    assert "autoresearch --help" in refused(["--nope"])


def test_every_command_accepts_budget_as_the_readme_says() -> None:
    assert "and every command accepts it" in README.read_text()
    for command in [None, *help_commands()]:
        baseline = command_argv(command)
        assert changes(baseline, [*baseline, "--budget", "60"]) == {"budget": "60"}, command


def test_the_models_options_are_not_abbreviated_either() -> None:
    # Once read as --force: a rebuild of the model (test_no_option_is_abbreviated tries every prefix).
    assert "unrecognized arguments: --forc" in refused(["models", "--assemble", "--forc"])
