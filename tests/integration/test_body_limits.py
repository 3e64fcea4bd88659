"""Bodies are limited before they are read, and credentials are checked before any large body is.

A real coordinator process on loopback (tests/integration/harness.py); 600 MiB
bodies are streamed to it from generators, so this test holds 1 MiB at a time,
while the coordinator's resident memory is sampled: it must stay within 50 MB
of its idle level. The enrollment rate limit is checked on the same server
(loopback is not exempt there) and in process with a fake client address.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from client_agent.transport import post_enrollment
from coordinator import auth
from server.app import create_app
from server.limits import TokenBuckets, route_limit
from server.settings import ServerSettings
from shared.signing import b64e, public_key_bytes

from . import harness
from .harness import Coordinator

MiB = 1024 * 1024
HUGE = 600 * MiB
RSS_SLACK = 50 * 1000 * 1000
ENROLL_RATE = 20  # a minute: one every 3 s, in bursts of up to 20
PROBLEM = "application/problem+json"


@dataclass
class Stream:
    """A body of ``total`` bytes made 1 MiB at a time; ``sent`` counts what the client handed over."""

    total: int
    sent: int = 0
    chunk: bytes = field(default=b"\x00" * MiB, repr=False)

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            piece = self.chunk[: min(MiB, self.total - self.sent)]
            self.sent += len(piece)
            yield piece


class PeakRss:
    """The highest resident set size of a process, sampled every 10 ms while in the ``with`` block."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    with harness.running_coordinator(
        tmp_path_factory.mktemp("limits"),
        {"AICFL_ENROLL_UNLIMITED_NETWORKS": "[]", "AICFL_ENROLL_RATE_PER_MINUTE": str(ENROLL_RATE)},
    ) as c:
        yield c


def send(c: Coordinator, method: str, path: str, body: Stream, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=c.url, timeout=120) as client:
        return client.request(method, path, content=body, headers=headers)


def problem(resp: httpx.Response) -> dict[str, object]:
    assert resp.headers["content-type"].startswith(PROBLEM), resp.text[:300]
    body = resp.json()
    assert isinstance(body, dict)
    return body


def idle_rss(c: Coordinator) -> int:
    """The server's resident memory once it has answered a request of each kind these tests send."""
    assert c.proc is not None
    httpx.get(c.url + "/v1/health")
    httpx.post(c.url + "/v1/operators", json={"name": "x"})
    httpx.post(c.url + "/v1/enroll", content=b"{}")
    time.sleep(0.3)
    return int(psutil.Process(c.proc.pid).memory_info().rss)


# (method, path, whether the Content-Length is declared, whether the admin token is sent, statuses allowed)
HUGE_CASES = [
    ("POST", "/v1/operators", False, False, {401}),
    ("POST", "/v1/operators", True, False, {401, 413}),
    ("PUT", "/v1/jobs/1/models/0", False, False, {401}),
    ("PUT", "/v1/jobs/1/reference", True, True, {413}),
    ("POST", "/v1/enroll", False, False, {413}),
    ("POST", "/v1/enroll", True, False, {413}),
    ("POST", "/v1/device/rounds/1/masked_input", True, False, {413}),
]


def test_600_mib_bodies_are_refused_while_the_server_memory_stays_flat(server: Coordinator) -> None:
    assert server.proc is not None
    idle = idle_rss(server)
    figures = []
    for method, path, declared, token, allowed in HUGE_CASES:
        body = Stream(HUGE)
        headers = {"Content-Type": "application/json"}
        if declared:
            headers["Content-Length"] = str(HUGE)
        if token:
            headers["Authorization"] = f"Bearer {server.token}"
        with PeakRss(server.proc.pid) as rss:
            t0 = time.perf_counter()
            resp = send(server, method, path, body, headers)
            took = time.perf_counter() - t0
        case = f"{method} {path} ({'Content-Length' if declared else 'chunked'})"
        assert resp.status_code in allowed, (case, resp.status_code, resp.text[:300])
        assert problem(resp)["status"] == resp.status_code
        assert rss.peak - idle < RSS_SLACK, f"{case}: RSS grew by {(rss.peak - idle) / 1e6:.0f} MB"
        figures.append(
            f"{case}: {resp.status_code} in {took:.2f} s after {body.sent / MiB:.0f} MiB sent;"
            f" RSS idle {idle / 1e6:.0f} MB, peak {rss.peak / 1e6:.0f} MB"
        )
    # Printed for BENCHMARKS.md (pytest -s shows them).
    print("\n" + "\n".join(figures))


