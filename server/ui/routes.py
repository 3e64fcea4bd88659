"""The dashboard's pages: thin handlers that check the session, read a view and render a template.

Every page is read-only: a viewer token is enough to look, and the only forms are sign-in and
sign-out. Pages that change while a job runs (the jobs table, a job's progress and rounds) are
re-fetched by htmx every few seconds as HTML fragments; the learning curve is drawn by uPlot from a
small JSON document. Nothing is loaded from outside the coordinator.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from coordinator.auth import Operator
from coordinator.errors import NotFound
from coordinator.queries import get_job
from server.security import federation
from server.ui import session, views

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _iso(dt: datetime) -> str:
    """A stored time as ISO 8601 in UTC (SQLite gives them back without their zone)."""
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


templates.env.filters["iso"] = _iso

# The sign-in form carries one token (a few dozen characters); its body is refused past this.
MAX_FORM_BYTES = 4096
POLL_SECONDS = 2
EXPORT_FORMATS = ("state_dict", "torchscript", "onnx")


class NotSignedIn(Exception):
    """No session, or one that no longer holds: the page answers with the sign-in form."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _key(request: Request) -> bytes:
    key: bytes | None = getattr(request.app.state, "ui_session_key", None)
    if key is None:
        key = session.session_key(federation(request).key)
        request.app.state.ui_session_key = key
    return key


def signed_in(request: Request) -> Operator:
    """The operator of the request's session cookie, or NotSignedIn with the reason."""
    with federation(request).read() as s:
        try:
            return session.current(s, _key(request), request.cookies.get(session.COOKIE)).operator
        except session.SignInError as err:
            raise NotSignedIn(str(err)) from None


def _number(text: str, what: str) -> int:
    """A path or query number; anything else is a 404 page (not a 500 for a number past 64 bits)."""
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"there is no {what} {text[:40]!r}")
    return int(text)


