"""Signed device requests over real HTTP: unsigned, replayed, stale, tampered and revoked get 401."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.signing import HEADER_TIMESTAMP, b64e, public_key_bytes, sign_request

from . import harness
from .harness import Coordinator

pytestmark = pytest.mark.slow
PATH = "/v1/device/checkin"


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory):
    c = Coordinator(tmp_path_factory.mktemp("http"))
    c.bootstrap()
    c.start()
    yield c
    c.stop()


@pytest.fixture
def device(coord: Coordinator) -> tuple[str, Ed25519PrivateKey]:
    return harness.enroll_devices(coord, 1)[0]


def post(coord: Coordinator, headers: dict[str, str], body: bytes = b"{}") -> httpx.Response:
    return httpx.post(coord.url + PATH, content=body, headers={**headers, "Content-Type": "application/json"})


def test_signed_checkin_is_accepted(coord: Coordinator, device: tuple[str, Ed25519PrivateKey]) -> None:
    device_id, key = device
    resp = post(coord, sign_request(key, device_id, "POST", PATH, b"{}"))
    assert resp.status_code == 200 and resp.json()["retry_after"] > 0


def test_unsigned_request_gets_401(coord: Coordinator, device: tuple[str, Ed25519PrivateKey]) -> None:
    resp = post(coord, {"X-AICFL-Device": device[0]})
    assert resp.status_code == 401
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert "unsigned" in resp.json()["detail"]


def test_replayed_request_gets_401(coord: Coordinator, device: tuple[str, Ed25519PrivateKey]) -> None:
    headers = sign_request(device[1], device[0], "POST", PATH, b"{}")
    assert post(coord, headers).status_code == 200
    again = post(coord, headers)
    assert again.status_code == 401 and "replayed nonce" in again.json()["detail"]


def test_stale_timestamp_gets_401(coord: Coordinator, device: tuple[str, Ed25519PrivateKey]) -> None:
    import time
    from unittest import mock

    with mock.patch("shared.signing.time.time", return_value=time.time() - 3600):
        headers = sign_request(device[1], device[0], "POST", PATH, b"{}")
    resp = post(coord, headers)
    assert resp.status_code == 401 and "window" in resp.json()["detail"]
    assert headers[HEADER_TIMESTAMP]


def test_tampered_body_or_foreign_key_gets_401(
    coord: Coordinator, device: tuple[str, Ed25519PrivateKey]
) -> None:
    headers = sign_request(device[1], device[0], "POST", PATH, b"{}")
    assert post(coord, headers, b'{"agent_version": "x"}').status_code == 401
    other = sign_request(Ed25519PrivateKey.generate(), device[0], "POST", PATH, b"{}")
    resp = post(coord, other)
    assert resp.status_code == 401 and "signature does not match" in resp.json()["detail"]


def test_revoked_device_gets_401(coord: Coordinator, device: tuple[str, Ed25519PrivateKey]) -> None:
    coord.api().json("POST", f"/v1/devices/{device[0]}/revoke")
    resp = post(coord, sign_request(device[1], device[0], "POST", PATH, b"{}"))
    assert resp.status_code == 401 and "revoked" in resp.json()["detail"]


def test_enrollment_token_is_one_time(coord: Coordinator) -> None:
    token = coord.api().json("POST", "/v1/enrollment-tokens", json={"count": 1})["tokens"][0]
    bodies = [
        {"token": token, "public_key": b64e(public_key_bytes(Ed25519PrivateKey.generate()))} for _ in range(2)
    ]
    assert httpx.post(coord.url + "/v1/enroll", json=bodies[0]).status_code == 200
    second = httpx.post(coord.url + "/v1/enroll", json=bodies[1])
    assert second.status_code == 401 and "already used" in second.json()["detail"]


def test_device_cannot_fetch_models_of_jobs_it_is_not_in(
    coord: Coordinator, device: tuple[str, Ed25519PrivateKey]
) -> None:
    path = "/v1/device/jobs/1/models/0"
    resp = httpx.get(coord.url + path, headers=sign_request(device[1], device[0], "GET", path, b""))
    assert resp.status_code == 403


def test_malformed_json_body_gets_422_not_500(
    coord: Coordinator, device: tuple[str, Ed25519PrivateKey]
) -> None:
    body = b'{"agent_version": 5'
    resp = post(coord, sign_request(device[1], device[0], "POST", PATH, body), body)
    assert resp.status_code == 422 and resp.json()["title"] == "Invalid input"


def test_metrics_and_openapi_are_served(coord: Coordinator, tmp_path: Path) -> None:
    assert "aicfl_http_requests_total" in httpx.get(coord.url + "/metrics").text
    assert httpx.get(coord.url + "/docs").status_code == 200
    paths = httpx.get(coord.url + "/openapi.json").json()["paths"]
    assert "/v1/jobs" in paths and "/v1/device/checkin" in paths


def test_body_is_read_as_json_only_after_its_signature_holds(
    coord: Coordinator, device: tuple[str, Ed25519PrivateKey]
) -> None:
    signed = sign_request(device[1], device[0], "POST", PATH, b"{}")
    resp = post(coord, signed, b'{"agent_version": 5')  # malformed, and not the body that was signed
    assert resp.status_code == 401 and "signature does not match" in resp.json()["detail"]


def test_request_refused_by_its_route_still_spends_its_nonce(
    coord: Coordinator, device: tuple[str, Ed25519PrivateKey]
) -> None:
    body = b'{"agent_version": 5'
    headers = sign_request(device[1], device[0], "POST", PATH, body)
    assert post(coord, headers, body).status_code == 422
    again = post(coord, headers, body)
    assert again.status_code == 401 and "replayed nonce" in again.json()["detail"]
