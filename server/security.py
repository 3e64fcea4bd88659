"""Who is calling: operator bearer tokens with roles, and signed device requests."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from coordinator import auth
from coordinator.auth import Operator
from coordinator.engine import Federation
from coordinator.errors import Invalid


def federation(request: Request) -> Federation:
    return request.app.state.federation  # type: ignore[no-any-return]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def operator(request: Request) -> Operator:
    """Any valid operator token (viewer or admin)."""
    fed = federation(request)
    with fed.read() as s:
        return auth.authenticate_operator(s, _bearer(request))


def admin(request: Request) -> Operator:
    """An operator token with the admin role."""
    op = operator(request)
    op.require("admin")
    return op


async def read_body(request: Request) -> bytes:
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Invalid(f"request body of {declared} bytes is over the {limit}-byte limit")
    body = await request.body()
    if len(body) > limit:
        raise Invalid(f"request body is over the {limit}-byte limit")
    return body


def signed_target(request: Request) -> str:
    """The path (and query) a device signed."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


async def device_request(request: Request) -> tuple[str, bytes]:
    """Authenticate a signed device request; returns the device id and the body."""
    body = await read_body(request)
    fed = federation(request)
    window = request.app.state.settings.signature_window
    headers = {k: v for k, v in request.headers.items()}
    canonical = {
        h: headers.get(h.lower(), "")
        for h in ("X-AICFL-Device", "X-AICFL-Timestamp", "X-AICFL-Nonce", "X-AICFL-Signature")
    }

    def check() -> str:
        with fed.write() as s:
            return auth.authenticate_device(
                s, canonical, request.method, signed_target(request), body, window_seconds=window
            ).id

    return await run_in_threadpool(check), body
