"""HTTP to the coordinator, every request signed with the device's identity key."""

from __future__ import annotations

import json
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
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> httpx.Response:
        headers = sign_request(self.key, self.device_id, method, path, body)
        if body:
            headers["Content-Type"] = content_type
        try:
            resp = self._http.request(method, path, content=body, headers=headers)
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

    def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        return self.request("POST", path, json.dumps(payload).encode()).json()
