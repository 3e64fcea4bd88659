"""A scripted HTTP peer for the clients' tests: it answers from a script and records what it got.

The clients (the agent's signed transport and CLI, the operator and cluster API
clients) are tested against it where the point is what they do with an answer
the real coordinator gives rarely or only when something is wrong: a refusal, a
5xx, a body that is not JSON, a slow reply. Everything the coordinator itself
decides is tested against the real server in tests/integration.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ScriptedCoordinator:
    """Replies per (method, path), in order; the last one repeats. Anything else gets a JSON 404."""

    url: str = ""
    script: dict[tuple[str, str], list[Reply]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def reply(
        self,
        method: str,
        path: str,
        status: int = 200,
        json_body: Any = None,
        *,
        text: str | None = None,
        raw: bytes | None = None,
        delay: float = 0.0,
    ) -> None:
        if raw is not None:
            reply = Reply(status, raw, "application/octet-stream", delay)
        elif text is not None:
            reply = Reply(status, text.encode(), "text/plain", delay)
        elif json_body is not None:
            reply = Reply(status, json.dumps(json_body).encode(), "application/json", delay)
        else:
            reply = Reply(status, b"", "application/json", delay)
        self.script.setdefault((method, path), []).append(reply)

    def requests_to(self, method: str, path: str) -> list[Received]:
        return [r for r in self.received if (r.method, r.path) == (method, path)]

    def _next(self, method: str, path: str) -> Reply:
        replies = self.script.get((method, path))
        if not replies:
            return Reply(404, json.dumps({"detail": f"{method} {path} is not scripted"}).encode())
        return replies.pop(0) if len(replies) > 1 else replies[0]


@pytest.fixture
def refused_url() -> str:
    """A loopback URL nothing listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def scripted_coordinator() -> Iterator[ScriptedCoordinator]:
    peer = ScriptedCoordinator()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            peer.received.append(Received(self.command, path, dict(self.headers.items()), body))
            reply = peer._next(self.command, path)
            if reply.delay:
                time.sleep(reply.delay)
            self.send_response(reply.status)
            if reply.status != 204:
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if reply.status != 204:
                self.wfile.write(reply.body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    peer.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
