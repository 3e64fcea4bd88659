"""Endpoints the edge agents call; every one but enrollment is a signed request."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from coordinator import auth
from coordinator.checkins import CheckinAnswer
from coordinator.errors import Invalid
from server.longpoll import LongPolls, Outcome
from server.metrics import count_received
from server.params import JobId, RoundId, Version, request_body, signed_device_request
from server.schemas import problems
from server.security import SignedRequest, device_request, federation, read_body
from shared.signing import b64e, public_key_bytes
from shared.wire import (
    Accepted,
    CheckinRequest,
    CheckinResponse,
    ConfigureMessage,
    EnrollRequest,
    EnrollResponse,
    WithdrawMessage,
)

router = APIRouter(prefix="/v1", tags=["devices (agent)"])

ROUND_PROBLEMS = problems(401, 403, 404, 409, 413, 422)
BYTES = {"schema": {"type": "string", "format": "binary"}}


def _json(body: bytes, model: Any) -> Any:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise Invalid(f"{loc}: {first['msg']}") from None


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    responses=problems(401, 409, 413, 422, 429),
    openapi_extra=request_body(EnrollRequest),
)
async def enroll(request: Request) -> EnrollResponse:
    """Enroll a device with a one-time token and the Ed25519 public key it generated."""
    body = await read_body(request)
    count_received(request, "enroll", body)
    req = _json(body, EnrollRequest)
    fed = federation(request)

    def run() -> EnrollResponse:
        with fed.write() as s:
            device = auth.enroll_device(s, req.token, req.public_key, req.name, req.platform)
            return EnrollResponse(
                device_id=device.id,
                coordinator_public_key=b64e(public_key_bytes(fed.key)),
                signature_window_seconds=request.app.state.settings.signature_window,
            )

    return await run_in_threadpool(run)


@router.post(
    "/device/checkin",
    response_model=CheckinResponse,
    responses=problems(401, 404, 413, 422),
    openapi_extra=signed_device_request(CheckinRequest),
)
async def checkin(request: Request, who: SignedRequest = Depends(device_request)) -> CheckinResponse:
    """Report in; the answer says when to come back and what to do now, if anything.

    A device that says it can ``wait`` and has nothing to do now is held (no thread) until it owes a
    message in a round or the hold ends (``coordinator.pacing``, ``server.longpoll``).
    """
    checkins = federation(request).checkins

    def answer_now(device_id: str, body: bytes) -> tuple[str, CheckinRequest, CheckinAnswer]:
        count_received(request, "checkin", body)
        req = _json(body, CheckinRequest)
        return device_id, req, checkins.answer(device_id, req)

    device_id, req, answer = await who.run(answer_now)
    return await _held(request, device_id, req, answer)


async def _held(
    request: Request, device_id: str, req: CheckinRequest, answer: CheckinAnswer, since: int | None = None
) -> CheckinResponse:
    """``answer``, or, when it may be held, the device's task once it owes a message (no thread).

    ``since``: ``answer`` was not read but known (``_accepted``), as of that ``LongPolls.generation``."""
    if answer.hold <= 0:
        return answer.response
    long_polls: LongPolls = request.app.state.long_polls
    outcome, woken = await long_polls.hold(device_id, answer.hold, request.receive, since)
    if outcome is Outcome.WOKEN:
        if woken is None:  # the pass found it owing but read no task (it had none by then, or no reader)
            woken = await run_in_threadpool(federation(request).checkins.checkin, device_id, req)
        return woken if woken.task is not None else CheckinResponse(retry_after=0.0)
    if outcome is Outcome.EXPIRED:
        return CheckinResponse(retry_after=0.0)  # nothing happened: come back and wait again
    return answer.response  # not held (too many held, shutting down) or the device has gone


# A round message sent with ?wait=S is also the device's next check-in: the answer carries its next task
# (held, as a check-in with that wait is, until it owes one). Half of a SecAgg+ round's requests were
# the check-ins between its stages.
Wait = Annotated[
    float,
    Query(
        ge=0,
        le=3600,
        description="seconds this request may be held for the device's next task (`next` in the answer)",
    ),
]


async def _accepted(
    request: Request, who: SignedRequest, work: Callable[[str, bytes], None], wait: float
) -> Accepted:
    """Run a round message's ``work``; with ``wait``, answer with the device's next check-in as well.

    The answer is read only if a round opened, moved on or ended in this process while the message was
    worked on (its own message may have ended the stage). Otherwise the device, whose message was just
    taken, is in its round and owes nothing until the stage moves on: it is held without a read (half of
    a SecAgg+ round's transactions were these reads), and the pass that the stage's end starts wakes it
    (``LongPolls.hold``'s ``since``). A round moved by another replica is found by the pass within a tick,
    as for any held check-in. A device that declined its round is held as a device waiting for one is.
    """
    checkins = federation(request).checkins
    long_polls: LongPolls = request.app.state.long_polls
    req = CheckinRequest(wait=wait)
    since = long_polls.generation

    def work_then_answer(device_id: str, body: bytes) -> tuple[str, CheckinAnswer | None, int | None]:
        """The device, its answer, and ``since`` when that answer is known without a read (else None)."""
        work(device_id, body)
        if wait <= 0:
            return device_id, None, None
        if long_polls.generation == since:
            return device_id, checkins.in_round(wait), since
        return device_id, checkins.answer(device_id, req), None

    device_id, answer, unread_since = await who.run(work_then_answer)
    who.release()  # done with the body: no upload slot is held while the answer waits
    if answer is None:
        return Accepted()
    return Accepted(next=await _held(request, device_id, req, answer, unread_since))


@router.get(
    "/device/jobs/{job_id}/models/{version}",
    response_class=Response,
    responses={
        200: {"description": "the signed model blob", "content": {"application/octet-stream": BYTES}},
        **problems(401, 403, 404, 422),
    },
    openapi_extra=signed_device_request(),
)
async def device_model(
    job_id: JobId, version: Version, request: Request, who: SignedRequest = Depends(device_request)
) -> Response:
    """A model version's bytes, for a device selected in one of the job's rounds."""
    checkins = federation(request).checkins
    data = await who.run(lambda device_id, _: checkins.model_blob(device_id, job_id, version))
    return Response(content=data, media_type="application/octet-stream")


@router.post(
    "/device/rounds/{round_id}/configure",
    response_model=Accepted,
    responses=ROUND_PROBLEMS,
    openapi_extra=signed_device_request(ConfigureMessage),
)
async def configure(
    round_id: RoundId, request: Request, wait: Wait = 0.0, who: SignedRequest = Depends(device_request)
) -> Accepted:
    """Take part in a round (model verified, data checked), or decline with a reason."""
    devices = federation(request).devices

    def configure_now(device_id: str, body: bytes) -> None:
        count_received(request, "configure", body)
        devices.configure(device_id, round_id, _json(body, ConfigureMessage))

    return await _accepted(request, who, configure_now, wait)


@router.post(
    "/device/rounds/{round_id}/input",
    response_model=Accepted,
    responses=ROUND_PROBLEMS,
    openapi_extra=signed_device_request({"type": "object"}, binary=True),
)
async def round_input(
    round_id: RoundId, request: Request, wait: Wait = 0.0, who: SignedRequest = Depends(device_request)
) -> Accepted:
    """The round's input: a binary update (training) or a JSON message (statistics, evaluation)."""
    devices = federation(request).devices
    binary = request.headers.get("content-type", "").startswith("application/octet-stream")

    def input_now(device_id: str, body: bytes) -> None:
        count_received(request, "input", body)
        if binary:
            devices.update(device_id, round_id, body)
            return
        try:
            payload = json.loads(body or b"{}")
        except ValueError as err:  # not JSON, or not UTF-8 (UnicodeDecodeError)
            raise Invalid(f"body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise Invalid("body must be a JSON object")
        devices.input_json(device_id, round_id, payload)

    return await _accepted(request, who, input_now, wait)


@router.post(
    "/device/rounds/{round_id}/withdraw",
    response_model=Accepted,
    responses=ROUND_PROBLEMS,
    openapi_extra=signed_device_request(WithdrawMessage),
)
async def withdraw(
    round_id: RoundId, request: Request, who: SignedRequest = Depends(device_request)
) -> Accepted:
    """Leave a round this device accepted, with the reason (its app failed): counted as dropped, and
    the round goes on without waiting for the stage's deadline."""
    devices = federation(request).devices

    def withdraw_now(device_id: str, body: bytes) -> None:
        count_received(request, "withdraw", body)
        devices.withdraw(device_id, round_id, _json(body, WithdrawMessage).reason)

    await who.run(withdraw_now)
    return Accepted()


@router.post(
    "/device/rounds/{round_id}/{stage}",
    response_model=Accepted,
    responses=ROUND_PROBLEMS,
    openapi_extra=signed_device_request({"type": "object"}, binary=True),
)
async def secure_stage(
    round_id: RoundId,
    stage: str,
    request: Request,
    wait: Wait = 0.0,
    who: SignedRequest = Depends(device_request),
) -> Accepted:
    """A secure-aggregation stage: advertise_keys, share_keys, unmask (JSON) or masked_input (binary)."""
    devices = federation(request).devices

    def stage_now(device_id: str, body: bytes) -> None:
        count_received(request, stage, body)  # an unknown stage is counted as "other"
        if stage == "masked_input":
            devices.masked_input(device_id, round_id, body)
        else:
            devices.secure_json(device_id, round_id, stage, body)

    return await _accepted(request, who, stage_now, wait)
