"""Who is calling: operator bearer tokens with roles, and signed device requests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from coordinator import auth
from coordinator.auth import Operator
from coordinator.engine import Federation
from coordinator.errors import TooLarge
from shared.signing import DEVICE_HEADERS

# A device upload over this size (a model update, a masked input) waits for one of the
# coordinator's upload slots before its body is read (ServerSettings.upload_slots).
LARGE_UPLOAD_BYTES = 1024 * 1024


def federation(request: Request) -> Federation:
    return request.app.state.federation  # type: ignore[no-any-return]


# Declared as a security scheme so that the published API names it on every operator operation
# and /docs offers an Authorize button. auto_error=False: a missing or malformed header reaches
# auth.authenticate_operator, which answers with our 401 problem document, not FastAPI's.
bearer = HTTPBearer(
    scheme_name="OperatorToken",
    description="An operator token (`aicfl admin bootstrap`, POST /v1/operators) with the admin or "
    "viewer role, sent as `Authorization: Bearer <token>`. Missing or unknown: 401; a viewer token "
    "on an admin operation: 403.",
    auto_error=False,
)


def operator(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Operator:
    """Any valid operator token (viewer or admin)."""
    fed = federation(request)
    with fed.read() as s:
        return auth.authenticate_operator(s, credentials.credentials if credentials else None)


def admin(op: Operator = Depends(operator)) -> Operator:
    """An operator token with the admin role."""
    op.require("admin")
    return op


async def read_body(request: Request) -> bytes:
    """The body, read in chunks and refused as soon as it passes the size limit."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def signed_target(request: Request) -> str:
    """The path (and query) a device signed."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


async def device_request(request: Request) -> AsyncIterator[tuple[str, bytes]]:
    """Authenticate a signed device request; yields the device id and the body.

    The signing headers and the timestamp are checked before any body is awaited (no database), so
    an unsigned client cannot hold a connection open by trickling a body; the device and its
    revocation, before a large body (over 1 MiB, or of undeclared length) is read, so an unknown
    device cannot make the coordinator buffer a large upload. A large
    body (or one of undeclared length) is read only once an upload slot is free,
    and the slot is held until the handler is done with the body: the others
    wait unread in their sockets (the server stops reading a request whose
    application does not take its body), so a hundred 8 MB masked inputs
    arriving at once cost the coordinator ``upload_slots`` bodies of memory,
    not a hundred.
    """
    fed = federation(request)
    window = request.app.state.settings.signature_window
    headers = {h: request.headers.get(h, "") for h in DEVICE_HEADERS}

    def precheck() -> None:
        with fed.device_read() as db:
            auth.precheck_device(db, headers, window_seconds=window)

    # Free checks first, for every body: a client without a complete, fresh set of signing headers
    # (a slowloris, a scanner) is refused before a byte of its body is awaited.
    auth.check_device_headers(headers, time.time(), window)
    declared = request.headers.get("content-length", "")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    slots = None
    if chunked or (declared.isdigit() and int(declared) > LARGE_UPLOAD_BYTES):
        # A small body is read at once (the route's limit was checked before this), and the checks
        # below are the same: only a large one is worth a transaction of its own before it is read.
        await run_in_threadpool(precheck)
        slots = request.app.state.upload_slots
        await slots.acquire()
    try:
        body = await read_body(request)

        def check() -> str:
            with fed.device_write() as db:
                return auth.authenticate_device_id(
                    db, headers, request.method, signed_target(request), body, window_seconds=window
                )

        yield await run_in_threadpool(check), body
    finally:
        if slots is not None:
            slots.release()
