"""Locust load test of the aicfl coordinator: devices checking in, operators looking on.

``DeviceUser`` behaves like an idle edge agent: it makes a fresh Ed25519
identity key, enrolls once with a one-time token (``POST /v1/enroll``), then
sends signed check-ins (``POST /v1/device/checkin``) at the pace the
coordinator asks for (``retry_after``), as ``aicfl-agent run`` does. It never
takes part in a round: point it at a coordinator with no running job, or its
devices get selected and then dropped at the first deadline.

``RoundDeviceUser`` is the same device taking part in rounds, as the agent
does, with real work at each stage (see its docstring): run it alone
(``locust -f loadtests/locustfile.py RoundDeviceUser``) against a coordinator
with a job that selects it.

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
``AICFL_LOAD_WAIT``
    seconds a check-in may be held by the coordinator (the long-poll ``wait``
    field); default: none sent, the coordinator answers at once.
``AICFL_LOAD_ROUNDS``
    ``1`` enables ``RoundDeviceUser`` (off by default so that a plain run stays idle).
``AICFL_LOAD_DROPOUT``
    ``RoundDeviceUser``: the probability that a device drops out at each stage
    of a round (it stops answering that round); default 0.
``AICFL_LOAD_LEDGER``
    ``RoundDeviceUser``: a folder where each process records the updates the
    coordinator accepted and the bytes it sent (``loadtests/synthetic.py``).

Run it through ``loadtests/run.py`` (which starts a coordinator on loopback),
or by hand: ``locust -f loadtests/locustfile.py --host http://127.0.0.1:8080``.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import locust.runners
import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from locust import FastHttpUser, between, events, task
from locust.contrib.fasthttp import FastHttpSession
from locust.exception import StopUser

# The wire schemas and the request signing come from this checkout's shared/,
# so that the load test speaks exactly the protocol the agent speaks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.synthetic import (  # noqa: E402
    CLIP,
    EXAMPLES,
    LEDGER_ENV,
    base_update,
    ledger_path,
    scaled,
)
from shared import codec  # noqa: E402
from shared.jobspec import DataSchema  # noqa: E402
from shared.secagg import statistics as secagg_statistics  # noqa: E402
from shared.secagg.params import SecAggParams  # noqa: E402
from shared.secagg.protocol import SecAggClient, weighted_input  # noqa: E402
from shared.signing import (  # noqa: E402
    b64e,
    identity_verifier,
    load_public_key,
    public_key_bytes,
    sign_request,
    verify_model,
)
from shared.tabular import local_statistics  # noqa: E402
from shared.wire import (  # noqa: E402
    Accepted,
    CheckinRequest,
    CheckinResponse,
    ConfigureMessage,
    EnrollRequest,
    EnrollResponse,
    EvaluateMessage,
    StatsMessage,
    Task,
    masked_input_header,
)

log = logging.getLogger("aicfl.loadtest")

# A worker busy with a device's SecAgg+ work (a masked input at 1e6 parameters takes seconds) sends no
# heartbeat meanwhile; the master would count it missing after 3 s and stop the test. Give it a minute.
locust.runners.HEARTBEAT_LIVENESS = 60

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
# Requests sent again after the server closed their connection under them, per stage.
RESENT: dict[str, int] = {}
_serial = itertools.count(1)


class DeviceUser(FastHttpUser):
    """An enrolled, idle edge device: one enrollment, then signed check-ins."""

    weight = 10
    # A long-polled check-in is held up to AICFL_LOAD_WAIT seconds before it is answered.
    network_timeout = 120.0

    def wait_time(self) -> float:
        return self.pace

    def on_start(self) -> None:
        fixed = os.environ.get("AICFL_LOAD_CHECKIN_INTERVAL")
        self.fixed_pace = float(fixed) if fixed else None
        self.pace = self.fixed_pace if self.fixed_pace is not None else 2.0
        wait = os.environ.get("AICFL_LOAD_WAIT")
        self.hold = float(wait) if wait else None
        # The coordinator checks the signature over the path it receives, so a
        # host URL with a path prefix (behind a proxy) is part of what we sign.
        self.prefix = urlsplit(self.host or "").path.rstrip("/")
        self.key = Ed25519PrivateKey.generate()
        self.warned_task = False
        self.serial = next(_serial)
        body = (
            EnrollRequest(
                token=TOKENS.take(self.client),
                public_key=b64e(public_key_bytes(self.key)),
                name=f"locust-device-{os.getpid()}-{self.serial}",
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
        self.coordinator_key = load_public_key(enrolled.coordinator_public_key)

    def _checkin_body(self) -> bytes:
        # No wait field unless asked for: the same bytes as an agent that does not long-poll.
        extra: dict[str, Any] = {} if self.hold is None else {"wait": self.hold}
        return CheckinRequest(agent_version="locust", platform="locust", **extra).model_dump_json().encode()

    @task
    def checkin(self) -> None:
        path = "/v1/device/checkin"
        answer = None
        for attempt in (1, 2):
            body = self._checkin_body()
            headers = sign_request(self.key, self.device_id, "POST", self.prefix + path, body)
            headers.update(JSON)
            with self.client.post(path, data=body, headers=headers, catch_response=True) as resp:  # type: ignore[arg-type]
                if resp.status_code == 0 and attempt == 1:
                    # The server closed the idle connection as this request went out (its keep-alive
                    # expired): the agent checks in again at once; so does this device, counted apart.
                    resp.success()
                    RESENT["checkin"] = RESENT.get("checkin", 0) + 1
                    continue
                if resp.status_code != 200:
                    resp.failure(_detail(resp))
                    return
                answer = CheckinResponse.model_validate_json(resp.content)
                break
        if answer is None:
            return
        if self.fixed_pace is None:
            self.pace = min(max(answer.retry_after, 0.0), MAX_RETRY_AFTER)
        if answer.task is not None:
            self.on_task(answer.task)

    def on_task(self, t: Task) -> None:
        """A task offered by the coordinator: an idle device only warns, once."""
        if not self.warned_task:
            self.warned_task = True
            log.warning(
                "device %s was offered a task (job %s round %s) that a load-test device does not do; "
                "run the load test against a coordinator with no running job",
                self.device_id,
                t.job_id,
                t.round,
            )


# ---------------------------------------------------------------------------- devices in rounds

BINARY = "application/octet-stream"
# Request bodies this process sent, per request name (locust records only response sizes).
SENT_BYTES: dict[str, int] = {}
DROPS: dict[str, int] = {}
LATE: dict[str, int] = {}


@cache
def _statistics(schema_json: str) -> tuple[DataSchema, dict[str, Any], dict[str, list[str]]]:
    """The job's schema, one table's statistics and its vocabulary, computed once per process and schema.

    A device's statistics need its rows; every load-test device holds the same
    32 rows of the job's columns (the statistics are real, the data synthetic).
    """
    schema = DataSchema.model_validate_json(schema_json)
    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {}
    for feature in schema.features:
        if feature.type == "numeric":
            columns[feature.name] = rng.normal(size=32)
        else:
            columns[feature.name] = rng.choice(["a", "b", "c"], size=32)
    columns[schema.target] = rng.integers(0, 2, 32).astype(str)
    stats = local_statistics(pd.DataFrame(columns), schema)
    return schema, stats, secagg_statistics.vocabulary(stats, schema)


def _job_statistics(t: Task) -> tuple[DataSchema, dict[str, Any], dict[str, list[str]]]:
    return _statistics(json.dumps(t.spec["data"], sort_keys=True))


@cache
def _update(numel: int, clip: float) -> np.ndarray:
    """The process's synthetic update ``U`` for a model of ``numel`` values (made once, shared)."""
    return base_update(numel, clip)


