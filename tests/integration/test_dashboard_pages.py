"""The dashboard's pages and their bad input, through the coordinator app and a real SQLite database.

The browser test (tests/e2e/test_dashboard.py) shows what a person sees while a job runs; these check
each edge one request at a time: the sign-in and its session cookie, error pages instead of tracebacks,
a page of a job with a thousand rounds, and that nothing is loaded from outside the coordinator.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from coordinator import auth
from coordinator.models import OperatorToken, utcnow
from server.app import create_app
from server.settings import ServerSettings
from server.ui import session
from tests.fixtures.history import seed_job_history

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "server" / "ui"


class Site:
    def __init__(self, tmp: Path):
        self.app = create_app(ServerSettings(data_dir=tmp), run_ticker=False)
        self.fed = self.app.state.federation
        with self.fed.write() as s:
            self.admin = auth.bootstrap_admin(s)
            self.viewer = auth.create_operator_token(s, "viewer", "viewer")
        self.client = TestClient(self.app, raise_server_exceptions=False)

    def sign_in(self, token: str) -> Any:
        return self.client.post("/ui/login", data={"token": token}, follow_redirects=False)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    with s.client:
        yield s


def _rounds(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'data-round="(\d+)"', html)]


def test_every_page_signed_out_is_the_sign_in_form_with_a_reason(site: Site) -> None:
    for path in (
        "/ui/",
        "/ui/devices",
        "/ui/events",
        "/ui/jobs/1",
        "/ui/jobs/1/versions",
        "/ui/jobs/1/curve",
    ):
        r = site.client.get(path)
        assert r.status_code == 401, path
        assert 'name="token"' in r.text and "Sign in with an operator token" in r.text, path
    assert site.client.get("/", follow_redirects=False).headers["location"] == "/ui/"


def test_a_bad_token_is_refused_on_the_sign_in_page_and_never_echoed(site: Site) -> None:
    r = site.sign_in("aicfl_op_guess")
    assert r.status_code == 401
    assert "not accepted" in r.text and "aicfl_op_guess" not in r.text
    assert "set-cookie" not in r.headers
    assert "Paste an operator token" in site.sign_in("   ").text
    assert "too long" in site.sign_in("x" * 600).text


def test_a_viewer_token_signs_in_with_a_cookie_that_does_not_hold_the_token(site: Site) -> None:
    r = site.sign_in(site.viewer)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert site.viewer not in cookie and site.viewer.split("_")[-1] not in cookie
    for flag in ("HttpOnly", "SameSite=strict", "Path=/ui"):
        assert flag in cookie
    page = site.client.get("/ui/")
    assert page.status_code == 200 and "Signed in as <strong>viewer</strong> (viewer)" in page.text
    # Signing out deletes the cookie; the pages are the sign-in form again.
    out = site.client.post("/ui/logout")
    assert "You have signed out." in out.text and 'aicfl_session=""' in out.headers["set-cookie"]
    assert site.client.get("/ui/").status_code == 401


def test_a_forged_expired_or_revoked_session_is_refused(site: Site) -> None:
    site.sign_in(site.admin)
    good = site.client.cookies.get(session.COOKIE)
    assert good and site.client.get("/ui/").status_code == 200
    token_id, expires, mac = good.split(".")
    forged = [
        f"{int(token_id) + 1}.{expires}.{mac}",  # another operator's row
        f"{token_id}.{int(expires) + 3600}.{mac}",  # a longer session
        f"{token_id}.{expires}.{mac[:-2]}AA",
        "garbage",
        f"99999999999999999999999.{expires}.{mac}",
    ]
    for value in forged:
        site.client.cookies.set(session.COOKIE, value, path="/ui")
        r = site.client.get("/ui/")
        assert r.status_code == 401 and "not valid" in r.text, value
    with site.fed.read() as s:
        key = session.session_key(site.fed.key)
        expired, _ = session.sign_in(s, key, site.admin, now=0)
    site.client.cookies.set(session.COOKIE, expired, path="/ui")
    assert "has ended" in site.client.get("/ui/").text
    # Revoking the operator token ends its dashboard sessions at once.
    site.client.cookies.set(session.COOKIE, good, path="/ui")
    with site.fed.write() as s:
        s.scalar(select(OperatorToken).where(OperatorToken.name == "admin")).revoked_at = utcnow()
    r = site.client.get("/ui/")
    assert r.status_code == 401 and "revoked" in r.text


def test_sign_in_from_another_site_or_with_an_oversized_form_is_refused(site: Site) -> None:
    r = site.client.post("/ui/login", data={"token": site.admin}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = site.client.post(
        "/ui/login",
        content=b"token=" + b"a" * 10_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 413 and "too large" in r.text


def test_an_htmx_refresh_without_a_session_sends_the_page_to_the_sign_in_form(site: Site) -> None:
    r = site.client.get("/ui/jobs/1/live", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/ui/login"


def test_unknown_things_get_a_404_page_with_a_way_back_never_a_traceback(
    site: Site, monkeypatch: Any
) -> None:
    site.sign_in(site.viewer)
    for path in (
        "/ui/jobs/999",
        "/ui/jobs/99999999999999999999999",
        "/ui/jobs/abc",
        "/ui/jobs/999/versions",
        "/ui/jobs/999/versions/1/plots/importance.png",
        "/ui/jobs/1/versions/2/export?format=pickle",
        "/ui/no-such-page",
    ):
        r = site.client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("text/html"), path
        assert '<a href="/ui/">Back to the jobs</a>' in r.text and "Traceback" not in r.text, path
    from server.ui import views

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(views, "events_page", broken)
    r = site.client.get("/ui/events")
    assert r.status_code == 500 and "its log has the details" in r.text
    assert "Traceback" not in r.text and "a bug" not in r.text


def test_a_job_of_a_thousand_rounds_is_shown_a_page_at_a_time(site: Site) -> None:
    with site.fed.write() as s:
        job_id = seed_job_history(s, rounds=1000)
    site.sign_in(site.viewer)
    first = site.client.get(f"/ui/jobs/{job_id}")
    assert first.status_code == 200
    assert _rounds(first.text) == list(range(1000, 950, -1))
    assert "Page 1 of 21 (1001 in all)" in first.text
    last = site.client.get(f"/ui/jobs/{job_id}/live?page=21")
    assert _rounds(last.text) == [0]
    assert _rounds(site.client.get(f"/ui/jobs/{job_id}?page=9999").text) == [0]  # clamped to the last
    assert _rounds(site.client.get(f"/ui/jobs/{job_id}?page=-3").text)[0] == 1000
    curve = site.client.get(f"/ui/jobs/{job_id}/curve").json()
    assert curve["metric"] == "auc" and curve["rounds"] == list(range(1, 1001))
    assert len(curve["series"]["auc"]["central"]) == 1000
    # A finished job's page does not poll; the devices page pages too.
    assert "hx-trigger" not in first.text.split('id="live"')[1].split(">")[0]
    devices = site.client.get("/ui/devices")
    assert devices.text.count("data-device=") == 20
    assert "1000 × missed the deadline" not in devices.text and "50 × missed the deadline" in devices.text


def test_benchmarks_are_checked_and_need_an_admin(site: Site) -> None:
    with site.fed.write() as s:
        job_id = seed_job_history(s, rounds=3)
    admin = {"Authorization": f"Bearer {site.admin}"}
    url = f"/v1/jobs/{job_id}/benchmarks"
    ok = site.client.put(
        f"{url}/ceiling", json={"metrics": {"auc": 0.95}, "description": "central"}, headers=admin
    )
    assert ok.status_code == 200 and ok.json() == {
        "ceiling": {"metrics": {"auc": 0.95}, "description": "central"}
    }
    bad = [
        ("ceiling", {"metrics": {"auc": "high"}}, "must be a finite number"),
        ("ceiling", {"metrics": {}}, "1 to 32 metric names"),
        ("ceiling", {"metrics": {"auc": 1}, "colour": "red"}, "unknown field(s) colour"),
        ("-bad", {"metrics": {"auc": 1}}, "benchmark name"),
    ]
    for name, body, message in bad:
        r = site.client.put(f"{url}/{name}", json=body, headers=admin)
        assert r.status_code == 422 and message in r.json()["detail"], (name, body, r.text)
    r = site.client.put(
        f"{url}/nan",
        content=b'{"metrics": {"auc": NaN}}',
        headers={**admin, "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    viewer = site.client.put(
        f"{url}/x", json={"metrics": {"auc": 1}}, headers={"Authorization": f"Bearer {site.viewer}"}
    )
    assert viewer.status_code == 403
    assert (
        site.client.put("/v1/jobs/999/benchmarks/x", json={"metrics": {"auc": 1}}, headers=admin).status_code
        == 404
    )
    job = site.client.get(f"/v1/jobs/{job_id}", headers=admin).json()
    assert job["benchmarks"]["ceiling"]["metrics"] == {"auc": 0.95}


def test_pages_load_nothing_from_outside_the_coordinator(site: Site) -> None:
    site.sign_in(site.viewer)
    with site.fed.write() as s:
        job_id = seed_job_history(s, rounds=2)
    for path in (
        "/ui/",
        f"/ui/jobs/{job_id}",
        f"/ui/jobs/{job_id}/versions",
        "/ui/devices",
        "/ui/events",
        "/ui/login",
    ):
        r = site.client.get(path)
        assert "default-src 'self'" in r.headers["content-security-policy"], path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store", path
        assets = re.findall(r'(?:src|href)="([^"#]+)"', r.text)
        assert assets and all(a.startswith("/ui") for a in assets), (path, assets)
        for asset in (a for a in assets if a.startswith("/ui/static/")):
            assert site.client.get(asset).status_code == 200, asset
    for f in (UI / "templates").iterdir():
        assert not re.search(r"https?://", f.read_text()), f


def test_every_dashboard_file_is_package_data() -> None:
    # An installed coordinator (not this checkout) has only the files its wheel carries.
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "server"
    ]
    files = sorted(
        p.relative_to(ROOT / "server").as_posix()
        for p in UI.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    )
    assert "ui/static/htmx.min.js" in files and "ui/templates/job.html" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
