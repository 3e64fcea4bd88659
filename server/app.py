"""The coordinator API: a FastAPI app around the federation engine."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from coordinator import auth
from coordinator.blobs import open_blob_store
from coordinator.datadir import prepare_data_dir
from coordinator.engine import EngineSettings, Federation
from coordinator.errors import CoordinatorError
from coordinator.keys import load_or_create_signing_key, publish_public_key
from coordinator.store import make_engine, migrate, session_factory
from server import limits, metrics, ui
from server.longpoll import LongPolls
from server.routers import audits, device_api, jobs, operators
from server.settings import ServerSettings
from shared.jobspec import JobSpecError
from shared.signing import b64e, public_key_bytes

log = logging.getLogger("aicfl.server")
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem-details response (``server.schemas.Problem``)."""
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type=PROBLEM,
        headers=headers,
    )


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """The methods the app's routes answer at the request's path (the Allow header of a 405)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """Serve ``router``'s routes from the app as they were built, not through ``include_router``.

    Since FastAPI 0.137 ``include_router`` keeps the router behind a wrapper whose routes rebuild their
    request handler (``get_request_handler``) on every request and are found by walking the wrapper:
    together 13% of the coordinator's CPU in a SecAgg+ round over HTTP (py-spy). Each route here was
    built with its router's prefix and tags and the router adds nothing else (no dependencies,
    callbacks or responses of its own), so the routes serve as they are, in the app's own list.
    """
    if router.dependencies or router.callbacks or router.responses:
        raise ValueError("a router with dependencies, callbacks or responses of its own needs include_router")
    app.router.routes.extend(router.routes)


def build_federation(settings: ServerSettings) -> Federation:
    """The engine as ``settings`` describe it. Before the database: a blob store that cannot be used, or
    one whose coordinators sign with another key (``keys.publish_public_key``), stops the start before
    any migration runs."""
    prepare_data_dir(settings.data_dir)
    blobs = open_blob_store(
        settings.blob_store, local_root=settings.data_dir / "blobs", endpoint_url=settings.s3_endpoint_url
    )
    key_file = settings.signing_key_file or settings.data_dir / "coordinator_key.pem"
    key = load_or_create_signing_key(key_file)
    publish_public_key(blobs, key, key_file)
    engine = make_engine(settings.database_url())
    migrate(engine)
    return Federation(
        session_factory(engine),
        blobs,
        key,
        EngineSettings(
            eligibility_window=settings.eligibility_window,
            idle_retry=settings.idle_retry,
            poll_retry=settings.poll_retry,
            active_retry=settings.active_retry,
            long_poll=settings.long_poll,
        ),
    )


class _Ticker:
    """Drives the rounds from a background thread (deadlines pass without any request)."""

    def __init__(self, fed: Federation, interval: float, window: float):
        self.fed, self.interval, self.window = fed, interval, window
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aicfl-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(self.interval):
            try:
                self.fed.tick()
                if time.time() - last_prune > 60:
                    with self.fed.write() as s:
                        auth.prune_nonces(s, self.window)
                    last_prune = time.time()
            except Exception:  # noqa: BLE001 - the ticker must outlive a bad pass
                log.exception("coordinator tick failed")


def create_app(settings: ServerSettings | None = None, *, run_ticker: bool = True) -> FastAPI:
    settings = settings or ServerSettings()
    fed = build_federation(settings)
    ticker = _Ticker(fed, settings.tick_interval, settings.signature_window)
    long_polls = LongPolls(
        fed,
        interval=settings.tick_interval,
        capacity=settings.long_poll_max_held,
        online_window=settings.eligibility_window,
        answers=fed.checkins.woken,
    )
    fed.driver.observers.append(long_polls)  # a round opened or moved on here: its held devices are told now

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if run_ticker:
            ticker.start()
        long_polls.start()
        restore_signals = long_polls.release_on_signals()
        yield
        restore_signals()
        await long_polls.stop()
        if run_ticker:
            ticker.stop()

    app = FastAPI(
        title="aicfl coordinator",
        version="0.1.0",
        description="Federation coordinator: devices, jobs, rounds, model registry.",
        lifespan=lifespan,
    )
    app.state.federation = fed
    app.state.settings = settings
    app.state.upload_slots = asyncio.Semaphore(settings.upload_slots)
    app.state.long_polls = long_polls
    # Innermost of the middlewares, so the route reads its body through the limit and nothing else buffers it.
    app.add_middleware(limits.BodyLimits)

    metrics.install(app, fed, settings.eligibility_window)

    @app.exception_handler(CoordinatorError)
    async def _coordinator_error(request: Request, err: CoordinatorError) -> Response:
        if ui.is_ui_path(request.url.path):
            return ui.coordinator_error_page(request, err)
        return problem(err.status, err.title, err.detail)

    @app.exception_handler(JobSpecError)
    async def _spec_error(_: Request, err: JobSpecError) -> JSONResponse:
        return problem(422, "Invalid job spec", str(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors()[:5]:
            loc = ".".join(str(p) for p in e["loc"] if p != "body") or "(body)"
            parts.append(f"{loc}: {e['msg']}")
        return problem(422, "Invalid request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> Response:
        if ui.is_ui_path(request.url.path):
            return ui.error_page(request, err.status_code, str(err.detail))
        headers = dict(err.headers or {})
        if err.status_code == 405:
            # Starlette's Allow names the methods of one route; a path has a route per method.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return problem(err.status_code, "HTTP error", str(err.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("unhandled error")
        if ui.is_ui_path(request.url.path):
            return ui.unexpected_error_page(request)
        return problem(
            500, "Internal error", f"the coordinator failed to handle this request ({type(err).__name__})"
        )

    @app.get("/v1/health", tags=["meta"])
    def health() -> dict[str, Any]:
        with fed.read() as s:
            s.execute(select(1))
        return {"status": "ok", "version": app.version}

    @app.get("/v1/coordinator/key", tags=["meta"])
    def coordinator_key() -> dict[str, str]:
        """The public key that signs every model version."""
        return {"algorithm": "Ed25519", "public_key": b64e(public_key_bytes(fed.key))}

    # The devices' routes first: a request is matched against the routes in order, and theirs are the
    # requests that come by the thousand (no other route's path begins /v1/device/ or is /v1/enroll).
    for router in (device_api.router, operators.router, jobs.router, audits.router):
        add_routes(app, router)
    ui.mount(app)
    return app
