"""A model served on localhost (llama-cpp-python's server, llama.cpp's llama-server, Ollama, any OpenAI-style server).

Each server family constrains a reply to a JSON schema in its own dialect. The first request to an endpoint
tries them in turn (a 4xx/5xx answer that names `response_format`, the schema or the grammar means "not this
one"); the dialect that worked is remembered, for this process and on disk, and shown by `autoresearch models`
and the cockpit's model picker. Replies stream (server-sent events, or Ollama's JSON lines) over `http.client`:
nothing but the standard library, never through a proxy, and only to a loopback address.

A server that is down, slow, failing or that dies mid-reply raises `EndpointUnavailable`: worth trying again
later (the engine backs off). One that answers but can never be used raises `EndpointError`.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import ipaddress
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import paths
from agent.researcher.backend import Completion, GenerationCancelled, GenerationStats, ModelError
from agent.researcher.prompt import Message, PromptTooLong, estimate_tokens
from agent.researcher.reply import REPLY_SCHEMA

ENDPOINT_CONTEXT = 8192
"""Context tokens a server is assumed to hold when the proposer sizes its prompt (a longer one gets a 400,
which becomes PromptTooLong)."""
DEFAULT_TIMEOUT = 300.0
"""Seconds to wait for the next bytes of an answer (AUTORESEARCH_ENDPOINT_TIMEOUT overrides): a CPU server
reads a 2k-token prompt for most of a minute before its first token."""
CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a connection: on localhost it is at once, or nothing is listening."""

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_endpoint(text: str | None) -> bool:
    """Whether a --model value names a server (an http:// URL) rather than a model file or name."""
    return bool(text) and str(text).startswith(("http://", "https://"))


def check_local_url(url: str) -> str:
    """The chat-completions URL of a local OpenAI-compatible server; ModelError for any non-local host."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise ModelError(f"{url}: an endpoint must be an http:// URL on localhost")
    host = (parsed.hostname or "").lower()
    local = host in _LOOPBACK_NAMES
    if not local:
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
    if not local:
        raise ModelError(
            f"{url}: refusing a non-local endpoint ({host or 'no host'}): only localhost is allowed"
        )
    base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def api_base(url: str) -> str:
    """The `.../v1` base of a local server's OpenAI API: the key under which its dialect is remembered."""
    return check_local_url(url).removesuffix("/chat/completions")


def split_model(value: str) -> tuple[str, str | None]:
    """`URL#model` -> (URL, model or None)."""
    url, _, model = value.partition("#")
    return url, model or None


class EndpointError(ModelError):
    """A local server that answers but cannot be used as asked; the message says why."""


class EndpointUnavailable(EndpointError):
    """A local server that is down, slow, failing or that died mid-reply: worth trying again later."""


class _Refused(Exception):
    """The server does not speak this dialect (it named the constraint in a 4xx/5xx answer)."""


# ---------------------------------------------------------------------------------------------------------
# Dialects of constrained output
# ---------------------------------------------------------------------------------------------------------


def _server_schema() -> dict[str, Any]:
    """REPLY_SCHEMA without the edit texts' maxLength: llama-cpp-python spells a maxLength of 4000 as 4000
    nested optional groups, which takes the server seconds per request; parse_reply checks the length."""
    schema = copy.deepcopy(REPLY_SCHEMA)
    for field in schema["properties"]["edits"]["items"]["properties"].values():
        field.pop("maxLength", None)
    return schema


SERVER_SCHEMA = _server_schema()

_REFUSAL = re.compile(r"response_format|json_schema|json_object|grammar|schema", re.IGNORECASE)
"""Words in a 4xx/5xx answer that mean the server does not take the constraint in this form."""


