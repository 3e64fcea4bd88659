"""The dashboard in a real browser: headless Chromium (Debian's package) through Playwright, against a
real coordinator with real agents and its own audit worker.

What a person would see is what is checked: a bad token refused on the sign-in page, the job in the jobs
table, its round rows and its learning curve growing while it runs without the page being reloaded, an
audit verdict appearing, versions with their signature check and SHAP plots, the devices online, the event
log, and signing out. Screenshots of each page are saved as test artefacts (``test-artifacts/dashboard``,
or ``$AICFL_TEST_ARTIFACTS/dashboard``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Coordinator, churn_slices, small_spec, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("AICFL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
ROUNDS = 4


def chromium() -> str:
    path = os.environ.get("AICFL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium on PATH: `make test` installs it (scripts/install_test_tools.sh)")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Coordinator]:
    coord = Coordinator(tmp_path, extra=["--with-audit-worker"])
    coord.bootstrap()
    coord.start()
    try:
        yield coord
    finally:
        coord.stop_agents()
        coord.stop()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def unlabelled(page: Any) -> list[str]:
    """Form controls without a label and images without alt text on the current page."""
    return page.evaluate(  # type: ignore[no-any-return]
        """() => [
            ...[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
                .map(e => 'control ' + (e.id || e.name)),
            ...[...document.querySelectorAll('img')].filter(i => !i.alt).map(i => 'img ' + i.src),
        ]"""
    )


def test_operator_watches_a_job_run_in_the_dashboard(
    federation: Coordinator, browser: Any, tmp_path: Path
) -> None:
    coord = federation
    api = coord.api()
    viewer = api.json("POST", "/v1/operators", json={"name": "watcher", "role": "viewer"})["token"]
    paths, ref, schema = churn_slices(tmp_path / "data", 3)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"dev{i}"))
    wait_for(lambda: sum(d["online"] for d in api.json("GET", "/v1/devices")) == 3, 60, "three agents online")

    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    seen_urls: list[str] = []
    page.on("request", lambda r: seen_urls.append(r.url))

    # Signed out, the dashboard is the sign-in form; a bad token is refused there with a reason.
    page.goto(f"{coord.url}/ui/")
    assert page.locator("input[name=token]").is_visible()
    assert "Sign in" in page.locator("h1").inner_text()
    assert not unlabelled(page)
    page.fill("input[name=token]", "aicfl_op_not-a-real-token")
    page.click("button[type=submit]")
    assert "not accepted" in page.locator("#signin-message").inner_text()
    assert page.locator("input[name=token]").is_visible()
    shot(page, "01-signin-refused")

    # A viewer token is enough to look.
    page.fill("input[name=token]", viewer)
    page.click("button[type=submit]")
    page.wait_for_url(f"{coord.url}/ui/")
    assert "watcher" in page.locator(".signout").inner_text()

    spec = small_spec(schema, rounds=ROUNDS, target=3, minimum=2, name="dash")
    spec["audit"] = {"rows": 200, "background": 40, "validate_rows": 0}
    job_id = api.json("POST", "/v1/jobs", json=spec)["id"]
    api.request("PUT", f"/v1/jobs/{job_id}/reference", content=ref.read_bytes())
    api.request(
        "PUT",
        f"/v1/jobs/{job_id}/benchmarks/ceiling",
        json={"metrics": {"auc": 0.95}, "description": "trained centrally on the pooled rows"},
    )

    # The jobs table refreshes by itself: the new job appears without a reload.
    row = page.locator(f"tr[data-job='{job_id}']")
    row.wait_for(timeout=15_000)
    assert "dash" in row.inner_text()
    wait_for(lambda: "ceiling" in row.inner_text(), 15, "the ceiling beside the job")
    shot(page, "02-jobs")

    page.click(f"tr[data-job='{job_id}'] a")
    page.wait_for_url(f"{coord.url}/ui/jobs/{job_id}")
    page.evaluate("window.__notReloaded = true")
    rows_seen: list[int] = []
    points_seen: list[int] = []
    stages_seen: set[str] = set()
    deadline = time.time() + 240
    while time.time() < deadline:
        rows_seen.append(page.locator("tr[data-round]").count())
        points_seen.append(int(page.locator("#curve").get_attribute("data-points") or 0))
        if page.locator("#live-stage").count():
            stages_seen.add(page.locator("#live-stage").inner_text())
        if len(points_seen) == 8:
            shot(page, "03-job-running")
        if api.json("GET", f"/v1/jobs/{job_id}")["status"] != "running" and points_seen[-1] >= ROUNDS:
            break
        time.sleep(0.2)
    job = api.json("GET", f"/v1/jobs/{job_id}")
    assert job["status"] == "completed", job
    assert page.evaluate("window.__notReloaded") is True  # everything below came without a reload

    # The round rows grew while the job ran; at the end there is one per round, numbered.
    rounds = api.json("GET", f"/v1/jobs/{job_id}/rounds")
    wait_for(lambda: page.locator("tr[data-round]").count() == len(rounds), 10, "every round's row")
    # Long-polling agents finish a round in about a second: the table may jump by several rows at once.
    assert len(set(rows_seen)) >= 2 and rows_seen == sorted(rows_seen), rows_seen
    numbers = sorted(
        int(n) for n in page.locator("tr[data-round]").evaluate_all("rs => rs.map(r => r.dataset.round)")
    )
    assert numbers == sorted(r["number"] for r in rounds)

    # The curve gained a point per completed training round, one at a time.
    trained = [r for r in rounds if r["kind"] == "train" and r["status"] == "completed"]
    assert len(trained) == ROUNDS
    assert points_seen[-1] == ROUNDS and points_seen == sorted(points_seen)
    assert len(set(points_seen)) >= 2, points_seen
    assert page.locator("#curve canvas").count() >= 1  # uPlot drew it
    # The table under the curve follows the last round's end (it is fetched after the page's refresh).
    curve_rounds = len([r for r in rounds if r["status"] == "completed" and r["kind"] != "stats"])
    wait_for(
        lambda: page.locator("#curve-table tbody tr").count() == curve_rounds,
        10,
        "the curve table's last round",
    )
    assert stages_seen, "the running round's stage was never shown"

    # The audit verdict of the latest version appears on the same page.
    verdict = page.locator("#audit-verdict")
    verdict.wait_for(timeout=180_000)
    wait_for(
        lambda: (
            page.locator("#audit-verdict").inner_text() in ("ok", "drift")
            and f"version {job['current_version']}" in page.locator("#vs ~ dl, #vs + dl").inner_text()
        ),
        180,
        "the latest version's audit verdict",
        interval=0.5,
    )
    assert not unlabelled(page)
    shot(page, "04-job-done")

    # Versions: hash, a valid signature, provenance, the verdict, top features, the SHAP plots.
    page.click("text=Model versions")
    page.wait_for_url(f"{coord.url}/ui/jobs/{job_id}/versions")
    latest = page.locator(f"article[data-version='{job['current_version']}']")
    text = latest.inner_text()
    assert "valid (coordinator key)" in text and "INVALID" not in text
    assert f"round {ROUNDS}" in text
    assert latest.locator("[data-verdict]").inner_text() in ("ok", "drift")
    assert latest.locator("text=Top features").count() == 1
    plot = latest.locator("img").first
    plot.wait_for()
    wait_for(lambda: plot.evaluate("i => i.complete && i.naturalWidth > 100"), 15, "a SHAP plot to load")
    assert "Provenance\nrandom (seed 1)" in page.locator("article[data-version='0']").inner_text()
    assert not unlabelled(page)
    shot(page, "05-versions")

    # Devices: the three agents online, with the rounds they took part in.
    page.click("nav >> text=Devices")
    assert page.locator("#online-count").inner_text() == "3"
    devices = page.locator("tr[data-device]")
    assert devices.count() == 3
    assert all("online" in devices.nth(i).inner_text() for i in range(3))
    shot(page, "06-devices")

    # Events, newest first: the job's rounds and the operator's actions.
    page.click("nav >> text=Events")
    actions = page.locator("tr[data-action]").evaluate_all("rs => rs.map(r => r.dataset.action)")
    assert "round.complete" in actions and "job.submit" in actions and "job.benchmark" in actions
    assert actions.index("job.complete") < actions.index("job.submit")  # newest first
    shot(page, "07-events")

    # Signing out forgets the session: the dashboard is the sign-in form again.
    page.click("text=Sign out")
    assert "signed out" in page.locator("#signin-message").inner_text()
    assert not [c for c in page.context.cookies() if c["name"] == "aicfl_session"]
    page.goto(f"{coord.url}/ui/jobs/{job_id}")
    assert page.locator("input[name=token]").is_visible()
    shot(page, "08-signed-out")

    # The token never appeared in a URL nor in the coordinator's log; nothing came from elsewhere.
    assert not [u for u in seen_urls if viewer in u]
    assert viewer not in coord.log.read_text(errors="replace")
    assert all(u.startswith(coord.url) for u in seen_urls), [
        u for u in seen_urls if not u.startswith(coord.url)
    ]
