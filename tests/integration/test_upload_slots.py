"""Large device uploads wait for an upload slot before their body is read; small requests never do.

A real uvicorn server on loopback in this process (so the engine's masked-input
handler can be held open: the engine is not what this test is about), real
signed requests from an enrolled device.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import auth
from server.app import create_app
from server.security import LARGE_UPLOAD_BYTES
from server.settings import ServerSettings
from shared.signing import b64e, public_key_bytes, sign_request

SLOTS = 2
UPLOADS = 6
BODY = b"\x00" * (LARGE_UPLOAD_BYTES + 1)


class Held:
    """Stands in for the engine's masked-input handler: counts the bodies it holds at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.done = 0
        self.release = threading.Event()

    def __call__(self, device_id: str, round_id: int, body: bytes) -> None:
        assert len(body) == len(BODY)
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        self.release.wait(30)
        with self.lock:
            self.inside -= 1
            self.done += 1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Any, Held]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(ServerSettings(data_dir=tmp_path, port=port, upload_slots=SLOTS), run_ticker=False)
    held = Held()
    app.state.federation.devices.masked_input = held
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield url, app.state.federation, held
    finally:
        held.release.set()
        srv.should_exit = True
        thread.join(10)


def enroll(url: str, fed: Any) -> tuple[str, Ed25519PrivateKey]:
    with fed.write() as s:
        token = auth.create_enrollment_tokens(s, 1, 60, "test")[0]
    key = Ed25519PrivateKey.generate()
    resp = httpx.post(url + "/v1/enroll", json={"token": token, "public_key": b64e(public_key_bytes(key))})
    assert resp.status_code == 200, resp.text
    return resp.json()["device_id"], key


def signed_post(url: str, device: tuple[str, Ed25519PrivateKey], path: str, body: bytes, kind: str) -> int:
    headers = sign_request(device[1], device[0], "POST", path, body)
    resp = httpx.post(url + path, content=body, headers={**headers, "Content-Type": kind}, timeout=20)
    return resp.status_code


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_large_uploads_take_turns_and_small_requests_pass_them(server: tuple[str, Any, Held]) -> None:
    url, fed, held = server
    device = enroll(url, fed)
    path = "/v1/device/rounds/1/masked_input"
    with ThreadPoolExecutor(UPLOADS) as pool:
        uploads = [
            pool.submit(signed_post, url, device, path, BODY, "application/octet-stream")
            for _ in range(UPLOADS)
        ]
        wait_until(lambda: held.inside >= SLOTS, "the first uploads never reached the handler")
        time.sleep(0.3)  # room for any upload that should not get in
        assert held.most == SLOTS, f"{held.most} bodies were held at once with {SLOTS} slots"
        # A check-in is small: it does not queue behind the uploads.
        assert signed_post(url, device, "/v1/device/checkin", b"{}", "application/json") == 200
        held.release.set()
        assert [u.result() for u in uploads] == [200] * UPLOADS
    assert held.done == UPLOADS and held.most == SLOTS


def test_a_refused_upload_gives_its_slot_back(server: tuple[str, Any, Held]) -> None:
    """Uploads that fail authentication or the size check must not leak slots."""
    url, fed, held = server
    device = enroll(url, fed)
    path = "/v1/device/rounds/1/masked_input"
    forged = sign_request(device[1], device[0], "POST", path, b"something else")
    for _ in range(SLOTS + 1):
        resp = httpx.post(
            url + path, content=BODY, headers={**forged, "Content-Type": "application/octet-stream"}
        )
        assert resp.status_code == 401
    held.release.set()
    with ThreadPoolExecutor(SLOTS) as pool:
        results = list(
            pool.map(lambda _: signed_post(url, device, path, BODY, "application/octet-stream"), range(SLOTS))
        )
    assert results == [200] * SLOTS and held.done == SLOTS


def test_an_upload_held_for_its_next_task_has_given_its_slot_back(server: tuple[str, Any, Held]) -> None:
    """A masked input sent with ?wait is held for the device's next task after its body is taken; the
    slot is free by then, so the other uploads do not queue behind the holds."""
    url, fed, held = server
    device = enroll(url, fed)
    path = "/v1/device/rounds/1/masked_input?wait=4"
    held.release.set()  # the handler takes each body at once
    started = time.monotonic()
    with ThreadPoolExecutor(UPLOADS) as pool:
        uploads = [pool.submit(held_post, url, device, path) for _ in range(UPLOADS)]
        wait_until(lambda: held.done == UPLOADS, "the uploads queued behind the held answers")
        taken = time.monotonic() - started
        assert not any(u.done() for u in uploads), "an answer was not held"
        answers = [u.result() for u in uploads]
    assert taken < 3.0, f"every body was taken only after {taken:.1f} s: slots were held through the holds"
    for status, answer in answers:
        assert status == 200
        assert answer["next"] == {"retry_after": 0.0, "task": None}  # nothing to do: come back at once


def held_post(url: str, device: tuple[str, Ed25519PrivateKey], path: str) -> tuple[int, Any]:
    headers = sign_request(device[1], device[0], "POST", path, BODY)
    resp = httpx.post(
        url + path, content=BODY, headers={**headers, "Content-Type": "application/octet-stream"}, timeout=20
    )
    return resp.status_code, resp.json()
