"""nanogpt/train.py end to end on the CPU: summary, compute budget, FAIL on NaN, non-causal refusal, offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_fakes import SUMMARY_KEYS

NANOGPT = Path(__file__).resolve().parent.parent / "nanogpt"
JUDGE = Path(__file__).resolve().parent.parent / "agent" / "sandbox" / "judge.py"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    summary: dict[str, str]
    result: dict | None  # type: ignore[type-arg]


def parse_summary(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    if "---" not in lines:
        return {}
    block = lines[len(lines) - 1 - lines[::-1].index("---") + 1 :]
    return dict(line.split(":", 1) for line in block if ":" in line) | {}


def run_train(tmp_path: Path, budget: str, replace: dict[str, str] | None = None, prelude: str = "") -> Run:
    """Copy the sandbox, apply text replacements to train.py, run it, have the judge score the model it
    exported (as the runner does, in its own process, from a folder holding the frozen harness), and collect
    what both reported."""
    work = tmp_path / "ws"
    work.mkdir(parents=True, exist_ok=True)
    for name in ("prepare.py", "corpus.py"):  # all the harness train.py imports
        shutil.copy(NANOGPT / name, work / name)
    harness = tmp_path / "harness"
    harness.mkdir(exist_ok=True)
    for name in ("prepare.py", "corpus.py", "metric.py"):
        shutil.copy(NANOGPT / name, harness / name)
    source = (NANOGPT / "train.py").read_text()
    for old, new in (replace or {}).items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (work / "train.py").write_text(source)
    env = dict(os.environ, AUTORESEARCH_BUDGET=budget)
    proc = subprocess.run(
        _with_prelude(prelude, "train.py", []), cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    summary = {k.strip(): v.strip() for k, v in parse_summary(proc.stdout).items()}
    claims_file, result_file = work / "claims.json", work / "result.json"
    result = None
    if claims_file.exists():
        paths = [str(harness), *(str(work / name) for name in ("model.pt2", "claims.json", "result.json"))]
        judge = subprocess.run(
            _with_prelude(prelude, str(JUDGE), ["score", *paths], isolated=True),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert judge.returncode == 0, judge.stderr
        result = json.loads(claims_file.read_text()) | json.loads(result_file.read_text())
    return Run(proc.returncode, proc.stdout, proc.stderr, summary, result)


def _with_prelude(prelude: str, script: str, args: list[str], isolated: bool = False) -> list[str]:
    flags = ["-I"] if isolated else []
    if not prelude:
        return [sys.executable, *flags, script, *args]
    run = f"\nimport runpy, sys; sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')"
    return [sys.executable, *flags, "-c", prelude + run]


def test_a_short_run_prints_a_parseable_summary_and_the_judge_scores_its_model(tmp_path: Path) -> None:
    run = run_train(tmp_path, "4")
    assert run.returncode == 0, run.stderr
    assert set(SUMMARY_KEYS) <= set(run.summary)
    for line in run.stdout.splitlines()[-len(run.summary) :]:  # autoresearch's layout: values at column 18
        key, value = line[:18], line[18:]
        assert key.rstrip().endswith(":") and key.endswith(" ") and not value.startswith(" "), line
    assert run.result is not None and run.result["status"] == "ok"
    assert run.summary["val_bpb"] == "judged after the run"  # the number is the judge's, never the run's
    assert 3.0 < run.result["val_bpb"] < 9.0
    assert run.result["eval_tokens"] > 0 and run.result["eval_bytes"] == run.result["eval_tokens"]
    assert int(run.summary["num_steps"]) == run.result["num_steps"] > 0
    assert float(run.summary["training_seconds"]) == pytest.approx(4.0, abs=2.0)
    progress = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert progress, run.stdout
    pattern = re.compile(r"^step\s+(\d+)\s+\|\s+loss\s+(\S+)\s+\|.*\btok/s\s+([\d.]+)")
    assert all(pattern.match(line) for line in progress)


def test_the_compute_budget_charges_bigger_batches_more(tmp_path: Path) -> None:
    budget = "4e11flops"
    small = run_train(tmp_path / "small", budget)
    big = run_train(tmp_path / "big", budget, {"BATCH_SIZE = 16": "BATCH_SIZE = 32"})
    assert small.returncode == 0 and big.returncode == 0, small.stderr + big.stderr
    assert small.result and big.result
    small_steps, big_steps = small.result["num_steps"], big.result["num_steps"]
    # Same FLOPs, twice the tokens per step: half the steps (+-1 for the step that crosses the line).
    assert abs(2 * big_steps - small_steps) <= 2, (small_steps, big_steps)
    for run in (small, big):
        assert run.result is not None
        assert 4e11 <= run.result["train_flops"] < 4e11 * 1.1


def test_nan_loss_prints_fail_and_exits_non_zero(tmp_path: Path) -> None:
    run = run_train(tmp_path, "3", {"loss = train_model(x, y)": "loss = train_model(x, y) * float('nan')"})
    assert run.returncode != 0
    assert any(line.startswith("FAIL") for line in run.stdout.splitlines()), run.stdout
    assert "---" not in run.stdout.splitlines()


def test_a_non_causal_model_is_refused(tmp_path: Path) -> None:
    run = run_train(tmp_path, "2", {"is_causal=True": "is_causal=False"})
    assert run.returncode == 0, run.stderr
    assert run.result is not None
    assert run.result["status"] == "invalid" and run.result["val_bpb"] is None
    assert run.result["reason"].startswith("non-causal: logits changed by")


BLOCK_NETWORK = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.socket.sendto = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
"""


def test_training_and_preparing_never_touch_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_NETWORK + "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9')",
        ],
        capture_output=True,
        text=True,
    )
    assert "network access attempted" in probe.stderr  # the guard itself works
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "fresh-cache"))  # prepare from scratch
    run = run_train(tmp_path, "2", prelude=BLOCK_NETWORK)
    assert run.returncode == 0, run.stderr
    assert "network access attempted" not in run.stderr
    assert run.result is not None and run.result["status"] == "ok"
