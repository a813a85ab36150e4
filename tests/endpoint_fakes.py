"""A scripted local server for the error paths of agent.researcher.endpoint: dialect refusals, 500s, timeouts,
garbage, a server that dies mid-stream. The happy path is also tested on the real llama_cpp.server
(test_endpoint_server).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GOOD_REPLY = json.dumps(
    {
        "reasoning": "A lower learning rate settles better.",
        "description": "learning rate 0.6",
        "edits": [{"search": "LEARNING_RATE = 1.0", "replace": "LEARNING_RATE = 0.6"}],
    }
)
"""A reply that applies to engine_fakes.FAKE_TRAIN (and makes it better)."""

REFUSALS = {
    # What each family says to a constraint it does not take (llama-cpp-python's words are from the issue).
    "llama-cpp-python": (
        500,
        {"error": {"message": "response_format.type: Input should be 'text' or 'json_object'"}},
    ),
    "llama-server": (
        400,
        {"error": {"code": 400, "message": "Unsupported response_format type: json_schema"}},
    ),
    "ollama": (400, {"error": {"message": "invalid response_format / json_schema: not supported"}}),
    "openai": (400, {"error": {"message": "Unrecognized request argument supplied: json_schema"}}),
}


def dialect_of(path: str, body: dict[str, Any]) -> str:
    """Which dialect a request is written in, as the fake reads it."""
    if path.endswith("/api/chat"):
        return "ollama"
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema" and "schema" in (fmt.get("json_schema") or {}):
        return "openai"
    if fmt.get("type") == "json_object" and "schema" in fmt:
        return "llama-cpp-python"
    if "json_schema" in body:
        return "llama-server"
    return "none"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout or a cancel under test) is expected; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ScriptedServer:
    """A localhost server that takes one dialect and follows a script of what goes wrong, one step per POST.

    Steps: "ok" (the default once the script is used up), "500", "503", "slow" (nothing for 3 s), "garbage",
    "html", "die" (half the reply, then the connection drops), "trickle" (a piece every 0.1 s for 5 s),
    "json" (the whole reply at once, not streamed), "context" (a 400 about the context window).
    """

    def __init__(
        self,
        accepts: str = "openai",
        script: list[str] | None = None,
        replies: Sequence[str] = (GOOD_REPLY,),
        models: tuple[str, ...] = ("tiny-model",),
        port: int = 0,
    ) -> None:
        self.accepts = accepts
        self.script = list(script or [])
        self.replies = list(replies)
        """Streamed in turn, one per successful POST; the last one repeats."""
        self._served = 0
        self.models = models
        self.requests: list[tuple[str, dict[str, Any]]] = []
        """(path, body) of every POST, in order."""
        self.gets: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send_json(self, status: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(raw)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                outer.gets.append(self.path)
                if self.path.endswith("/v1/models") and outer.accepts != "ollama-only":
                    self._send_json(200, {"object": "list", "data": [{"id": m} for m in outer.models]})
                elif self.path.endswith("/api/tags") and outer.accepts in ("ollama", "ollama-only"):
                    self._send_json(200, {"models": [{"name": m} for m in outer.models]})
                else:
                    self._send_json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                dialect = dialect_of(self.path, body)
                if dialect != outer.accepts:
                    if dialect == "ollama":
                        self._send_json(404, {"detail": "Not Found"})
                    else:
                        self._send_json(*REFUSALS.get(outer.accepts, REFUSALS["openai"]))
                    return
                step = outer.script.pop(0) if outer.script else "ok"
                self._step(step, dialect, body)

            def _step(self, step: str, dialect: str, body: dict[str, Any]) -> None:
                if step in ("500", "503"):
                    self._send_json(int(step), {"error": {"message": "the model crashed (simulated)"}})
                    return
                if step == "context":
                    self._send_json(
                        400, {"error": {"message": "Requested tokens (9000) exceed context window of 4096"}}
                    )
                    return
                if step == "slow":
                    time.sleep(3)
                reply = outer.replies[min(outer._served, len(outer.replies) - 1)]
                outer._served += 1
                if step == "json":
                    self._send_json(
                        200,
                        {"choices": [{"message": {"content": reply}, "finish_reason": "stop"}]},
                    )
                    return
                self.send_response(200)
                ctype = {"ollama": "application/x-ndjson"}.get(dialect, "text/event-stream")
                self.send_header("Content-Type", "text/html" if step == "html" else ctype)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if step == "html":
                    self._chunk(b"<html><body>It works!</body></html>")
                    self._chunk(b"")
                    return
                if step == "garbage":
                    self._chunk(b"data: {this is not json\n\n")
                    self._chunk(b"")
                    return
                pieces = [reply[i : i + 7] for i in range(0, len(reply), 7)]
                if step == "die":
                    for text in pieces[: len(pieces) // 2]:
                        self._chunk(self._event(dialect, text))
                    self.wfile.write(b"ff\r\npartial")  # a chunk cut short, then the connection drops
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if step == "trickle":
                    for _ in range(50):
                        try:
                            self._chunk(self._event(dialect, "x"))
                        except OSError:
                            return  # the client hung up: what a cancel looks like from here
                        time.sleep(0.1)
                for text in pieces:
                    self._chunk(self._event(dialect, text))
                self._chunk(self._event(dialect, None))
                if dialect != "ollama":
                    self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _event(self, dialect: str, text: str | None) -> bytes:
                if dialect == "ollama":
                    if text is None:
                        return (
                            json.dumps(
                                {"message": {"content": ""}, "done": True, "done_reason": "stop"}
                            ).encode()
                            + b"\n"
                        )
                    return (
                        json.dumps(
                            {"message": {"role": "assistant", "content": text}, "done": False}
                        ).encode()
                        + b"\n"
                    )
                if text is None:
                    choice: dict[str, Any] = {"delta": {}, "finish_reason": "stop"}
                else:
                    choice = {"delta": {"content": text}, "finish_reason": None}
                return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()

        self.server = _QuietServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON body of every POST, in order."""
        return [body for _, body in self.requests]

    def dialects(self) -> list[str]:
        """The dialect of each POST so far."""
        return [dialect_of(path, body) for path, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
