"""A request body must keep arriving: the body-read deadline of ``server.limits.BodyLimits``.

The middleware is driven here through ASGI with a scripted client (each part of
the body arrives after a delay of its own) and a route that reads its body with
Starlette's ``Request.stream()``, as ``server.security.read_body`` does: the
edge cases that a socket makes hard to time (an answer already started, a wait
for the disconnect after the body, a route that reads late). The real server
under a trickling client is tests/integration/test_slow_bodies.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from server.limits import BODY_MIN_RATE, BodyLimits
from server.settings import ServerSettings

UPLOAD = "/v1/device/rounds/1/masked_input"  # no operator token, limited to max_body_bytes
TIMEOUT = 0.3
FOREVER = 3600.0


def part(body: bytes, more: bool = True) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


DISCONNECT: Message = {"type": "http.disconnect"}


@dataclass
class Client:
    """The client side of one request: each message of ``script`` arrives ``delay`` seconds after the
    route asks for it; past the script, nothing more ever comes. ``sent``: what the client was sent."""

    script: list[tuple[float, Message]]
    sent: list[Message] = field(default_factory=list)

    async def receive(self) -> Message:
        if not self.script:
            await asyncio.sleep(FOREVER)
        delay, message = self.script.pop(0)
        await asyncio.sleep(delay)
        return message

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) <= 1, self.sent
        return starts[0]["status"] if starts else None

    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m for m in self.sent if m["type"] == "http.response.start")["headers"])

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


@dataclass
class Route:
    """A route that reads its whole body (after ``wait_before`` seconds, as a large upload waits for
    its slot), optionally starting its answer first, then answers 200 with the body's length."""

    wait_before: float = 0.0
    answer_first: bool = False
    then: Callable[[Receive], Awaitable[Any]] | None = None  # what it does once the body is in
    read: int | None = None  # bytes it read, once it has them all
    error: BaseException | None = None  # what its read raised

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(self.wait_before)
        if self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            self.read = len(b"".join([chunk async for chunk in Request(scope, receive).stream()]))
        except BaseException as err:
            self.error = err
            raise
        if self.then is not None:
            await self.then(receive)
        if not self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(self.read).encode()})


def run(route: Route, client: Client, timeout: float = TIMEOUT) -> float:
    """Serve one request of ``client`` through the middleware to ``route``; the seconds it took."""
    settings = ServerSettings(body_read_timeout=timeout)
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": UPLOAD,
        "headers": [(b"content-length", b"1000000")],
        "app": SimpleNamespace(state=SimpleNamespace(settings=settings, federation=None)),
    }
    began = time.monotonic()
    asyncio.run(asyncio.wait_for(BodyLimits(route)(scope, client.receive, client.send), 30))
    return time.monotonic() - began


def test_a_trickled_body_is_answered_408_once_its_time_is_up() -> None:
    client = Client([(0.05, part(b"x")) for _ in range(100)])
    route = Route()
    took = run(route, client)
    assert client.status == 408
    assert client.headers()[b"connection"] == b"close"
    assert client.headers()[b"content-type"] == b"application/problem+json"
    problem = json.loads(client.body())
    assert problem["status"] == 408 and "AICFL_BODY_READ_TIMEOUT" in problem["detail"], problem
    assert route.read is None and route.error is not None  # the route's read was stopped
    assert TIMEOUT <= took < TIMEOUT + 0.25, took


def test_a_body_that_stops_is_cut_after_the_timeout_whatever_it_earned_before() -> None:
    # A mebibyte at once earns 64 s more for the whole body, but a pause is never longer than the timeout.
    client = Client([(0.0, part(b"x" * 1024 * 1024))])
    took = run(Route(), client)
    assert client.status == 408
    assert TIMEOUT <= took < TIMEOUT + 0.25, took


def test_a_large_body_that_keeps_up_the_minimum_rate_is_never_cut() -> None:
    # Five times the timeout in all, at about twice the minimum rate: each part earns its time.
    chunk = int(BODY_MIN_RATE * 0.1 * 2)
    client = Client([(0.1, part(b"x" * chunk)) for _ in range(15)] + [(0.1, part(b"", more=False))])
    route = Route()
    took = run(route, client)
    assert client.status == 200 and route.read == 15 * chunk
    assert took > 5 * TIMEOUT


def test_time_the_route_takes_before_it_reads_is_not_counted() -> None:
    # A large upload waits for its upload slot with its body unread: the client is not slow.
    client = Client([(0.0, part(b"x" * 1000)), (0.1, part(b"y" * 1000, more=False))])
    route = Route(wait_before=3 * TIMEOUT)
    run(route, client)
    assert client.status == 200 and route.read == 2000


def test_the_wait_for_a_disconnect_after_the_body_is_not_timed() -> None:
    # A held check-in (server.longpoll) waits on receive() for the client to leave, long after its body.
    seen: list[Message] = []

    async def hold(receive: Receive) -> None:
        seen.append(await receive())

    client = Client([(0.0, part(b"{}", more=False)), (4 * TIMEOUT, DISCONNECT)])
    route = Route(then=hold)
    run(route, client)
    assert seen == [DISCONNECT]
    assert client.status == 200 and route.read == 2


def test_a_body_late_after_the_answer_started_ends_the_request_without_a_second_answer() -> None:
    client = Client([(0.05, part(b"x")) for _ in range(100)])
    route = Route(answer_first=True)
    took = run(route, client)  # returns: the route's failure does not escape the middleware
    assert client.status == 200  # the only answer: a 408 cannot follow it
    assert client.body() == b""  # and the route's own end of it is dropped, so the server closes
    assert route.error is not None
    assert took < TIMEOUT + 0.25, took


def test_a_client_that_leaves_mid_body_ends_the_request_with_one_quiet_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = Client([(0.0, part(b"x" * 500)), (0.05, DISCONNECT)])
    route = Route()
    with caplog.at_level(logging.DEBUG, logger="aicfl"):
        run(route, client)  # returns: nothing escapes to the server's error log
    assert type(route.error).__name__ == "ClientDisconnect"
    assert client.status == 499  # for the metrics and the dashboard's middleware: no one reads it
    lines = [r for r in caplog.records if r.name.startswith("aicfl")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].exc_info is None, lines
    assert "after 500 body bytes" in lines[0].getMessage()
