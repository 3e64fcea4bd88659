"""The HTTP client of the coordinator API for operators and the training cluster.

Problem details become one clear error line.
"""

from __future__ import annotations

from typing import Any

import httpx

from shared.tls import verify_setting


class CliError(Exception):
    """An error to print as one line, exiting non-zero."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class ApiClient:
    def __init__(self, url: str, token: str | None, verify: str | bool = True, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        tls = verify_setting(verify) if isinstance(verify, str) else verify
        self._http = httpx.Client(base_url=self.url, headers=headers, verify=tls, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.ConnectError as err:
            raise CliError(f"cannot reach the coordinator at {self.url}: {err}", code=2) from None
        except httpx.HTTPError as err:
            raise CliError(f"request to {self.url}{path} failed: {err}", code=2) from None
        if resp.status_code >= 400:
            raise CliError(_problem_message(resp))
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.request(method, path, **kw)
        return resp.json() if resp.content else None


def _problem_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("title")
    except ValueError:
        detail = resp.text[:300] or resp.reason_phrase
    if resp.status_code == 401 and "token" in str(detail):
        detail = f"{detail} (set AICFL_TOKEN or pass --token)"
    return f"{detail} (HTTP {resp.status_code})"