def _page(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    return int(raw) if raw.isdigit() and len(raw) < 9 else 1


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def sign_in_page(request: Request, message: str | None, status: int = 200) -> HTMLResponse:
    return render(request, "login.html", {"message": message, "operator": None}, status)


def _same_origin(request: Request) -> bool:
    """A form post from one of the dashboard's own pages (the browser's Origin names this host)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


@router.get("", response_class=RedirectResponse)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    try:
        signed_in(request)
    except NotSignedIn:
        return sign_in_page(request, None)
    return RedirectResponse("/ui/", status_code=303)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the pasted token and start a session; the token itself is never stored or logged."""
    if not _same_origin(request):
        return sign_in_page(request, "Sign in from this coordinator's own sign-in page.", 403)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        return sign_in_page(request, "That is not an operator token (the form is too large).", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return sign_in_page(request, "That is not an operator token (the form is too large).", 413)
    token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
    fed = federation(request)

    def check() -> tuple[str, Operator]:
        with fed.read() as s:
            return session.sign_in(s, _key(request), token)

    try:
        cookie, _ = await run_in_threadpool(check)
    except session.SignInError as err:
        return sign_in_page(request, str(err), 401)
    response = RedirectResponse("/ui/", status_code=303)
    response.set_cookie(
        session.COOKIE,
        cookie,
        max_age=session.LIFETIME_SECONDS,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", response_class=HTMLResponse)
def logout(request: Request) -> Response:
    """Forget the session: the browser deletes the cookie, and nothing of it stays here."""
    response = sign_in_page(request, "You have signed out.")
    response.delete_cookie(session.COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


def _common(request: Request, operator: Operator, **context: Any) -> dict[str, Any]:
    return {"operator": operator, "poll": POLL_SECONDS, "now": time.time(), **context}


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request) -> Response:
    op = signed_in(request)
    with federation(request).read() as s:
        jobs = views.jobs_overview(s)
    return render(request, "jobs.html", _common(request, op, jobs=jobs, section="jobs"))


@router.get("/fragments/jobs", response_class=HTMLResponse)
def jobs_fragment(request: Request) -> Response:
    op = signed_in(request)
    with federation(request).read() as s:
        jobs = views.jobs_overview(s)
    return render(request, "_jobs_table.html", _common(request, op, jobs=jobs))


def _job_context(request: Request, op: Operator, job_id: str) -> dict[str, Any]:
    n = _number(job_id, "job")
    page = _page(request)
    with federation(request).read() as s:
        job = get_job(s, n)
        return _common(
            request,
            op,
            job={
                "id": job.id,
                "name": job.name,
                "app": (job.spec.get("model") or {}).get("app") or "built-in tabular app",
                "created_by": job.created_by,
                "created_at": job.created_at,
                "secure": job.spec.get("secure", True),
            },
            overview=views.jobs_overview(s, [job])[0],
            live=views.live(s, job),
            rounds=views.rounds_page(s, job, page),
            section="jobs",
        )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> Response:
    op = signed_in(request)
    return render(request, "job.html", _job_context(request, op, job_id))


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, job_id: str) -> Response:
    """The part of a job's page that changes while it runs: progress and the page of rounds."""
    op = signed_in(request)
    return render(request, "_live.html", _job_context(request, op, job_id))


@router.get("/jobs/{job_id}/curve")
def job_curve(request: Request, job_id: str) -> JSONResponse:
    signed_in(request)
    n = _number(job_id, "job")
    with federation(request).read() as s:
        return JSONResponse(views.curve(s, get_job(s, n)))


@router.get("/jobs/{job_id}/versions", response_class=HTMLResponse)
def versions(request: Request, job_id: str) -> Response:
    op = signed_in(request)
    n = _number(job_id, "job")
    fed = federation(request)
    with fed.read() as s:
        job = get_job(s, n)
        page = views.versions_page(s, job, fed.key.public_key(), _page(request))
        context = _common(
            request,
            op,
            job={"id": job.id, "name": job.name},
            versions=page,
            formats=EXPORT_FORMATS,
            section="jobs",
        )
    return render(request, "versions.html", context)


@router.get("/jobs/{job_id}/versions/{version}/plots/{name}")
def plot(request: Request, job_id: str, version: str, name: str) -> Response:
    """One of a version's SHAP audit plots, for the versions page."""
    signed_in(request)
    n, v = _number(job_id, "job"), _number(version, "version")
    fed = federation(request)
    from coordinator import audits

    with fed.read() as s:
        sha = (audits.get_audit(s, n, v).plots or {}).get(name)
    if sha is None:
        raise NotFound(f"the audit of job {n} version {v} has no plot {name[:60]!r}")
    return Response(
        fed.blobs.get(sha), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


@router.get("/jobs/{job_id}/versions/{version}/export")
def export(request: Request, job_id: str, version: str) -> Response:
    """A version in a standard format, as the API's export route gives it (signed-in download)."""
    from server.routers.jobs import export_version

    signed_in(request)
    fmt = request.query_params.get("format", "state_dict")
    if fmt not in EXPORT_FORMATS:
        raise NotFound(f"there is no export format {fmt[:40]!r}; use one of {', '.join(EXPORT_FORMATS)}")
    data, media, filename = export_version(
        federation(request), _number(job_id, "job"), _number(version, "version"), fmt
    )
    return Response(
        data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@router.get("/devices", response_class=HTMLResponse)
def devices(request: Request) -> Response:
    op = signed_in(request)
    window = request.app.state.settings.eligibility_window
    with federation(request).read() as s:
        page = views.devices_page(s, window, _page(request))
    return render(
        request, "devices.html", _common(request, op, devices=page, window=window, section="devices")
    )


@router.get("/events", response_class=HTMLResponse)
def events(request: Request) -> Response:
    op = signed_in(request)
    with federation(request).read() as s:
        page = views.events_page(s, _page(request))
    return render(request, "events.html", _common(request, op, events=page, section="events"))
