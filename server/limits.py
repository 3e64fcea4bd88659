"""Request limits enforced before a body is read: size per route class, operator token, enrollment rate.

A pure ASGI middleware, so that nothing buffers a body on its way to the route:
a declared ``Content-Length`` over the route's limit is refused at once, and a
body of undeclared length (chunked) is counted message by message as the route
reads it, and refused the moment the count passes the limit. Requests that an
operator token guards are refused before their body is read unless the token
is valid (the route's own dependency still checks the role), and enrollment,
which needs no credentials, is rate-limited per source address. docs/security.md
lists the limits and the settings that change them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
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

        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes and not refused:
                    refused = True
                    if not started:
                        for reply in _too_large(limit, None):
                            await send(reply)
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; whatever the route answers to its cut-off body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:
            if not refused:
                raise
            # The route failed because its body was cut off: the client has its 413 already.
            log.debug("%s %s: body over %d bytes refused", scope["method"], scope["path"], limit.max_bytes)

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
