"""HTTP to the coordinator, every request signed with the device's identity key."""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.signing import sign_request
from shared.tls import verify_setting


class CoordinatorError(Exception):
    """The coordinator refused a request (4xx): retrying the same request will not help."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail


class TransientError(Exception):
    """The coordinator could not be reached or failed (5xx): back off and retry."""


KEEPALIVE_SECONDS = 2.0


class SignedClient:
    def __init__(
        self,
        base_url: str,
        device_id: str,
        key: Ed25519PrivateKey,
        verify: str | bool = True,
        timeout: float = 120.0,
    ):
        self.device_id = device_id
        self.key = key
        tls = verify_setting(verify) if isinstance(verify, str) else verify
        # Idle connections are dropped after 2 s, well before the coordinator's (uvicorn's 5 s
        # keep-alive): a request sent on a connection the server is closing is lost.
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            verify=tls,
            timeout=timeout,
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS),
        )

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send a signed request; ``timeout``: seconds to wait for each read (a held answer), when longer
        than the client's."""
        headers = sign_request(self.key, self.device_id, method, path, body)
        if body:
            headers["Content-Type"] = content_type
        extra: dict[str, Any] = {}
        if timeout is not None:
            base = self._http.timeout
            extra["timeout"] = httpx.Timeout(
                base.connect,
                read=max(timeout, base.read or 0.0),
                write=max(timeout, base.write or 0.0),
                pool=max(timeout, base.pool or 0.0),
            )
        try:
            resp = self._http.request(method, path, content=body, headers=headers, **extra)
        except httpx.HTTPError as err:
            raise TransientError(f"{method} {path}: {err}") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientError(f"{method} {path}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise CoordinatorError(resp.status_code, str(detail))
        return resp

    def post_json(self, path: str, payload: dict[str, Any], timeout: float | None = None) -> Any:
        return self.request("POST", path, json.dumps(payload).encode(), timeout=timeout).json()


ENROLL_ATTEMPTS = 4
MAX_ENROLL_WAIT_SECONDS = 120.0


def _retry_after(resp: httpx.Response) -> float:
    try:
        seconds = float(resp.headers.get("retry-after", ""))
    except ValueError:
        seconds = 10.0  # a Retry-After in HTTP-date form, or none: a guess that eases off
    return min(max(seconds, 1.0), MAX_ENROLL_WAIT_SECONDS)


def post_enrollment(
    url: str,
    body: dict[str, Any],
    *,
    verify: ssl.SSLContext | str | bool,
    timeout: float = 30.0,
    attempts: int = ENROLL_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """POST the enrollment request to ``url`` (…/v1/enroll), waiting out the coordinator's rate limit.

    A 429 (too many enrollments from this address) is retried after its
    Retry-After, up to ``attempts`` tries in all, saying so on stderr; the last
    answer is returned whatever it is. Network errors propagate as httpx errors.
    """
    for attempt in range(1, attempts + 1):
        resp = httpx.post(url, json=body, timeout=timeout, verify=verify)
        if resp.status_code != 429 or attempt == attempts:
            return resp
        wait = _retry_after(resp)
        print(
            f"the coordinator is limiting enrollments from this address; retrying in {wait:.0f} s"
            f" (attempt {attempt + 1} of {attempts})",
            file=sys.stderr,
        )
        sleep(wait)
    raise AssertionError("unreachable")  # the loop returns on its last attempt
