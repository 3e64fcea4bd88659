"""Locust load test of the aicfl coordinator: devices checking in, operators looking on.

``DeviceUser`` behaves like an idle edge agent: it makes a fresh Ed25519
identity key, enrolls once with a one-time token (``POST /v1/enroll``), then
sends signed check-ins (``POST /v1/device/checkin``) at the pace the
coordinator asks for (``retry_after``), as ``aicfl-agent run`` does. It never
takes part in a round: point it at a coordinator with no running job, or its
devices get selected and then dropped at the first deadline.

``OperatorUser`` lists jobs and devices with a bearer token, as the operator
CLI and dashboards do.

Environment:

``AICFL_LOAD_TOKENS``
    a file of enrollment tokens, one a line (``aicfl devices token --count N``).
    In a distributed run give each worker its own file: a token works once.
``AICFL_TOKEN``
    an operator token. ``OperatorUser`` needs it (viewer is enough); with the
    admin role, ``DeviceUser`` also makes enrollment tokens through the API
    when the file is missing or used up.
``AICFL_LOAD_CHECKIN_INTERVAL``
    seconds between check-ins; default: the coordinator's ``retry_after``.

Run it through ``loadtests/run.py`` (which starts a coordinator on loopback),
or by hand: ``locust -f loadtests/locustfile.py --host http://127.0.0.1:8080``.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from locust import FastHttpUser, between, task
from locust.contrib.fasthttp import FastHttpSession
from locust.exception import StopUser

# The wire schemas and the request signing come from this checkout's shared/,
# so that the load test speaks exactly the protocol the agent speaks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.signing import b64e, public_key_bytes, sign_request  # noqa: E402
from shared.wire import CheckinRequest, CheckinResponse, EnrollRequest, EnrollResponse  # noqa: E402

log = logging.getLogger("aicfl.loadtest")

TOKEN_BATCH = 100
MAX_RETRY_AFTER = 60.0
JSON = {"Content-Type": "application/json"}


def _detail(resp: object) -> str:
    """The problem-details message of an error response, or its status."""
    status = getattr(resp, "status_code", 0)
    if not status:
        return f"no response: {getattr(resp, 'error', None) or 'connection failed'}"
    try:
        detail = resp.json().get("detail")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any unreadable body: fall back to the status
        detail = None
    return f"HTTP {status}: {detail}" if detail else f"HTTP {status}"


def _operator_token() -> str | None:
    return os.environ.get("AICFL_TOKEN") or None


class TokenPool:
    """One-time enrollment tokens: from the AICFL_LOAD_TOKENS file, then from the API."""

    def __init__(self) -> None:
        self._tokens: deque[str] | None = None
        # Under locust this is a gevent lock (monkey-patched): one greenlet refills at a time.
        self._lock = threading.Lock()

    def _load_file(self) -> deque[str]:
        path = os.environ.get("AICFL_LOAD_TOKENS")
        if not path:
            return deque()
        lines = Path(path).read_text().splitlines()
        return deque(t.strip() for t in lines if t.strip())

    def take(self, client: FastHttpSession) -> str:
        """A token nobody has used yet; raises StopUser when there is none to be had."""
        with self._lock:
            if self._tokens is None:
                self._tokens = self._load_file()
            if not self._tokens:
                self._refill(client)
            return self._tokens.popleft()

    def _refill(self, client: FastHttpSession) -> None:
        admin = _operator_token()
        if admin is None:
            log.error(
                "no enrollment token left: set AICFL_LOAD_TOKENS to a file of tokens, or AICFL_TOKEN to an admin token"
            )
            raise StopUser()
        with client.post(
            "/v1/enrollment-tokens",
            json={"count": TOKEN_BATCH, "ttl_seconds": 3600},
            headers={"Authorization": f"Bearer {admin}"},
            name="[setup] /v1/enrollment-tokens",
            catch_response=True,
        ) as resp:
            if resp.status_code != 201:
                resp.failure(_detail(resp))
                raise StopUser()
            assert self._tokens is not None
            self._tokens.extend(resp.json()["tokens"])


TOKENS = TokenPool()
_serial = itertools.count(1)


class DeviceUser(FastHttpUser):
    """An enrolled, idle edge device: one enrollment, then signed check-ins."""

    weight = 10

    def wait_time(self) -> float:
        return self.pace

    def on_start(self) -> None:
        fixed = os.environ.get("AICFL_LOAD_CHECKIN_INTERVAL")
        self.fixed_pace = float(fixed) if fixed else None
        self.pace = self.fixed_pace if self.fixed_pace is not None else 2.0
        # The coordinator checks the signature over the path it receives, so a
        # host URL with a path prefix (behind a proxy) is part of what we sign.
        self.prefix = urlsplit(self.host or "").path.rstrip("/")
        self.key = Ed25519PrivateKey.generate()
        self.warned_task = False
        body = (
            EnrollRequest(
                token=TOKENS.take(self.client),
                public_key=b64e(public_key_bytes(self.key)),
                name=f"locust-device-{next(_serial)}",
                platform="locust",
            )
            .model_dump_json()
            .encode()
        )
        # Bodies go as bytes, the exact bytes hashed and signed (locust's type hint
        # says str; its docs and geventhttpclient take bytes).
        with self.client.post("/v1/enroll", data=body, headers=JSON, catch_response=True) as resp:  # type: ignore[arg-type]
            if resp.status_code != 200:
                resp.failure(_detail(resp))
                enrolled = None
            else:
                enrolled = EnrollResponse.model_validate_json(resp.content)
        if enrolled is None:
            raise StopUser()
        self.device_id = enrolled.device_id

    @task
    def checkin(self) -> None:
        path = "/v1/device/checkin"
        body = CheckinRequest(agent_version="locust", platform="locust").model_dump_json().encode()
        headers = sign_request(self.key, self.device_id, "POST", self.prefix + path, body)
        headers.update(JSON)
        with self.client.post(path, data=body, headers=headers, catch_response=True) as resp:  # type: ignore[arg-type]
            if resp.status_code != 200:
                resp.failure(_detail(resp))
                return
            answer = CheckinResponse.model_validate_json(resp.content)
        if self.fixed_pace is None:
            self.pace = min(max(answer.retry_after, 0.0), MAX_RETRY_AFTER)
        if answer.task is not None and not self.warned_task:
            self.warned_task = True
            log.warning(
                "device %s was offered a task (job %s round %s) that a load-test device does not do; "
                "run the load test against a coordinator with no running job",
                self.device_id,
                answer.task.job_id,
                answer.task.round,
            )


class OperatorUser(FastHttpUser):
    """An operator (CLI, dashboard) listing jobs and devices with a bearer token."""

    weight = 1
    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        token = _operator_token()
        if token is None:
            log.error("OperatorUser needs AICFL_TOKEN (an operator token); this user stops")
            raise StopUser()
        self.auth = {"Authorization": f"Bearer {token}"}

    def _get(self, path: str) -> None:
        with self.client.get(path, headers=self.auth, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(_detail(resp))

    @task(2)
    def list_devices(self) -> None:
        self._get("/v1/devices")

    @task(1)
    def list_jobs(self) -> None:
        self._get("/v1/jobs")
