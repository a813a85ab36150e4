"""A local server as the researcher, on a scripted server: each dialect's request, the fallback from one to the
next, what is remembered, and every way a server fails (500s, timeouts, garbage, dying mid-stream)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from endpoint_fakes import GOOD_REPLY, ScriptedServer

from agent import cli as cli_module
from agent.proposals import HistoryRow, ProposalContext, ProposalFailed
from agent.researcher.backend import GenerationCancelled
from agent.researcher.endpoint import (
    DIALECTS,
    SERVER_SCHEMA,
    EndpointError,
    EndpointModel,
    EndpointUnavailable,
    api_base,
    find_dialect,
    list_models,
    probe,
    remembered_endpoints,
)
from agent.researcher.models import endpoint_entries
from agent.researcher.prompt import PromptTooLong
from agent.researcher.proposer import make_proposer
from agent.researcher.reply import MAX_EDIT_TEXT, REPLY_SCHEMA

MESSAGES = ({"role": "user", "content": "Propose one change."},)
FAKE_TRAIN_LINE = "LEARNING_RATE = 1.0\n"


def complete(endpoint: EndpointModel, cancel: threading.Event | None = None) -> tuple[str, list[str]]:
    pieces: list[str] = []
    done = endpoint.complete(
        MESSAGES,
        max_tokens=200,
        temperature=0.5,
        seed=3,
        on_text=pieces.append,
        cancel=cancel or threading.Event(),
    )
    return done.text, pieces


def context() -> ProposalContext:
    return ProposalContext(
        program_md="Lower val_bpb.",
        train_py=FAKE_TRAIN_LINE,
        history=(HistoryRow(0, "baseline", "baseline", 2.5),),
        best_bpb=2.5,
        noise_margin=0.002,
        budget="10 s",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the dialects ------------------------------------------------------------------------------------------


def test_each_dialect_asks_for_the_schema_in_its_own_words() -> None:
    def body(name: str) -> dict[str, object]:
        dialect = find_dialect(name)
        assert dialect is not None
        return dialect.body("m", MESSAGES, max_tokens=9, temperature=0.5, seed=4)

    assert [d.name for d in DIALECTS] == ["openai", "llama-cpp-python", "llama-server", "ollama"]
    openai = body("openai")
    assert openai["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "proposal", "strict": True, "schema": SERVER_SCHEMA},
    }
    assert (openai["max_tokens"], openai["seed"], openai["stream"]) == (9, 4, True)
    assert body("llama-cpp-python")["response_format"] == {"type": "json_object", "schema": SERVER_SCHEMA}
    server = body("llama-server")
    assert server["json_schema"] == SERVER_SCHEMA and "response_format" not in server
    ollama = body("ollama")
    assert ollama["format"] == SERVER_SCHEMA and "response_format" not in ollama
    assert ollama["options"] == {"temperature": 0.5, "seed": 4, "num_predict": 9}


def test_the_server_schema_drops_only_the_edit_texts_length_cap() -> None:
    edit = SERVER_SCHEMA["properties"]["edits"]["items"]["properties"]
    assert "maxLength" not in edit["search"] and "maxLength" not in edit["replace"]
    assert REPLY_SCHEMA["properties"]["edits"]["items"]["properties"]["search"]["maxLength"] == MAX_EDIT_TEXT
    assert SERVER_SCHEMA["required"] == REPLY_SCHEMA["required"]
    assert SERVER_SCHEMA["properties"]["reasoning"] == REPLY_SCHEMA["properties"]["reasoning"]


def test_an_openai_style_server_is_asked_once_and_remembered() -> None:
    with ScriptedServer(accepts="openai") as server:
        endpoint = EndpointModel(server.url)
        text, pieces = complete(endpoint)
        assert text == GOOD_REPLY and len(pieces) > 5
        assert server.dialects() == ["openai"]
        path, body = server.requests[0]
        assert path == "/v1/chat/completions" and body["model"] == "tiny-model"  # the one it serves
    memo = remembered_endpoints()[server.url]
    assert memo.dialect == "openai" and memo.models == ("tiny-model",)


def test_llama_cpp_pythons_refusal_falls_back_to_json_object_and_is_remembered() -> None:
    """The issue: llama_cpp.server answers 500 to json_schema; the next dialect works, and is tried first later."""
    with ScriptedServer(accepts="llama-cpp-python") as server:
        proposer = make_proposer(f"{server.url}#tiny-model", seed=1)
        proposal = proposer.propose(context(), lambda e: None, threading.Event())
        assert proposal is not None and proposal.description == "learning rate 0.6"
        assert server.dialects() == ["openai", "llama-cpp-python"]
        again = EndpointModel(server.url + "/")  # the same endpoint, written differently
        assert again.dialect is not None and again.dialect.name == "llama-cpp-python"
        complete(again)
        assert server.dialects() == ["openai", "llama-cpp-python", "llama-cpp-python"]


@pytest.mark.parametrize("accepts", ["llama-server", "ollama"])
def test_the_fallback_reaches_every_dialect(accepts: str) -> None:
    with ScriptedServer(accepts=accepts) as server:
        endpoint = EndpointModel(f"{server.url}")
        text, _ = complete(endpoint)
        assert text == GOOD_REPLY
        assert (
            server.dialects()[-1] == accepts
            and len(server.dialects()) == [d.name for d in DIALECTS].index(accepts) + 1
        )
        assert endpoint.dialect is not None and endpoint.dialect.name == accepts
        if accepts == "ollama":
            path, body = server.requests[-1]
            assert path == "/api/chat" and body["format"] == SERVER_SCHEMA and body["stream"] is True


def test_a_server_that_takes_no_dialect_says_what_each_answered() -> None:
    with (
        ScriptedServer(accepts="none-of-them") as server,
        pytest.raises(EndpointError, match="none of the ways") as info,
    ):
        complete(EndpointModel(server.url))
    assert not isinstance(info.value, EndpointUnavailable)  # asking again will not help
    message = str(info.value)
    assert all(f"{d.name}: HTTP" in message for d in DIALECTS)
    assert server.url not in remembered_endpoints() or remembered_endpoints()[server.url].dialect is None


# -- a server that fails -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["500", "503"])
def test_a_failing_server_is_unavailable_not_a_dialect_refusal(status: str) -> None:
    with ScriptedServer(script=[status]) as server:
        with pytest.raises(EndpointUnavailable, match=f"HTTP {status}: the model crashed"):
            complete(EndpointModel(server.url))
        assert server.dialects() == ["openai"]  # no fallback: the server did not name the format
        assert complete(EndpointModel(server.url))[0] == GOOD_REPLY  # and it works when it recovers


def test_nothing_listening_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointUnavailable, match="nothing is listening .* is the server running"):
        complete(EndpointModel(url, "some-model"))


def test_a_silent_server_times_out() -> None:
    with ScriptedServer(script=["slow"]) as server:
        started = time.monotonic()
        with pytest.raises(EndpointUnavailable, match="sent nothing for 0.3 s"):
            complete(EndpointModel(server.url, "tiny-model", timeout=0.3))
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(("step", "words"), [("garbage", "not a reply"), ("html", "text/html")])
def test_garbage_is_unavailable_with_what_came(step: str, words: str) -> None:
    with ScriptedServer(script=[step]) as server, pytest.raises(EndpointUnavailable, match=words):
        complete(EndpointModel(server.url, "tiny-model"))


def test_a_server_that_dies_mid_stream() -> None:
    with ScriptedServer(script=["die"]) as server:
        pieces: list[str] = []
        with pytest.raises(EndpointUnavailable, match=r"broke off after \d+ characters of the reply"):
            EndpointModel(server.url, "tiny-model").complete(
                MESSAGES,
                max_tokens=9,
                temperature=0.5,
                seed=1,
                on_text=pieces.append,
                cancel=threading.Event(),
            )
        assert pieces and GOOD_REPLY.startswith("".join(pieces))


def test_cancel_closes_the_stream_at_once() -> None:
    with ScriptedServer(script=["trickle"]) as server:
        cancel = threading.Event()
        cancelled_at: list[float] = []

        def on_text(_: str) -> None:
            if not cancel.is_set():
                cancelled_at.append(time.monotonic())
                cancel.set()

        endpoint = EndpointModel(server.url, "tiny-model")
        with pytest.raises(GenerationCancelled):
            endpoint.complete(MESSAGES, max_tokens=9, temperature=0.5, seed=1, on_text=on_text, cancel=cancel)
        latency = time.monotonic() - cancelled_at[0]
        assert latency < 0.5, f"cancel took {latency:.2f} s"  # the trickle would go on for 5 s


def test_a_server_that_does_not_stream_is_read_whole() -> None:
    with ScriptedServer(script=["json"]) as server:
        text, pieces = complete(EndpointModel(server.url, "tiny-model"))
    assert text == GOOD_REPLY and pieces == [GOOD_REPLY]


def test_a_prompt_too_long_for_the_server_fails_the_proposal_not_the_server() -> None:
    with ScriptedServer(script=["context"]) as server:
        with pytest.raises(PromptTooLong, match="exceed context window"):
            complete(EndpointModel(server.url, "tiny-model"))
        server.script = ["context"]
        proposer = make_proposer(server.url, seed=1)
        with pytest.raises(ProposalFailed, match="exceed context window"):
            proposer.propose(context(), lambda e: None, threading.Event())


# -- what a server serves: `autoresearch models URL` and the picker ----------------------------------------


def test_the_served_models_are_listed_openai_or_ollama_style() -> None:
    with ScriptedServer(models=("a", "b")) as server:
        assert list_models(server.url) == ["a", "b"]
    with ScriptedServer(accepts="ollama-only", models=("qwen2.5-coder:1.5b",)) as server:
        assert list_models(server.url) == ["qwen2.5-coder:1.5b"]
        assert server.gets == ["/v1/models", "/api/tags"]


def test_models_url_probes_and_shows_the_dialect(capsys: pytest.CaptureFixture[str]) -> None:
    with ScriptedServer(accepts="llama-cpp-python", models=("smol",)) as server:
        assert cli_module.main(["models", server.url]) == 0
        out = capsys.readouterr().out
        assert "no such file" not in out
        [row] = [line for line in out.splitlines() if line.startswith(server.url)]
        assert "smol" in row and "llama-cpp-python: response_format json_object + schema" in row
        assert f"--model {server.url}#smol" in out
        report = probe(server.url)
        assert report.dialect is not None and report.dialect.name == "llama-cpp-python"
        assert all(body["max_tokens"] == 1 for _, body in server.requests)  # probes are one token long
    # The picker lists it from memory, without asking the server (it is gone now).
    [entry] = endpoint_entries()
    assert entry.name == f"{server.url}#smol" and entry.dialect == "llama-cpp-python"
    assert "llama-cpp-python" in entry.where
    # ... and `models` with no URL shows it as remembered.
    assert cli_module.main(["models"]) == 0
    assert "(remembered)" in capsys.readouterr().out


def test_models_url_on_a_dead_server_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert cli_module.main(["models", url]) == 1
    out = capsys.readouterr().out
    assert "Unusable endpoints:" in out and "nothing is listening" in out


def test_the_picker_offers_remembered_servers(tmp_path: Path) -> None:
    from tui.screens.models import choice_from_entry

    with ScriptedServer(models=("m1",)) as server:
        complete(EndpointModel(server.url))
    [choice] = [choice_from_entry(e) for e in endpoint_entries([api_base(server.url)])]
    assert choice.name == f"{server.url}#m1" and choice.usable and "openai" in choice.where
    data = json.loads((tmp_path / "arhome" / "data" / "endpoints.json").read_text())
    assert data[server.url]["dialect"] == "openai"
