"""Bad input sent to a coordinator during a loaded round: what it answered, and its memory meanwhile.

``loadtests/run.py --abuse`` calls :func:`abuse` once the first training round
is running. At the same time, from this process (threads, raw sockets and
``urllib``, nothing of locust):

- **slow clients** (slowloris): connections that send a device request's
  headers with a large ``Content-Length``, then trickle the body a byte at a
  time; each must end in a 4xx or a closed connection, not hold on for ever;
- an **enrollment burst**: enrollments with made-up tokens, as fast as they go;
- **oversized bodies**: a masked input declared above the upload limit, a
  check-in above the JSON limit, and one that lies about its size (sends more
  than declared is not possible over HTTP/1.1; it sends a large chunked body);
- **replayed requests**: a signed check-in sent twice with the same nonce, and
  the same signature over a different body.

The replay needs an enrolled device: one is enrolled for it (with a fresh
token) and revoked at the end, so that no later round selects it.

Every answer must be a 4xx or a closed connection (``all_refused``); the
coordinator's peak RSS (``VmHWM``) is sampled while it lasts.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.coordinator_process import status_mb
from shared.signing import b64e, public_key_bytes, sign_request

SLOW_CLIENTS = 50
SLOW_SECONDS = 30.0
BURST = 200


def _request(
    base: str, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float = 30
) -> int | str:
    """The status code of one request, or how the connection ended."""
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.read()
        return int(err.code)
    except (OSError, urllib.error.URLError) as err:
        return f"closed: {type(err).__name__}"


def _slow_client(host: str, port: int, path: str, results: list[int | str]) -> None:
    """Headers of a 1 MB body, then a byte a second until the server answers or closes."""
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as err:
        results.append(f"closed: {type(err).__name__}")
        return
    sock.settimeout(1.0)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: 1000000\r\nX-Aicfl-Device: nobody\r\n\r\n"
    )
    outcome: int | str = "held open"
    end = time.monotonic() + SLOW_SECONDS
    try:
        sock.sendall(head.encode())
        while time.monotonic() < end:
            try:
                sock.sendall(b"x")
            except OSError as err:
                outcome = f"closed: {type(err).__name__}"
                break
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError as err:
                outcome = f"closed: {type(err).__name__}"
                break
            if not data:
                outcome = "closed: EOF"
                break
            first = data.split(b"\r\n", 1)[0].split()
            outcome = int(first[1]) if len(first) > 1 and first[1].isdigit() else f"answered: {first!r}"
            break
    finally:
        sock.close()
    results.append(outcome)


def _chunked_flood(host: str, port: int, path: str, megabytes: int) -> int | str:
    """A chunked body of ``megabytes`` MB to a JSON endpoint (no Content-Length to refuse it by)."""
    try:
        sock = socket.create_connection((host, port), timeout=30)
    except OSError as err:
        return f"closed: {type(err).__name__}"
    chunk = b"a" * (1 << 20)
    try:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for _ in range(megabytes):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        data = sock.recv(4096)
    except OSError as err:
        return f"closed: {type(err).__name__}"
    finally:
        sock.close()
    first = data.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else "closed: EOF"


def _refused(outcome: int | str) -> bool:
    return (isinstance(outcome, int) and 400 <= outcome < 500) or (
        isinstance(outcome, str) and outcome.startswith("closed")
    )


def abuse(base: str, admin: str, server_pid: int, job_id: int) -> dict[str, Any]:
    """Send the bad input at ``base`` during a running round; what came back and the peak RSS."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    rss_before = status_mb(server_pid, "VmRSS")
    peak = {"rss_mb": rss_before or 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = status_mb(server_pid, "VmRSS")
            if rss:
                peak["rss_mb"] = max(peak["rss_mb"], rss)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: dict[str, list[int | str]] = {"slowloris": []}
    rid_path = "/v1/device/rounds/1/masked_input"
    slow = [
        threading.Thread(target=_slow_client, args=(host, port, rid_path, results["slowloris"]), daemon=True)
        for _ in range(SLOW_CLIENTS)
    ]
    for th in slow:
        th.start()
    started = time.monotonic()

    # An enrollment burst with made-up tokens.
    key = Ed25519PrivateKey.generate()
    pk = b64e(public_key_bytes(key))
    results["enroll_burst"] = [
        _request(
            base,
            "POST",
            "/v1/enroll",
            json.dumps({"token": os.urandom(16).hex(), "public_key": pk}).encode(),
            {"Content-Type": "application/json"},
        )
        for _ in range(BURST)
    ]

    # Oversized: declared over the upload limit; a JSON body over its limit; a chunked body over it.
    big = str(600 * 1024 * 1024)
    results["oversized"] = [
        _request(
            base,
            "POST",
            rid_path,
            b"x" * 1024,
            {"Content-Type": "application/octet-stream", "Content-Length": big},
            timeout=10,
        ),
        _request(
            base,
            "POST",
            "/v1/device/checkin",
            b"{" + b" " * (2 << 20) + b"}",
            {"Content-Type": "application/json"},
        ),
        _chunked_flood(host, port, "/v1/device/checkin", 8),
        _chunked_flood(host, port, "/v1/enroll", 8),
    ]

    # Replays: an enrolled device's signed check-in twice; its signature over another body.
    token = _admin(base, admin, "POST", "/v1/enrollment-tokens", {"count": 1, "ttl_seconds": 600})["tokens"][
        0
    ]
    device = _admin(
        base, None, "POST", "/v1/enroll", {"token": token, "public_key": pk, "name": "loadtest-replayer"}
    )
    device_id = device["device_id"]
    body = json.dumps({"agent_version": "replay"}).encode()
    headers = sign_request(key, device_id, "POST", url.path.rstrip("/") + "/v1/device/checkin", body)
    headers["Content-Type"] = "application/json"
    first = _request(base, "POST", "/v1/device/checkin", body, headers)
    results["replay"] = [
        _request(base, "POST", "/v1/device/checkin", body, headers),
        _request(
            base, "POST", "/v1/device/checkin", json.dumps({"agent_version": "tampered"}).encode(), headers
        ),
    ]
    _admin(base, admin, "POST", f"/v1/devices/{device_id}/revoke", None)

    for th in slow:
        th.join(timeout=SLOW_SECONDS + 10)
    done.set()
    sampler.join(timeout=2)

    def tally(outcomes: list[int | str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[str(o)] = counts.get(str(o), 0) + 1
        return counts

    return {
        "seconds": round(time.monotonic() - started, 1),
        "slowloris": tally(results["slowloris"]),
        "enroll_burst": tally(results["enroll_burst"]),
        "oversized": [str(o) for o in results["oversized"]],
        "replay_first_checkin": first,
        "replay": [str(o) for o in results["replay"]],
        "all_refused": all(_refused(o) for group in results.values() for o in group) and first == 200,
        "rss_before_mb": rss_before,
        "peak_rss_during_mb": peak["rss_mb"],
        "peak_rss_hwm_mb": status_mb(server_pid, "VmHWM"),
        "job_id": job_id,
    }


def _admin(base: str, token: str | None, method: str, path: str, payload: Any) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())
