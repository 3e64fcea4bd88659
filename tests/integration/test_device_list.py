"""The device list is paged: ``GET /v1/devices`` answers at most ``limit`` devices (500 by default,
1,000 at most) in enrolment order, names the next page in a ``Link`` header while more follow, and
the pages together hold every device exactly once, ties in enrolment time included, on SQLite and
PostgreSQL. The CLI's client follows the pages. Bad paging input is a 422 that names the field."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from coordinator import auth
from coordinator.models import Device
from server.app import create_app
from server.settings import ServerSettings
from shared.api_client import ApiClient

DEVICES = 1_203
SAME_TIME = range(498, 503)  # devices enrolled in the same instant, across the first page's end


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    settings = ServerSettings(data_dir=tmp_path, db=database_url)
    app = create_app(settings, run_ticker=False)
    fed = app.state.federation
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    now = time.time()
    with fed.write() as s:
        token = auth.bootstrap_admin(s)
        for i in range(DEVICES):
            at = t0 + timedelta(seconds=SAME_TIME[0] if i in SAME_TIME else i)
            s.add(
                Device(
                    # ids not in enrolment order, so that the order is the list's, not the key's
                    id=f"dev-{(i * 7919) % DEVICES:05d}",
                    name=f"n{i}",
                    public_key=f"key-{i}",
                    enrolled_at=at,
                    last_seen=now if i % 3 == 0 else None,
                    revoked_at=t0 if i == 6 else None,
                )
            )
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def test_pages_hold_every_device_once_in_enrolment_order(api: TestClient) -> None:
    seen: list[dict] = []
    resp = api.get("/v1/devices")
    pages = 0
    while True:
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages += 1
        assert len(page) <= 500
        seen.extend(page)
        nxt = resp.links.get("next")
        if nxt is None:
            break
        assert len(page) == 500
        resp = api.get(nxt["url"])
    assert pages == 3
    assert len(seen) == DEVICES
    assert len({d["id"] for d in seen}) == DEVICES
    names = [d["name"] for d in seen]
    # enrolment order; the devices of the same instant in id order, wherever the page ends
    order = sorted(
        range(DEVICES), key=lambda i: (SAME_TIME[0] if i in SAME_TIME else i, f"{(i * 7919) % DEVICES:05d}")
    )
    assert names == [f"n{i}" for i in order]
    online = {d["name"] for d in seen if d["online"]}
    assert online == {f"n{i}" for i in range(DEVICES) if i % 3 == 0 and i != 6}


def test_limit_and_after(api: TestClient) -> None:
    first = api.get("/v1/devices", params={"limit": 10})
    assert [d["name"] for d in first.json()] == [f"n{i}" for i in range(10)]
    assert "after=" in first.links["next"]["url"] and "limit=10" in first.links["next"]["url"]
    second = api.get("/v1/devices", params={"limit": 10, "after": first.json()[-1]["id"]})
    assert [d["name"] for d in second.json()] == [f"n{i}" for i in range(10, 20)]
    whole = api.get("/v1/devices", params={"limit": 1000})
    assert len(whole.json()) == 1000 and "next" in whole.links
    last = api.get("/v1/devices", params={"limit": 1000, "after": whole.json()[-1]["id"]})
    assert len(last.json()) == DEVICES - 1000 and "next" not in last.links


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"after": "nobody"}, "after"),
    ],
)
def test_bad_paging_is_refused_by_name(api: TestClient, params: dict, field: str) -> None:
    resp = api.get("/v1/devices", params=params)
    assert resp.status_code == 422, resp.text
    assert field in resp.text


def test_client_follows_every_page(api: TestClient) -> None:
    client = ApiClient("http://testserver", None)
    client._http = api  # the in-process app, over httpx's transport
    devices = client.pages("/v1/devices", params={"limit": 400})
    assert len(devices) == DEVICES and len({d["id"] for d in devices}) == DEVICES
