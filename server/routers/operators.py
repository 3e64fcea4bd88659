"""Operator endpoints: tokens, enrollment tokens, devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from coordinator import auth, queries
from coordinator.auth import Operator
from coordinator.errors import Invalid
from server.schemas import DeviceOut, EnrollmentTokensOut, TokenOut, problems
from server.security import admin, federation, operator

router = APIRouter(prefix="/v1", tags=["operators"])


class NewOperator(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    role: str = "viewer"


class NewEnrollmentTokens(BaseModel):
    count: int = Field(default=1, ge=1, le=10_000)
    ttl_seconds: float = Field(default=3600, gt=0)


@router.post(
    "/operators", response_model=TokenOut, status_code=201, responses=problems(400, 401, 403, 413, 422)
)
def create_operator(body: NewOperator, request: Request, op: Operator = Depends(admin)) -> TokenOut:
    """Make an operator token (admin or viewer); the token is shown once."""
    with federation(request).write() as s:
        token = auth.create_operator_token(s, body.name, body.role)
    return TokenOut(name=body.name, role=body.role, token=token)


@router.post(
    "/enrollment-tokens",
    response_model=EnrollmentTokensOut,
    status_code=201,
    responses=problems(400, 401, 403, 413, 422),
)
def create_enrollment_tokens(
    body: NewEnrollmentTokens, request: Request, op: Operator = Depends(admin)
) -> EnrollmentTokensOut:
    """One-time, expiring tokens with which devices enroll."""
    with federation(request).write() as s:
        tokens = auth.create_enrollment_tokens(s, body.count, body.ttl_seconds, op.name)
    return EnrollmentTokensOut(tokens=tokens, expires_in_seconds=body.ttl_seconds)


DEVICE_PAGE = 500
DEVICE_PAGE_MAX = 1000


@router.get(
    "/devices",
    response_model=list[DeviceOut],
    responses={
        200: {
            "headers": {
                "Link": {
                    "description": 'the next page, `<URL>; rel="next"`, while more devices follow',
                    "schema": {"type": "string"},
                }
            }
        },
        **problems(401, 422),
    },
)
def list_devices(
    request: Request,
    response: Response,
    limit: int = Query(
        DEVICE_PAGE, ge=1, le=DEVICE_PAGE_MAX, description="devices on this page (at most 1000)"
    ),
    after: str | None = Query(
        None, max_length=64, description="the last device id of the previous page (from the Link header)"
    ),
    op: Operator = Depends(operator),
) -> list[dict[str, Any]]:
    """Enrolled devices in enrolment order, a page at a time; a `Link` header names the next page."""
    fed = federation(request)
    with fed.read() as s:
        try:
            rows, more = queries.list_devices(s, fed.settings.eligibility_window, limit, after)
        except LookupError:
            raise Invalid(f"after: no device {after!r} (pass the last id of the previous page)") from None
    if more:
        url = request.url.include_query_params(limit=limit, after=rows[-1]["id"])
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return rows  # validated once, as the response model


@router.post(
    "/devices/{device_id}/revoke", response_model=DeviceOut, responses=problems(401, 403, 404, 413, 422)
)
def revoke_device(device_id: str, request: Request, op: Operator = Depends(admin)) -> DeviceOut:
    """Revoke a device: its signed requests are refused from now on."""
    with federation(request).write() as s:
        d = auth.revoke_device(s, device_id, op.name)
        return DeviceOut.model_validate(d)
