"""Parameters the routers share: bounded integer ids in paths, and the signed device headers.

Ids and version numbers are stored as signed 64-bit integers, so a path integer outside
0..2^63-1 names nothing the coordinator could hold; it is refused as invalid (422) before a
handler runs, where the database driver would otherwise fail to bind it (500).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ValidationError

from shared.signing import HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP

MAX_ID = 2**63 - 1
"""The largest id the database holds (a signed 64-bit integer)."""

_RANGE = "a non-negative signed 64-bit integer; outside 0..2^63-1 the answer is 422"

JobId = Annotated[int, Path(ge=0, le=MAX_ID, description=f"the job's id: {_RANGE}")]
Version = Annotated[int, Path(ge=0, le=MAX_ID, description=f"a model version of the job: {_RANGE}")]
RoundNumber = Annotated[int, Path(ge=0, le=MAX_ID, description=f"a round's number within the job: {_RANGE}")]
RoundId = Annotated[
    int, Path(ge=0, le=MAX_ID, description=f"the round's id, as a check-in names it: {_RANGE}")
]
AuditId = Annotated[int, Path(ge=0, le=MAX_ID, description=f"the audit's id, as a claim names it: {_RANGE}")]

_SIGNED_HEADERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (HEADER_DEVICE, "the device id the coordinator gave at enrollment", {"type": "string"}),
    (
        HEADER_TIMESTAMP,
        "the time of signing, in Unix seconds; refused outside the coordinator's signature window",
        {"type": "string"},
    ),
    (HEADER_NONCE, "8 to 128 letters or digits, never sent before by this device", {"type": "string"}),
    (
        HEADER_SIGNATURE,
        "the base64 Ed25519 signature, by the device's enrolled key, of the method, the path and query, "
        "the timestamp, the nonce and the body's SHA-256 (shared/signing.py, canonical_request)",
        {"type": "string"},
    ),
)

SIGNED_DEVICE_REQUEST: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "header",
            "required": True,
            "description": f"{description}. A request without it, or whose signature does not check "
            "out, is answered 401.",
            "schema": schema,
        }
        for name, description, schema in _SIGNED_HEADERS
    ]
}
"""``openapi_extra`` of every signed device route: the four headers that sign it.

They are read and checked by :func:`server.security.device_request` (401 when missing), not
by FastAPI's parameter validation (which would answer 422), hence documented here."""


def request_body(
    json: type[BaseModel] | dict[str, Any] | None = None, *, binary: bool = False
) -> dict[str, Any]:
    """``openapi_extra`` documenting the body of a route that reads its body itself: JSON (a message
    model, or a JSON Schema), raw bytes (``binary``), or either, told apart by Content-Type."""
    content: dict[str, Any] = {}
    if json is not None:
        schema = json if isinstance(json, dict) else json.model_json_schema()
        content["application/json"] = {"schema": schema}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    if not content:
        return {}
    # An empty body reads as {} (device_api._json): required only where {} is not a valid message.
    return {"requestBody": {"required": binary or not _accepts_empty(json), "content": content}}


def _accepts_empty(json: type[BaseModel] | dict[str, Any] | None) -> bool:
    if not isinstance(json, type):
        return json is not None
    try:
        json.model_validate({})
    except ValidationError:
        return False
    return True


def signed_device_request(
    json: type[BaseModel] | dict[str, Any] | None = None, *, binary: bool = False
) -> dict[str, Any]:
    """``openapi_extra`` of a signed device route: the signing headers, and its body if it has one."""
    return {**copy.deepcopy(SIGNED_DEVICE_REQUEST), **request_body(json, binary=binary)}