def _ledger(kind: str, record: dict[str, Any]) -> None:
    folder = os.environ.get(LEDGER_ENV)
    if folder:
        with ledger_path(folder, kind).open("a") as fh:
            fh.write(json.dumps(record) + "\n")


_BYTES_WRITTEN = [0.0]  # when this process last wrote its bytes record


@events.test_stop.add_listener
def _write_bytes(**_: Any) -> None:
    """Each process's request-body bytes and drops, for run.py's per-device cost: at the end, and at most
    once a second as they grow (a worker stopped while its devices' requests are held may never hear of
    the end)."""
    folder = os.environ.get(LEDGER_ENV)
    if folder and (SENT_BYTES or DROPS or RESENT):
        record = {"sent": SENT_BYTES, "drops": DROPS, "late": LATE, "resent": RESENT}
        ledger_path(folder, "bytes").write_text(json.dumps(record) + "\n")
        _BYTES_WRITTEN[0] = time.monotonic()


def _bytes_grew() -> None:
    if time.monotonic() - _BYTES_WRITTEN[0] >= 1.0:
        _write_bytes()


class RoundDeviceUser(DeviceUser):
    """A device that takes part in rounds: the agent's stages with real signing, bodies and SecAgg+.

        At each stage it does what ``client_agent/worker.py`` does, with a synthetic
        update in place of training:

        - configure: train and evaluate rounds download the model and check its
          hash and the coordinator's signature; a secure statistics round sends
          the value sets (vocabulary);
        - input: statistics (plaintext statistics rounds), the metrics of an
          evaluate round, or a plaintext update ``n * s * U`` in the binary codec;
        - advertise_keys, share_keys, masked_input, unmask: ``SecAggClient``, the
          masked input being ``s * U`` quantised, weighted by ``n`` and masked in
          the uint64 codec (or the statistics vector in a statistics round).

        With ``AICFL_LOAD_ROUNDS``
        ``1`` enables ``RoundDeviceUser`` (off by default so that a plain run stays idle).
    ``AICFL_LOAD_DROPOUT`` = p, before each stage the device drops out of
        the round with probability p: it keeps checking in but never answers that
        round again. Every update the coordinator accepted goes to the ledger.
    """

    # Only in round runs (AICFL_LOAD_ROUNDS=1 locust -f loadtests/locustfile.py RoundDeviceUser): a plain
    # `locust -f loadtests/locustfile.py` keeps its idle devices and operators.
    weight = 10 if os.environ.get("AICFL_LOAD_ROUNDS") == "1" else 0

    def on_start(self) -> None:
        super().on_start()
        self.dropout = float(os.environ.get("AICFL_LOAD_DROPOUT", "0") or 0)
        self.rng = random.Random(f"{os.getpid()}-{self.serial}")
        self.scale = 0.5 + self.rng.random()
        self.sent: set[tuple[int, str]] = set()
        self.dropped: set[int] = set()
        self.numel: dict[int, int] = {}
        self.secagg: dict[int, SecAggClient] = {}

    def on_task(self, t: Task) -> None:
        # With AICFL_LOAD_WAIT (long polls) each message is sent with ?wait, as the agent sends it, and
        # the answer's next task is worked on at once, without a check-in.
        nxt: Task | None = t
        while nxt is not None:
            nxt = self._stage(nxt)

    def _stage(self, t: Task) -> Task | None:
        """Answer one stage's task; the next task when the answer carried one."""
        key = (t.round_id, t.stage)
        if t.round_id in self.dropped or key in self.sent:
            return None
        if self.dropout and self.rng.random() < self.dropout:
            self.dropped.add(t.round_id)
            self.secagg.pop(t.round_id, None)
            DROPS[f"{t.kind}/{t.stage}"] = DROPS.get(f"{t.kind}/{t.stage}", 0) + 1
            return None
        self.sent.add(key)
        try:
            body, ctype = self._message(t)
        except StopStage:
            return None
        accepted, answered = self._post(f"/v1/device/rounds/{t.round_id}/{t.stage}", body, ctype, t.stage)
        if accepted and t.kind == "train" and t.stage in ("input", "masked_input"):
            _ledger(
                "contrib",
                {
                    "job_id": t.job_id,
                    "round": t.round,
                    "round_id": t.round_id,
                    "secure": t.stage == "masked_input",
                    "scale": self.scale,
                    "examples": EXAMPLES,
                },
            )
        if t.stage == "unmask":
            self.secagg.pop(t.round_id, None)
        if answered is None:
            return None
        if self.fixed_pace is None:
            self.pace = min(max(answered.retry_after, 0.0), MAX_RETRY_AFTER)
        return answered.task

    # -- HTTP ----------------------------------------------------------------

    def _signed(self, method: str, path: str, body: bytes, ctype: str | None) -> dict[str, str]:
        headers = sign_request(self.key, self.device_id, method, self.prefix + path, body)
        if ctype:
            headers["Content-Type"] = ctype
        return headers

    def _post(
        self, path: str, body: bytes, ctype: str, stage: str, again: bool = True
    ) -> tuple[bool, CheckinResponse | None]:
        """Send a stage's message: whether it was taken, and the next check-in's answer it carried."""
        name = f"/v1/device/rounds/[id]/{stage}"
        if self.hold is not None:  # held until the device owes its next message: timed apart
            path, name = f"{path}?wait={self.hold:g}", f"{name}?wait"
        SENT_BYTES[name] = SENT_BYTES.get(name, 0) + len(body)
        _bytes_grew()
        headers = self._signed("POST", path, body, ctype)
        resend = False
        answered = None
        with self.client.post(path, data=body, headers=headers, name=name, catch_response=True) as resp:  # type: ignore[arg-type]
            if resp.status_code == 0 and again:
                # The connection was closed under the request (the server's keep-alive expired while
                # this device computed): the agent sends the message again, signed afresh
                # (client_agent/loop.py's outbox); so does this device, once. Counted apart.
                resp.success()
                RESENT[stage] = RESENT.get(stage, 0) + 1
                resend = True
            elif resp.status_code == 409 and stage == "unmask" and "is completed" in _detail(resp):
                # The round ended before this share was needed (every secret already had t shares):
                # the agent logs it and moves on; counted apart, not as a failure.
                resp.success()
                LATE[stage] = LATE.get(stage, 0) + 1
                return False, None
            elif resp.status_code != 200:
                resp.failure(_detail(resp))
                return False, None
            else:
                answered = Accepted.model_validate_json(resp.content).next
        if resend:
            return self._post(path.split("?", 1)[0], body, ctype, stage, again=False)
        return True, answered

    def _model(self, t: Task) -> None:
        """Download the round's model, check its hash and signature, remember its size."""
        assert t.model is not None
        path = f"/v1/device/jobs/{t.job_id}/models/{t.model.version}"
        name = "/v1/device/jobs/[id]/models/[version]"
        with self.client.get(
            path, headers=self._signed("GET", path, b"", None), name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(_detail(resp))
                raise StopStage()
            blob = resp.content
        try:
            verify_model(
                self.coordinator_key, t.job_id, t.model.version, blob, t.model.sha256, t.model.signature
            )
        except Exception as err:  # noqa: BLE001 - a bad model is a failure of the coordinator
            events.request.fire(
                request_type="VERIFY", name=name, response_time=0, response_length=0, exception=err
            )
            raise StopStage() from None
        self.numel[t.round_id] = int(codec.decode(blob)[1].size)

    # -- the stages --------------------------------------------------------------

    def _message(self, t: Task) -> tuple[bytes, str]:
        """The body of ``t``'s stage and its content type; StopStage when there is none to send."""
        info = t.secagg or {}
        secure = bool(t.spec.get("secure", True))
        if t.stage == "configure":
            vocab = None
            if t.kind == "stats" and secure:
                vocab = _job_statistics(t)[2]
            elif t.kind != "stats":
                self._model(t)
            msg = ConfigureMessage(accepted=True, rows=EXAMPLES, vocabulary=vocab)
            return msg.model_dump_json().encode(), JSON["Content-Type"]
        if t.stage == "input":
            if t.kind == "stats":
                return StatsMessage(statistics=_job_statistics(t)[1]).model_dump_json().encode(), JSON[
                    "Content-Type"
                ]
            if t.kind == "evaluate":
                msg2 = EvaluateMessage(metrics={"loss": 0.69, "accuracy": 0.5}, examples=16)
                return msg2.model_dump_json().encode(), JSON["Content-Type"]
            numel = self.numel.get(t.round_id)
            if numel is None:
                raise StopStage()
            delta = scaled(_update(numel, CLIP), self.scale)
            delta *= np.float32(EXAMPLES)
            header = {
                "kind": "update",
                "round_id": t.round_id,
                "num_examples": EXAMPLES,
                "train_loss": 0.5,
                "metrics": {},
                "holdout_examples": 0,
            }
            return codec.encode(header, delta), BINARY
        if t.stage == "advertise_keys":
            client = SecAggClient(
                self.device_id,
                base64.b64decode(info["context"]),
                SecAggParams(**info["params"]),
                self.key.sign,
            )
            self.secagg[t.round_id] = client
            return json.dumps(client.advertise()).encode(), JSON["Content-Type"]
        found = self.secagg.get(t.round_id)
        if found is None:  # it dropped (or never advertised) in this round
            raise StopStage()
        client = found
        if t.stage == "share_keys":
            cts = client.share_keys(info["neighbours"], identity_verifier(info["identity_keys"]))
            return json.dumps({"ciphertexts": cts}).encode(), JSON["Content-Type"]
        if t.stage == "masked_input":
            if t.kind == "stats":
                schema, stats, _ = _job_statistics(t)
                x = secagg_statistics.encode(stats, schema, info["vocabulary"])
                y = client.masked_input(x, info["ciphertexts"])
            else:
                numel = self.numel.get(t.round_id)
                if numel is None:
                    raise StopStage()
                update = scaled(_update(numel, client.params.clip), self.scale)
                seed = self.rng.getrandbits(64)
                x = weighted_input(update, EXAMPLES, client.params, np.random.default_rng(seed))
                y = client.masked_input(x, info["ciphertexts"], in_place=True)
            return codec.encode(masked_input_header(t.round_id), y), BINARY
        if t.stage == "unmask":
            me = {self.device_id}
            shares = client.unmask(set(info["survivors"]) - me, set(info["dropped"]) - me)
            return json.dumps({"shares": shares}).encode(), JSON["Content-Type"]
        raise StopStage()


class StopStage(Exception):
    """Nothing to send for this stage (the model could not be had, or the device missed a step)."""


class OperatorUser(FastHttpUser):
    """An operator (CLI, dashboard) listing jobs and devices with a bearer token."""

    weight = 1
    # AICFL_LOAD_OPERATORS=N: exactly N operators, whatever the number of devices (else 1 per 10).
    fixed_count = int(os.environ.get("AICFL_LOAD_OPERATORS", "0") or 0)
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
        # One page, as the dashboard and the CLI's first screen read it (the list is paged).
        self._get("/v1/devices?limit=100")

    @task(1)
    def list_jobs(self) -> None:
        self._get("/v1/jobs")