@dataclass(frozen=True)
class Dialect:
    """One way of asking a server for a reply constrained to a JSON schema."""

    name: str
    how: str
    """What is sent, in words (shown by `autoresearch models`)."""

    @property
    def native_ollama(self) -> bool:
        """Ollama's own API (`/api/chat`, JSON lines) rather than the OpenAI one."""
        return self.name == "ollama"

    def body(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        stream: bool = True,
        schema: dict[str, Any] = SERVER_SCHEMA,
    ) -> dict[str, Any]:
        """The JSON request body."""
        if self.native_ollama:
            return {
                "model": model,
                "messages": list(messages),
                "stream": stream,
                "format": schema,
                "options": {"temperature": temperature, "seed": seed, "num_predict": max_tokens},
            }
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "stream": stream,
            "temperature": temperature,
            "seed": seed,
            "max_tokens": max_tokens,
        }
        if self.name == "openai":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "proposal", "strict": True, "schema": schema},
            }
        elif self.name == "llama-cpp-python":
            body["response_format"] = {"type": "json_object", "schema": schema}
        elif self.name == "llama-server":
            body["json_schema"] = schema
        return body

    def refuses(self, status: int, text: str) -> bool:
        """Whether an error answer means "not this dialect" (rather than a failing server)."""
        if status < 400:
            return False
        if self.native_ollama and status in (404, 405):
            return True  # no /api/chat: not Ollama
        return bool(_REFUSAL.search(text)) or (self.native_ollama and "format" in text.lower())


DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        "openai", "response_format json_schema (OpenAI style: llama-server, Ollama /v1, vLLM, LM Studio)"
    ),
    Dialect("llama-cpp-python", "response_format json_object + schema (llama-cpp-python's server)"),
    Dialect("llama-server", "json_schema field (llama.cpp's llama-server)"),
    Dialect("ollama", "format schema on /api/chat (Ollama's own API)"),
)
"""In the order they are tried."""


def find_dialect(name: str | None) -> Dialect | None:
    return next((d for d in DIALECTS if d.name == name), None)


# ---------------------------------------------------------------------------------------------------------
# What is remembered of each endpoint
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointMemo:
    """What worked last time with one local server."""

    base: str
    """Its `.../v1` URL."""
    dialect: str | None = None
    models: tuple[str, ...] = ()
    checked: float = 0.0
    """When it last answered (epoch seconds)."""


_memo_lock = threading.Lock()


def _memo_path() -> Path:
    return paths.data_dir() / "endpoints.json"


def remembered_endpoints() -> dict[str, EndpointMemo]:
    """Every endpoint that has answered on this machine, by `.../v1` URL (an unreadable file: none)."""
    try:
        raw = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    memos: dict[str, EndpointMemo] = {}
    if isinstance(raw, dict):
        for base, item in raw.items():
            if isinstance(item, dict):
                models = item.get("models") or []
                memos[str(base)] = EndpointMemo(
                    base=str(base),
                    dialect=item.get("dialect") if isinstance(item.get("dialect"), str) else None,
                    models=tuple(str(m) for m in models) if isinstance(models, list) else (),
                    checked=float(item.get("checked") or 0.0),
                )
    return memos


