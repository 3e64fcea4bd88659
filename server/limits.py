"""Request limits enforced before a body is read: size per route class, operator token, enrollment rate.

A pure ASGI middleware, so that nothing buffers a body on its way to the route:
a declared ``Content-Length`` over the route's limit is refused at once, and a
body of undeclared length (chunked) is counted message by message as the route
reads it, and refused the moment the count passes the limit. A body that
arrives too slowly (a slowloris client holding a connection, or an upload slot,
a byte at a time) is cut off with 408. Requests that an operator token guards
are refused before their body is read unless the token is valid (the route's
own dependency still checks the role), and enrollment, which needs no
credentials, is rate-limited per source address. docs/security.md lists the
limits and the settings that change them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import auth
from coordinator.engine import Federation
from coordinator.errors import Unauthorized
from server.settings import ServerSettings

log = logging.getLogger("aicfl.limits")

# Device routes whose bodies are model updates or masked inputs (binary, up to max_body_bytes).
_DEVICE_UPLOAD = re.compile(r"^/v1/device/rounds/[^/]+/(input|masked_input)$")
# Operator uploads of a model or of reference data (binary or CSV, up to max_body_bytes).
_OPERATOR_UPLOAD = re.compile(r"^/v1/jobs/[^/]+/(reference|models/0)$")
# Operator uploads of an audit report with its plots, or of an AutoML baseline with its SHAP summary.
_OPERATOR_REPORT = re.compile(r"^/v1/(audits/[^/]+/report|jobs/[^/]+/baseline)$")
# /v1 routes that need no operator token: the agents' own, and the two public ones.
_NOT_OPERATOR = re.compile(r"^/v1/(enroll|device/.*|health|coordinator/key)$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Bytes a second that a body must keep up beyond ServerSettings.body_read_timeout: each this many
# bytes that arrive earn one more second, so a large upload that keeps up 16 KiB/s is never cut,
# while a byte every few seconds earns nothing.
BODY_MIN_RATE = 16 * 1024


@dataclass(frozen=True)
class RouteLimit:
    """What a request may send: at most ``max_bytes`` (setting ``setting``); whether a token comes first."""

    max_bytes: int
    setting: str
    what: str
    operator: bool = False
    enroll: bool = False


def route_limit(method: str, path: str, settings: ServerSettings) -> RouteLimit:
    """The limit a request falls under, from its method and path alone (before any routing)."""
    if path == "/v1/enroll":
        return RouteLimit(settings.max_enroll_bytes, "max_enroll_bytes", "enrollment requests", enroll=True)
    if _DEVICE_UPLOAD.match(path):
        return RouteLimit(settings.max_body_bytes, "max_body_bytes", "device uploads")
    if path == "/ui" or path.startswith("/ui/"):
        return RouteLimit(settings.max_form_bytes, "max_form_bytes", "dashboard forms")
    operator = path.startswith("/v1/") and not _NOT_OPERATOR.match(path) and method in _BODY_METHODS
    if _OPERATOR_UPLOAD.match(path):
        return RouteLimit(settings.max_body_bytes, "max_body_bytes", "model and data uploads", operator)
    if _OPERATOR_REPORT.match(path):
        return RouteLimit(
            settings.max_audit_report_bytes, "max_audit_report_bytes", "audit reports and baselines", operator
        )
    return RouteLimit(settings.max_json_bytes, "max_json_bytes", "JSON requests", operator)


class TokenBuckets:
    """A token bucket per key: ``rate_per_minute`` requests a minute, in bursts of up to that many.

    Buckets that have filled up again are forgotten once more than ``max_keys``
    are held, so a flood from many addresses costs bounded memory.
    """

    def __init__(
        self, rate_per_minute: float, *, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic
    ):
        self.capacity = rate_per_minute
        self.per_second = rate_per_minute / 60.0
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Spend one token of ``key``'s bucket: 0 if there was one, else the seconds until there is."""
        now = self.clock()
        tokens, then = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.per_second)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.per_second
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, (t, w) in self._buckets.items() if t + (now - w) * self.per_second >= self.capacity]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:  # all busy: forget the oldest rather than grow
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in oldest[: len(self._buckets) - self.max_keys + 1]:
                del self._buckets[k]


class _BodyTooLarge(Exception):
    """Raised to the route reading a body that passed its limit (the 413 is already sent)."""


class _BodyTimedOut(Exception):
    """Raised to the route reading a body that arrives too slowly (the 408 is already sent)."""


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> list[Message]:
    """An RFC 9457 problem response as ASGI messages; the connection closes, its body unread."""
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}).encode()
    raw = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def _too_large(limit: RouteLimit, size: int | None) -> list[Message]:
    sent = f"request body of {size} bytes" if size is not None else "request body"
    return _problem(
        413,
        "Content too large",
        f"{sent} is over the {limit.max_bytes}-byte limit for {limit.what}"
        f" (setting AICFL_{limit.setting.upper()})",
    )


def _timed_out(timeout: float, received: int, waited: float) -> list[Message]:
    return _problem(
        408,
        "Request timeout",
        f"the request body arrived too slowly ({received} bytes in {waited:.1f} s): a body may take"
        f" {timeout:g} s (setting AICFL_BODY_READ_TIMEOUT) plus 1 s per {BODY_MIN_RATE // 1024} KiB"
        f" received, and may pause for at most {timeout:g} s",
    )