def test_operator_body_is_refused_before_it_is_read_without_a_valid_token(server: Coordinator) -> None:
    for headers, detail in [
        ({}, "missing operator token: send 'Authorization: Bearer <token>'"),
        ({"Authorization": "Bearer aicfl_op_forged"}, "operator token is not valid"),
    ]:
        body = Stream(64 * MiB)
        resp = send(server, "PUT", "/v1/jobs/1/models/0", body, headers)
        assert resp.status_code == 401 and problem(resp)["detail"] == detail
        assert resp.headers["www-authenticate"] == "Bearer"
        # The server answered without reading: the client only filled the socket buffers.
        assert body.sent < 48 * MiB, body.sent


@pytest.mark.parametrize(
    ("method", "path", "size", "token", "setting"),
    [
        ("POST", "/v1/enrollment-tokens", 2 * MiB, True, "AICFL_MAX_JSON_BYTES"),
        ("PUT", "/v1/audits/1/report", 17 * MiB, True, "AICFL_MAX_AUDIT_REPORT_BYTES"),
        ("POST", "/v1/enroll", 20 * 1024, False, "AICFL_MAX_ENROLL_BYTES"),
        ("POST", "/ui/login", 9 * 1024, False, "AICFL_MAX_FORM_BYTES"),
    ],
)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_its_route_limit_gets_413_naming_the_limit(
    server: Coordinator, method: str, path: str, size: int, token: bool, setting: str, declared: bool
) -> None:
    headers = {"Authorization": f"Bearer {server.token}"} if token else {}
    if declared:
        headers["Content-Length"] = str(size)
    resp = send(server, method, path, Stream(size), headers)
    assert resp.status_code == 413
    detail = str(problem(resp)["detail"])
    assert setting in detail and "-byte limit" in detail, detail


def test_bodies_within_their_limits_still_reach_the_routes(server: Coordinator) -> None:
    admin = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    body = json.dumps({"count": 1, "ttl_seconds": 60}).encode()
    declared = httpx.post(server.url + "/v1/enrollment-tokens", content=body, headers=admin)
    assert declared.status_code == 201, declared.text
    chunked = httpx.post(
        server.url + "/v1/enrollment-tokens", content=iter([body[:5], body[5:]]), headers=admin
    )
    assert chunked.status_code == 201, chunked.text


