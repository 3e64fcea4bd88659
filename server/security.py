"""Who is calling: operator bearer tokens with roles, and signed device requests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from coordinator import auth
from coordinator.auth import Operator
from coordinator.engine import Federation
from coordinator.errors import TooLarge
from shared.signing import DEVICE_HEADERS

T = TypeVar("T")

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


class SignedRequest:
    """A device request whose signing headers are complete and fresh and whose body is read, but whose
    signature is not yet verified: a route reaches its device and body only through ``run``."""

    def __init__(
        self,
        body: bytes,
        verify: Callable[[bytes], str],
        release: Callable[[], None] = lambda: None,
        in_place: Callable[[], AbstractContextManager[bool]] | None = None,
    ):
        self._body = body
        self._verify = verify
        self.release = release  # frees the upload slot before the request is held (idempotent)
        self._in_place = in_place  # EngineContext.in_place, for a small body; None: always a worker thread

    async def run(self, work: Callable[[str, bytes], T]) -> T:
        """Verify the signature and spend the nonce, then ``work(device_id, body)``.

        Both in one worker thread, or, for a small body when the engine allows it (``EngineContext.in_place``:
        SQLite and the local blob folder, the write lock free), here on the event loop. Each hand-off to a
        thread (a queue put that wakes a worker, the GIL passed to it and back, a wake-up of the event loop
        when it is done) cost more than a small message's work: run in place, a SecAgg+ round over HTTP
        took about a third less of the coordinator's CPU (alternating ``bench/secagg.py`` runs). A large
        upload, or storage over the network (PostgreSQL, S3), keeps the thread: its work would hold up
        every other request. The check commits in a transaction of its own before ``work`` starts, so a
        request refused by the route still spends its nonce, and nothing of the body is parsed before the
        signature holds.
        """
        body, verify = self._body, self._verify
        if self._in_place is not None:
            with self._in_place() as here:
                if here:
                    return work(verify(body), body)
        return await run_in_threadpool(lambda: work(verify(body), body))


async def device_request(request: Request) -> AsyncIterator[SignedRequest]:
    """A signed device request: headers checked, body read; its signature is verified by ``SignedRequest.run``.

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
    held = slots

    def release() -> None:
        # Once the route is done with the body; before a hold (?wait), so that a request held for
        # its next task does not keep other devices' uploads waiting.
        nonlocal held
        if held is not None:
            free, held = held, None
            free.release()

    try:
        body = await read_body(request)
        method, target = request.method, signed_target(request)

        def verify(signed: bytes) -> str:
            with fed.device_write() as db:
                return auth.authenticate_device_id(db, headers, method, target, signed, window_seconds=window)

        yield SignedRequest(body, verify, release, fed.in_place if slots is None else None)
    finally:
        release()