def _declared_size(scope: Scope, limit: RouteLimit) -> list[Message] | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > limit.max_bytes:
            return _too_large(limit, int(value))
    return None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class _Exchange:
    """One request's receive and send as its route sees them: the body counted and timed as it is
    read, the route's own answer dropped once the body was cut off (its refusal went out instead).

    Only waits for more of the body are timed, and only they count: while the route does not read
    (a large upload waiting for its slot) the client is not to blame. Once the body is complete, a
    receive waits for the client's disconnect (a held check-in, Starlette's disconnect watch) for
    as long as the route likes.
    """

    def __init__(self, receive: Receive, send: Send, limit: RouteLimit, timeout: float):
        self._receive, self._send = receive, send
        self.limit, self.timeout = limit, timeout
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for parts of the body
        self.complete = False  # the last part of the body has arrived, or the client has left
        self.started = False  # the route's answer has started
        self.cut: str | None = None  # why the body was refused, if it was

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        message = await self._receive_in_time()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.received > self.limit.max_bytes and self.cut is None:
                await self._refuse(f"over {self.limit.max_bytes} bytes", _too_large(self.limit, None))
                raise _BodyTooLarge()
        else:
            self.complete = True  # http.disconnect
        return message

    async def _receive_in_time(self) -> Message:
        loop = asyncio.get_running_loop()
        # A wait ends after `timeout` without a byte, or once the body as a whole is late: it has
        # `timeout` seconds, and one more for each BODY_MIN_RATE bytes that have arrived.
        allowed = self.timeout + self.received / BODY_MIN_RATE - self.waited
        began = loop.time()
        try:
            async with asyncio.timeout(min(self.timeout, allowed)):
                message = await self._receive()
        except TimeoutError:
            self.waited += loop.time() - began
            if self.cut is None:
                reply = _timed_out(self.timeout, self.received, self.waited)
                await self._refuse(f"too slow: {self.received} bytes in {self.waited:.1f} s", reply)
            raise _BodyTimedOut() from None
        self.waited += loop.time() - began
        return message

    async def _refuse(self, why: str, reply: list[Message]) -> None:
        self.cut = why
        if not self.started:  # else the answer is under way: the server closes the connection
            for message in reply:
                await self._send(message)

    async def send(self, message: Message) -> None:
        if self.cut is not None:
            return  # the refusal went out; whatever the route answers to its cut-off body is dropped
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class BodyLimits:
    """ASGI middleware: a request's body limit, operator token and enrollment rate, checked while receiving.

    The settings and the federation are read from ``scope["app"].state``, as the
    routes read them, so the middleware is added with no arguments.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self._enroll: TokenBuckets | None = None
        self._unlimited: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        settings: ServerSettings = state.settings
        limit = route_limit(scope["method"], scope["path"], settings)
        refusal = _declared_size(scope, limit)
        if refusal is None and limit.enroll:
            refusal = self._enroll_rate(scope, settings)
        if refusal is None and limit.operator:
            refusal = await self._operator(scope, state.federation)
        if refusal is not None:
            for message in refusal:
                await send(message)
            return

        exchange = _Exchange(receive, send, limit, settings.body_read_timeout)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as err:
            if exchange.cut is not None:
                # The route failed because its body was cut off: the client has its refusal already.
                log.debug("%s %s: body refused (%s)", scope["method"], scope["path"], exchange.cut)
            elif isinstance(err, ClientDisconnect):
                # The client left mid-body, before anything was done for it: one line, not a traceback.
                log.info(
                    "%s %s: the client closed the connection after %d body bytes",
                    scope["method"],
                    scope["path"],
                    exchange.received,
                )
                if not exchange.started:
                    # No one reads this answer, but the request metrics count it (a request with no
                    # response would go uncounted): 499 is nginx's "client closed request".
                    for message in _problem(499, "Client closed request", "the client left mid-body"):
                        await exchange.send(message)
            else:
                raise

    def _enroll_rate(self, scope: Scope, settings: ServerSettings) -> list[Message] | None:
        if self._enroll is None:
            self._enroll = TokenBuckets(settings.enroll_rate_per_minute)
            self._unlimited = [
                ipaddress.ip_network(n, strict=False) for n in settings.enroll_unlimited_networks
            ]
        host = (scope.get("client") or ("", 0))[0]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None  # not an IP address (an in-process test client): limited like any other
        if address is not None and any(address in net for net in self._unlimited):
            return None
        wait = self._enroll.take(str(host))
        if not wait:
            return None
        seconds = max(1, math.ceil(wait))
        return _problem(
            429,
            "Too many requests",
            f"too many enrollment attempts from {host}: at most {settings.enroll_rate_per_minute:g} a minute"
            f" (setting AICFL_ENROLL_RATE_PER_MINUTE); retry in {seconds} s",
            {"Retry-After": str(seconds)},
        )

    async def _operator(self, scope: Scope, fed: Federation) -> list[Message] | None:
        token = _bearer(scope)

        def check() -> None:
            with fed.read() as s:
                auth.authenticate_operator(s, token)

        try:
            await run_in_threadpool(check)
        except Unauthorized as err:
            return _problem(401, err.title, err.detail, {"WWW-Authenticate": "Bearer"})
        return None