def test_enrollment_rate_is_limited_per_address_and_the_agent_waits_it_out(server: Coordinator) -> None:
    key = b64e(public_key_bytes(Ed25519PrivateKey.generate()))
    attempt = {"token": "aicfl_enr_nothing", "public_key": key, "name": "d", "platform": "p"}
    token = server.api().json("POST", "/v1/enrollment-tokens", json={"count": 1})["tokens"][0]

    def drain(client: httpx.Client) -> httpx.Response:
        """Bad attempts until the address's bucket is empty (however slowly this machine sends them)."""
        for _ in range(3 * ENROLL_RATE):
            resp = client.post("/v1/enroll", json=attempt)
            assert resp.status_code in (401, 429), (
                resp.text
            )  # a bad token, or refused before it was looked at
            if resp.status_code == 429:
                return resp
        raise AssertionError(f"{3 * ENROLL_RATE} attempts were never refused")

    with httpx.Client(base_url=server.url) as client:
        refused = drain(client)
    assert 1 <= int(refused.headers["retry-after"]) <= 60 // ENROLL_RATE
    assert "AICFL_ENROLL_RATE_PER_MINUTE" in str(problem(refused)["detail"])

    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    with httpx.Client(base_url=server.url) as client:
        drain(client)  # empty again, right before the agent tries
    resp = post_enrollment(server.url + "/v1/enroll", {**attempt, "token": token}, verify=True, sleep=sleep)
    assert resp.status_code == 200, resp.text
    # The bucket was empty: the agent waited out the Retry-After it was given, then a token had come back.
    assert waits and all(1 <= w <= 60 // ENROLL_RATE for w in waits), waits


def test_token_buckets_allow_a_burst_then_one_per_interval() -> None:
    now = [0.0]
    buckets = TokenBuckets(6, clock=lambda: now[0])  # 6 a minute: one every 10 s
    assert [buckets.take("10.0.0.1") for _ in range(6)] == [0.0] * 6
    assert buckets.take("10.0.0.1") == pytest.approx(10.0)
    assert buckets.take("10.0.0.2") == 0.0  # each address has its own bucket
    now[0] = 10.0
    assert buckets.take("10.0.0.1") == 0.0
    assert buckets.take("10.0.0.1") == pytest.approx(10.0)


def test_token_buckets_forget_idle_addresses_past_their_bound() -> None:
    now = [0.0]
    buckets = TokenBuckets(60, max_keys=100, clock=lambda: now[0])
    for i in range(1000):
        buckets.take(f"10.0.{i // 256}.{i % 256}")
        now[0] += 0.001
    assert len(buckets._buckets) <= 100


def test_enrollment_limit_spares_listed_networks_only(tmp_path: Path) -> None:
    settings = ServerSettings(
        data_dir=tmp_path, enroll_rate_per_minute=2, enroll_unlimited_networks=["10.1.0.0/16"]
    )
    app = create_app(settings, run_ticker=False)
    with app.state.federation.write() as s:
        auth.bootstrap_admin(s)
    body = {"token": "aicfl_enr_nothing", "public_key": b64e(public_key_bytes(Ed25519PrivateKey.generate()))}
    with TestClient(app, client=("203.0.113.7", 4000)) as outside:
        assert [outside.post("/v1/enroll", json=body).status_code for _ in range(3)] == [401, 401, 429]
        limited = outside.post("/v1/enroll", json=body)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) == 30
    with TestClient(app, client=("10.1.2.3", 4000)) as inside:
        assert {inside.post("/v1/enroll", json=body).status_code for _ in range(5)} == {401}


@pytest.mark.parametrize(
    ("method", "path", "setting", "operator"),
    [
        ("POST", "/v1/device/rounds/7/input", "max_body_bytes", False),
        ("POST", "/v1/device/rounds/7/masked_input", "max_body_bytes", False),
        ("POST", "/v1/device/rounds/7/share_keys", "max_json_bytes", False),
        ("POST", "/v1/device/checkin", "max_json_bytes", False),
        ("POST", "/v1/enroll", "max_enroll_bytes", False),
        ("PUT", "/v1/jobs/3/models/0", "max_body_bytes", True),
        ("PUT", "/v1/jobs/3/reference", "max_body_bytes", True),
        ("PUT", "/v1/audits/9/report", "max_audit_report_bytes", True),
        ("PUT", "/v1/jobs/3/baseline", "max_audit_report_bytes", True),
        ("POST", "/v1/jobs", "max_json_bytes", True),
        ("POST", "/v1/operators", "max_json_bytes", True),
        ("GET", "/v1/jobs", "max_json_bytes", False),
        ("POST", "/ui/login", "max_form_bytes", False),
    ],
)
def test_each_route_falls_under_its_class(method: str, path: str, setting: str, operator: bool) -> None:
    limit = route_limit(method, path, ServerSettings())
    assert (limit.setting, limit.operator) == (setting, operator)
    assert limit.max_bytes == getattr(ServerSettings(), setting)
