"""The HTTP client of the coordinator API for operators and the training cluster.

Problem details become one clear error line.
"""

from __future__ import annotations

import json
import re
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
        try:
            tls = verify_setting(verify) if isinstance(verify, str) else verify
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            raise CliError(f"CA bundle {verify}: {getattr(err, 'strerror', None) or err}") from None
        try:
            self._http = httpx.Client(base_url=self.url, headers=headers, verify=tls, timeout=timeout)
        except (httpx.InvalidURL, ValueError) as err:
            raise CliError(f"coordinator URL {url!r}: {err}") from None

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.ConnectError as err:
            raise CliError(f"cannot reach the coordinator at {self.url}: {err}", code=2) from None
        except httpx.HTTPError as err:
            raise CliError(f"request to {self.url}{path} failed: {err}", code=2) from None
        except httpx.InvalidURL as err:
            raise CliError(f"coordinator URL {self.url!r}: {err}") from None
        if resp.status_code >= 400:
            raise CliError(_problem_message(resp))
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.request(method, path, **kw)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:  # a proxy's page, or not a coordinator at this URL
            raise CliError(
                f"{self.url}{path} answered with {_kind(resp)}, not JSON: {one_line(resp)!r}"
                " (is the URL a coordinator's?)"
            ) from None

    def pages(self, path: str, **kw: Any) -> list[Any]:
        """Every item of a paged list: ``path``'s pages, following each answer's ``Link: rel="next"``
        (its query names the next page; the path stays ``path``)."""
        items: list[Any] = []
        params: Any = kw.pop("params", None)
        while True:
            resp = self.request("GET", path, params=params, **kw)
            try:
                page = resp.json()
            except ValueError:
                raise CliError(f"{self.url}{path} answered with {_kind(resp)}, not JSON") from None
            if not isinstance(page, list):
                raise CliError(f"{self.url}{path} answered with {type(page).__name__}, not a list")
            items.extend(page)
            nxt = resp.links.get("next", {}).get("url")
            if not nxt or not page:
                return items
            params = httpx.URL(nxt).params


def _problem_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("detail") or body.get("title")):
        detail = str(body.get("detail") or body.get("title"))
        if not isinstance(body.get("detail"), str) and body.get("detail"):  # FastAPI's validation list
            detail = json.dumps(body["detail"])[:300]
    else:
        detail = one_line(resp) or resp.reason_phrase
    if resp.status_code == 401 and "token" in detail:
        detail = f"{detail} (set AICFL_TOKEN or pass --token)"
    return f"{detail} (HTTP {resp.status_code})"


def _kind(resp: httpx.Response) -> str:
    content_type = resp.headers.get("content-type", "").split(";")[0].strip()
    return f"HTTP {resp.status_code} {content_type or 'without a content type'}"


def one_line(resp: httpx.Response, limit: int = 200) -> str:
    """An answer's text as one line: an HTML page's title (or its text without tags), spaces collapsed."""
    try:
        text = resp.text
    except (UnicodeDecodeError, LookupError):
        return f"{len(resp.content)} bytes"
    if "html" in resp.headers.get("content-type", "") or text.lstrip()[:1] == "<":
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = title.group(1) if title else re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
