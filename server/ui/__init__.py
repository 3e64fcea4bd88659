"""The operator's dashboard at ``/ui/``: server-rendered pages in the coordinator's own process.

Jinja2 templates, htmx for the parts that refresh while a job runs, uPlot for the learning curve;
both scripts and the only stylesheet ship in this package (``static/``), so the dashboard works with
no network beyond the coordinator. ``docs/dashboard.md`` describes the pages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.errors import CoordinatorError

log = logging.getLogger("aicfl.ui")

# What a dashboard page may load: its own scripts, styles and images, nothing from elsewhere.
# uPlot sizes its canvas through element styles (CSSOM, which CSP allows); htmx's own indicator
# style element is switched off in base.html, so no inline style or script is needed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def is_ui_path(path: str) -> bool:
    """Whether a request is for the dashboard (its errors are pages, not problem JSON)."""
    return path == "/ui" or path.startswith("/ui/")


def error_page(request: Request, status: int, detail: str) -> HTMLResponse:
    """A page for an error: what went wrong in a sentence and a way back, never a traceback."""
    from server.ui.routes import render

    titles = {401: "Not signed in", 403: "Not allowed", 404: "Not found", 405: "Not allowed"}
    return render(
        request,
        "error.html",
        {
            "status": status,
            "title": titles.get(status, "Something went wrong"),
            "detail": detail,
            "operator": None,
        },
        status,
    )


def mount(app: FastAPI) -> None:
    """Add the dashboard's routes, static files and error pages to the coordinator app."""
    from server.ui.routes import NotSignedIn, router, sign_in_page

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"), name="ui-static")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        from fastapi.responses import RedirectResponse

        return RedirectResponse("/ui/", status_code=307)

    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, err: NotSignedIn) -> Response:
        response = sign_in_page(request, err.message, 401)
        if request.headers.get("hx-request"):
            # An htmx refresh whose session ended: the whole page goes to the sign-in form.
            response.headers["HX-Redirect"] = "/ui/login"
        return response

    app.add_middleware(UiHeaders)


class UiHeaders:
    """ASGI middleware: the dashboard's security headers (and ``no-store`` on its pages).

    Pure ASGI, and a pass-through for every other path: a ``BaseHTTPMiddleware`` here wrapped every
    device request of the coordinator in a task and a stream for headers only the dashboard needs.
    A header the page already set is kept.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_ui_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        extra = dict(SECURITY_HEADERS)
        if not scope["path"].startswith("/ui/static/"):
            extra["Cache-Control"] = "no-store"
        wanted = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in extra.items()]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in wanted if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def coordinator_error_page(request: Request, err: CoordinatorError) -> HTMLResponse:
    """A coordinator error (no such job or version) on a dashboard page."""
    return error_page(request, err.status, err.detail)


def unexpected_error_page(request: Request) -> HTMLResponse:
    """An unexpected failure on a dashboard page: logged with its traceback here, one sentence there."""
    return error_page(request, 500, "the coordinator failed to show this page; its log has the details")