def remember_endpoint(base: str, *, dialect: str | None = None, models: Sequence[str] | None = None) -> None:
    """Record that `base` answered (and in which dialect / with which models, when known)."""
    with _memo_lock:
        memos = remembered_endpoints()
        old = memos.get(base, EndpointMemo(base))
        memos[base] = EndpointMemo(
            base=base,
            dialect=dialect or old.dialect,
            models=tuple(models) if models is not None else old.models,
            checked=time.time(),
        )
        path = _memo_path()
        data = {
            key: {"dialect": m.dialect, "models": list(m.models), "checked": m.checked}
            for key, m in memos.items()
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the dialect is probed again next time, nothing worse


# ---------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------


def _timeout() -> float:
    value = os.environ.get("AUTORESEARCH_ENDPOINT_TIMEOUT")
    return float(value) if value else DEFAULT_TIMEOUT


def _error_text(raw: bytes) -> str:
    """The message in an error answer (OpenAI `error.message`, FastAPI `detail`, Ollama `error`), one line."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300]
    found: Any = data
    if isinstance(data, dict):
        found = data.get("error") or data.get("detail") or data.get("message") or data
        if isinstance(found, dict):
            found = found.get("message") or found
    if isinstance(found, list):  # FastAPI's validation errors
        found = "; ".join(
            ".".join(str(p) for p in item.get("loc", ())) + ": " + str(item.get("msg", ""))
            if isinstance(item, dict)
            else str(item)
            for item in found
        )
    return " ".join(str(found).split())[:300]


class _Http:
    """One request to a local server, on a connection that a cancel closes at once."""

    def __init__(self, url: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.netloc = parsed.netloc
        self.host = parsed.hostname or "localhost"
        self.port = parsed.port
        self.https = parsed.scheme == "https"
        self.timeout = timeout

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except ConnectionRefusedError:
            raise EndpointUnavailable(
                f"nothing is listening at {self.netloc}: is the server running?"
            ) from None
        except (TimeoutError, OSError) as exc:
            raise EndpointUnavailable(f"cannot connect to {self.netloc}: {exc}") from None
        assert conn.sock is not None
        conn.sock.settimeout(timeout or self.timeout)
        return conn

    def get_json(self, path: str, timeout: float) -> tuple[int, Any]:
        """(status, parsed JSON or None) of a GET."""
        conn = self.connection(timeout)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError:
            raise EndpointUnavailable(f"{self.netloc} did not answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise EndpointUnavailable(f"{self.netloc} failed: {exc}") from None
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, None


def _watch_cancel(conn: http.client.HTTPConnection, cancel: threading.Event, done: threading.Event) -> None:
    """Close the connection's socket when `cancel` is set (a blocked read then returns at once)."""
    while not done.wait(0.05):
        if cancel.is_set():
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed
                    sock.shutdown(socket.SHUT_RDWR)
            return


def list_models(url: str, timeout: float = 10.0) -> list[str]:
    """The model names a local server serves: OpenAI's `GET /v1/models`, else Ollama's `GET /api/tags`."""
    base = api_base(url)
    http_ = _Http(base, timeout)
    path = urllib.parse.urlsplit(base).path
    status, data = http_.get_json(path + "/models", timeout)
    if status == 200 and isinstance(data, dict) and isinstance(data.get("data"), list):
        return [str(item.get("id")) for item in data["data"] if isinstance(item, dict) and item.get("id")]
    status, data = http_.get_json(path.removesuffix("/v1") + "/api/tags", timeout)
    if status == 200 and isinstance(data, dict) and isinstance(data.get("models"), list):
        return [
            str(item.get("name") or item.get("model"))
            for item in data["models"]
            if isinstance(item, dict) and (item.get("name") or item.get("model"))
        ]
    raise EndpointError(f"{base}: not an OpenAI-compatible server (GET {path}/models answered {status})")


# ---------------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------------


class EndpointModel:
    """A model served on localhost; replies are constrained to the proposal schema in the server's dialect."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        n_ctx: int = ENDPOINT_CONTEXT,
        *,
        timeout: float | None = None,
    ) -> None:
        self.url = check_local_url(url)
        self.base = api_base(url)
        self.model = model
        """The served model to ask for; None: the first one the server lists."""
        self.netloc = urllib.parse.urlsplit(self.url).netloc
        self.name = f"{model or 'local'}@{self.netloc}"
        self.n_ctx = n_ctx
        self.timeout = timeout if timeout is not None else _timeout()
        memo = remembered_endpoints().get(self.base)
        self.dialect: Dialect | None = find_dialect(memo.dialect if memo else None)
        """The dialect that worked last (None until one has)."""
        self._http = _Http(self.url, self.timeout)

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def served_model(self) -> str:
        """The model to ask for: the one named, else the first the server lists (asked once)."""
        if self.model is None:
            try:
                served = list_models(self.base, timeout=min(self.timeout, 30.0))
            except EndpointUnavailable:
                raise
            except EndpointError:
                served = []  # a server without a model list (it serves one model whatever it is called)
            self.model = served[0] if served else "local"
            remember_endpoint(self.base, models=served)
        return self.model

    def complete(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        on_text: Callable[[str], None],
        cancel: threading.Event,
        grammar: str | None = None,
    ) -> Completion:
        """Stream one reply. Dialects are tried in turn until the server takes one (the last good one first)."""
        if cancel.is_set():
            raise GenerationCancelled("")
        model = self.served_model()
        order = list(DIALECTS)
        if self.dialect is not None:
            order.remove(self.dialect)
            order.insert(0, self.dialect)
        refusals: list[str] = []
        for dialect in order:
            try:
                return self._complete_in(
                    dialect, model, messages, max_tokens, temperature, seed, on_text, cancel
                )
            except _Refused as exc:
                refusals.append(f"{dialect.name}: {exc}")
        raise EndpointError(
            f"{self.base} takes none of the ways to constrain a reply to a JSON schema; "
            + "; ".join(refusals)
        )

    def _path(self, dialect: Dialect) -> str:
        path = urllib.parse.urlsplit(self.url).path
        if dialect.native_ollama:
            return path.removesuffix("/chat/completions").removesuffix("/v1") + "/api/chat"
        return path

    def _complete_in(
        self,
        dialect: Dialect,
        model: str,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float,
        seed: int,
        on_text: Callable[[str], None],
        cancel: threading.Event,
    ) -> Completion:
        body = dialect.body(model, messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        conn = self._http.connection()
        done = threading.Event()
        watcher = threading.Thread(target=_watch_cancel, args=(conn, cancel, done), daemon=True)
        watcher.start()
        try:
            conn.request(
                "POST",
                self._path(dialect),
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream, application/json"},
            )
            response = conn.getresponse()
            if response.status >= 400:
                raise self._http_error(dialect, model, response.status, response.read())
            if self.dialect is not dialect:
                self.dialect = dialect
                remember_endpoint(self.base, dialect=dialect.name)

            def piece(text: str) -> None:
                nonlocal first
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
                    on_text(text)

            finish = self._read(response, dialect, piece, cancel)
        except (_Refused, EndpointError, PromptTooLong):
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if cancel.is_set():
                raise GenerationCancelled("".join(parts)) from None
            raise self._transport_error(exc, parts) from None
        finally:
            done.set()
            conn.close()
        if cancel.is_set():
            raise GenerationCancelled("".join(parts))
        finished = time.perf_counter()
        first = first or finished
        stats = GenerationStats(
            prompt_tokens=0,
            reused_tokens=0,
            prompt_seconds=first - started,
            generated_tokens=len(parts),
            generate_seconds=finished - first,
            finish_reason=finish,
        )
        return Completion(text="".join(parts), stats=stats)

    def _http_error(self, dialect: Dialect, model: str, status: int, raw: bytes) -> Exception:
        text = _error_text(raw)
        if dialect.refuses(status, text):
            return _Refused(f"HTTP {status}: {text}")
        lowered = text.lower()
        if status == 400 and ("context" in lowered or "too long" in lowered or "exceed" in lowered):
            return PromptTooLong(f"{self.base}: {text}")
        if status == 404 and "model" in lowered:
            return EndpointError(f"{self.base} does not serve model {model!r}: {text}")
        if 400 <= status < 500 and status not in (408, 429):
            return EndpointError(f"{self.base} refused the request: HTTP {status}: {text}")
        return EndpointUnavailable(f"{self.base} failed: HTTP {status}: {text}")

    def _transport_error(self, exc: BaseException, parts: list[str]) -> EndpointUnavailable:
        got = f" after {sum(len(p) for p in parts)} characters of the reply" if parts else ""
        if isinstance(exc, TimeoutError):
            return EndpointUnavailable(f"{self.base} sent nothing for {self.timeout:g} s{got}")
        if isinstance(exc, ValueError):
            return EndpointUnavailable(f"{self.base} sent something that is not a reply{got}: {exc}")
        return EndpointUnavailable(f"{self.base} broke off{got}: {type(exc).__name__}: {exc}")

    def _read(
        self,
        response: http.client.HTTPResponse,
        dialect: Dialect,
        piece: Callable[[str], None],
        cancel: threading.Event,
    ) -> str:
        """Read the answer, streamed or whole; the finish reason. ValueError for what is not a reply."""
        ctype = (response.getheader("Content-Type") or "").lower()
        if dialect.native_ollama:
            return self._read_json_lines(response, piece, cancel)
        if "text/event-stream" in ctype:
            return self._read_events(response, piece, cancel)
        if "json" in ctype:  # a server that does not stream
            data = json.loads(response.read())
            choice = self._choice(data)
            piece(str((choice.get("message") or {}).get("content") or ""))
            return str(choice.get("finish_reason") or "stop")
        raise ValueError(f"an answer of type {ctype or 'unknown'}: {response.read(120)!r}")

    def _choice(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object: {str(data)[:120]!r}")
        if data.get("error"):
            raise EndpointUnavailable(
                f"{self.base} failed mid-reply: {_error_text(json.dumps(data).encode())}"
            )
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise ValueError(f"no choices in {json.dumps(data)[:120]!r}")
        choice = choices[0] if choices else {}
        return choice if isinstance(choice, dict) else {}

    def _read_events(
        self, response: http.client.HTTPResponse, piece: Callable[[str], None], cancel: threading.Event
    ) -> str:
        finish: str | None = None
        while not cancel.is_set():
            raw = response.readline()
            if not raw:
                break
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue  # blank lines, comments, event: and id: fields
            data = line[5:].strip()
            if data == "[DONE]":
                return finish or "stop"
            choice = self._choice(json.loads(data))
            piece(str((choice.get("delta") or {}).get("content") or ""))
            if choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
        if finish is None and not cancel.is_set():
            raise ConnectionAbortedError("the stream ended before the reply did")
        return finish or "stop"

    def _read_json_lines(
        self, response: http.client.HTTPResponse, piece: Callable[[str], None], cancel: threading.Event
    ) -> str:
        while not cancel.is_set():
            raw = response.readline()
            if not raw:
                break
            if not raw.strip():
                continue
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError(f"not a JSON object: {raw[:120]!r}")
            if data.get("error"):
                raise EndpointUnavailable(f"{self.base} failed mid-reply: {_error_text(raw)}")
            piece(str((data.get("message") or {}).get("content") or ""))
            if data.get("done"):
                reason = str(data.get("done_reason") or "stop")
                return "length" if reason == "length" else "stop"
        if not cancel.is_set():
            raise ConnectionAbortedError("the stream ended before the reply did")
        return "stop"

    def remember(self) -> None:
        return None

    def set_threads(self, threads: int) -> None:
        return None  # the server has its own threads

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------
# `autoresearch models URL`
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointReport:
    """What a probe found at one URL."""

    base: str
    models: tuple[str, ...] = ()
    dialect: Dialect | None = None
    error: str | None = None


PROBE_MESSAGES: tuple[Message, ...] = (
    {"role": "user", "content": 'Reply with {"reasoning": "", "description": "probe", "edits": []}.'},
)


def probe(url: str, model: str | None = None, timeout: float = 60.0) -> EndpointReport:
    """List what a local server serves and find its dialect with one-token requests; errors in the report."""
    try:
        base = api_base(url)
    except ModelError as exc:
        return EndpointReport(url, error=str(exc))
    try:
        served = tuple(list_models(base, timeout=min(timeout, 10.0)))
    except EndpointError as exc:
        return EndpointReport(base, error=str(exc))
    remember_endpoint(base, models=served)
    endpoint = EndpointModel(base, model or (served[0] if served else None), timeout=timeout)
    endpoint.dialect = None  # probe afresh: the server may have changed since
    try:
        endpoint.complete(
            PROBE_MESSAGES,
            max_tokens=1,
            temperature=0.0,
            seed=0,
            on_text=lambda _: None,
            cancel=threading.Event(),
        )
    except (EndpointError, PromptTooLong) as exc:
        return EndpointReport(base, served, error=str(exc))
    return EndpointReport(base, served, endpoint.dialect)
