"""Slow and vanishing clients at the coordinator's HTTP edge: a body must keep arriving.

A real coordinator process on loopback (tests/integration/harness.py) with a
2 s body-read timeout and one upload slot; raw sockets play the clients, so
that a body can be trickled a byte at a time or dropped halfway. A trickled
body is answered 408 and its connection closed (and its upload slot given back)
while honest requests are served; a client that leaves mid-body costs one log
line, no traceback and no database write; a check-in held longer than the
timeout (and the keep-alive) is not cut, since only the body is timed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.cli.server import SERVER_KEEPALIVE_SECONDS
from server.security import LARGE_UPLOAD_BYTES
from shared.signing import sign_request

from . import harness
from .harness import Coordinator, wait_for

pytestmark = pytest.mark.slow
TIMEOUT = 2.0  # AICFL_BODY_READ_TIMEOUT
UPLOAD = "/v1/device/rounds/1/masked_input"
SMALL = 1_000_000  # read at once, before the signature is checked (only its headers are, first)
LARGE = LARGE_UPLOAD_BYTES + 1  # read only by a known device, in one of the upload slots
Device = tuple[str, Ed25519PrivateKey]


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    with harness.running_coordinator(
        tmp_path_factory.mktemp("slow"), {"AICFL_BODY_READ_TIMEOUT": str(TIMEOUT), "AICFL_UPLOAD_SLOTS": "1"}
    ) as c:
        yield c


@pytest.fixture(scope="module")
def device(coord: Coordinator) -> Device:
    return harness.enroll_devices(coord, 1)[0]


def upload_headers(device: Device | None, body: bytes) -> dict[str, str]:
    signed = sign_request(device[1], device[0], "POST", UPLOAD, body) if device else {}
    return {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)), **signed}


def open_request(coord: Coordinator, headers: dict[str, str], first: bytes = b"") -> socket.socket:
    """A connection that has sent a device upload's headers and ``first`` bytes of its body."""
    sock = socket.create_connection(("127.0.0.1", coord.port), timeout=15)
    head = [f"POST {UPLOAD} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + first)
    return sock


class Trickle(threading.Thread):
    """Sends a byte of body every half second until stopped or the server closes the connection."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.sock.sendall(b"x")
            except OSError:
                return


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the call until the server closed the connection


def answer_then_close(sock: socket.socket) -> Answer:
    """What the server answers on ``sock``, read until it closes the connection (15 s at most)."""
    began = time.monotonic()
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with some of our bytes unread: a reset, after its answer
    except TimeoutError:
        raise AssertionError(f"the connection was still open after 15 s; received {data[:300]!r}") from None
    took = time.monotonic() - began
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body, took)


def answer_then_close_or_first(sock: socket.socket) -> Answer:
    """The server's first answer on ``sock``: its head and the body its Content-Length announces."""
    began = time.monotonic()
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    took = time.monotonic() - began
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, body, took)


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def assert_408(answer: Answer) -> None:
    assert answer.status == 408, answer
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["connection"] == "close"
    problem = json.loads(answer.body)
    assert problem["status"] == 408 and "AICFL_BODY_READ_TIMEOUT" in problem["detail"], problem


def test_a_trickled_upload_is_answered_408_and_closed_while_others_are_served(
    coord: Coordinator, device: Device
) -> None:
    sock = open_request(coord, upload_headers(device, b"\x00" * SMALL))
    trickle = Trickle(sock)
    began = time.monotonic()
    trickle.start()
    try:
        time.sleep(0.5)
        health = httpx.get(coord.url + "/v1/health", timeout=5)
        assert health.status_code == 200 and time.monotonic() - began < TIMEOUT
        answer = answer_then_close(sock)
    finally:
        trickle.stop.set()
        sock.close()
    assert_408(answer)
    assert TIMEOUT <= time.monotonic() - began < TIMEOUT + 3


def test_an_unsigned_upload_is_refused_401_before_its_body_is_awaited(coord: Coordinator) -> None:
    # A slowloris without signing headers holds nothing: the free header checks come before the body.
    sock = open_request(coord, upload_headers(None, b"\x00" * SMALL), b"x")
    trickle = Trickle(sock)
    trickle.start()
    try:
        answer = answer_then_close_or_first(sock)
    finally:
        trickle.stop.set()
        sock.close()
    assert answer.status == 401, answer
    assert "missing" in json.loads(answer.body)["detail"], answer
    assert answer.seconds < TIMEOUT / 2, answer


def test_a_trickled_large_upload_gives_its_upload_slot_back(coord: Coordinator, device: Device) -> None:
    # The coordinator has one slot: while the trickled upload holds it, no other large upload is read.
    body = b"\x00" * LARGE
    sock = open_request(coord, upload_headers(device, body), body[:1000])
    trickle = Trickle(sock)
    trickle.start()
    try:
        answer = answer_then_close(sock)
    finally:
        trickle.stop.set()
        sock.close()
    assert_408(answer)
    resp = httpx.post(coord.url + UPLOAD, content=body, headers=upload_headers(device, body), timeout=10)
    assert resp.status_code == 404, resp.text  # read and authenticated: there is no round 1


def test_a_client_that_leaves_mid_upload_costs_one_line_and_no_traceback(
    coord: Coordinator, device: Device
) -> None:
    logged = coord.log.stat().st_size
    body = b"\x00" * LARGE
    headers = upload_headers(device, body)
    for sent in (upload_headers(device, body[:SMALL]), headers):
        sock = open_request(coord, sent, body[:1000])
        time.sleep(0.2)
        sock.close()

    def lines() -> list[str]:
        with open(coord.log, "rb") as fh:
            fh.seek(logged)
            return fh.read().decode("utf-8", "replace").splitlines()

    wait_for(lambda: sum("closed the connection" in line for line in lines()) == 2, 10, "two log lines")
    assert httpx.get(coord.url + "/v1/health", timeout=5).status_code == 200
    assert not [line for line in lines() if "Traceback" in line or "ERROR" in line], lines()
    # Nothing was written for the upload that was cut off: its signed headers (their nonce) are still
    # unused, so the whole request sent again with them passes the signature check.
    resp = httpx.post(coord.url + UPLOAD, content=body, headers=headers, timeout=10)
    assert resp.status_code == 404, resp.text  # not 401 (a replayed nonce): there is no round 1


def test_a_check_in_held_longer_than_the_timeouts_is_answered(coord: Coordinator, device: Device) -> None:
    # Only the body is timed: a long poll holds its answer, not its body, past the body-read timeout,
    # and past the server's keep-alive (its timer starts only once a response is complete).
    path = "/v1/device/checkin"
    wait = SERVER_KEEPALIVE_SECONDS + 1.5
    body = json.dumps({"wait": wait}).encode()
    headers = {**sign_request(device[1], device[0], "POST", path, body), "Content-Type": "application/json"}
    began = time.monotonic()
    resp = httpx.post(coord.url + path, content=body, headers=headers, timeout=wait + 10)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - began > max(TIMEOUT, SERVER_KEEPALIVE_SECONDS)
