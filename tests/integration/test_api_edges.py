"""The API's edges, in process: every error is an RFC 9457 problem document (never a traceback), the
state metrics count what the database holds, and the ticker outlives a failing pass."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from coordinator import auth
from server.app import _Ticker, create_app
from server.settings import ServerSettings
from shared.signing import b64e, public_key_bytes, sign_request

from .test_engine_store import spec

PROBLEM = "application/problem+json"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    app = create_app(ServerSettings(data_dir=tmp_path), run_ticker=False)
    with app.state.federation.write() as s:
        token = auth.bootstrap_admin(s)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, token


def test_unknown_routes_bad_bodies_and_crashes_are_problem_documents(api: tuple[TestClient, str]) -> None:
    client, _ = api
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(PROBLEM)
    assert missing.json()["detail"] == "Not Found"

    bad = client.post("/v1/enrollment-tokens", json={"count": 0})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith(PROBLEM)
    assert bad.json()["title"] == "Invalid request"
    assert bad.json()["detail"] == "count: Input should be greater than or equal to 1"

    fed = client.app.state.federation  # type: ignore[attr-defined]

    def crash(*_: object) -> None:
        raise RuntimeError("secret internals")

    fed.jobs.submit = crash
    boom = client.post("/v1/jobs", json=spec())
    assert boom.status_code == 500 and boom.headers["content-type"].startswith(PROBLEM)
    assert boom.json()["detail"] == "the coordinator failed to handle this request (RuntimeError)"
    assert "secret internals" not in boom.text and "Traceback" not in boom.text


def test_state_metrics_count_jobs_rounds_audits_and_online_devices(api: tuple[TestClient, str]) -> None:
    client, _ = api
    assert client.post("/v1/jobs", json=spec()).status_code == 201
    token = client.post("/v1/enrollment-tokens", json={"count": 1}).json()["tokens"][0]
    key = Ed25519PrivateKey.generate()
    device = client.post(
        "/v1/enroll", json={"token": token, "public_key": b64e(public_key_bytes(key)), "name": "d"}
    ).json()["device_id"]
    body = b"{}"
    headers = sign_request(key, device, "POST", "/v1/device/checkin", body)
    assert client.post("/v1/device/checkin", content=body, headers=headers).status_code == 200

    text = client.get("/metrics").text
    assert 'aicfl_jobs{status="running"} 1.0' in text
    assert "aicfl_devices_online 1.0" in text
    assert 'aicfl_audits{status="queued"} 0.0' in text
    client.app.state.federation.tick()  # type: ignore[attr-defined]
    assert "aicfl_rounds" in client.get("/metrics").text


class _Flaky:
    """A federation whose first tick fails: the ticker must log it and go on ticking."""

    def __init__(self) -> None:
        self.calls = 0
        self.again = threading.Event()

    def tick(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bad pass")
        self.again.set()

    def write(self) -> object:
        raise RuntimeError("pruning is not what this test is about")


def test_ticker_outlives_a_failing_pass(caplog: pytest.LogCaptureFixture) -> None:
    fed = _Flaky()
    ticker = _Ticker(fed, interval=0.01, window=60)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        ticker.start()
        try:
            assert fed.again.wait(5), "the ticker stopped after a failing pass"
        finally:
            ticker.stop()
    assert "coordinator tick failed" in caplog.text and fed.calls >= 2
