"""Operator-facing API responses (the agent's messages live in shared/wire.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

PROBLEM = "application/problem+json"


def _as_utc(value: datetime) -> datetime:
    # The database hands back naive UTC (SQLite keeps no zone); a published date-time carries its offset.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
"""A timestamp in UTC, serialised in RFC 3339 with its offset (``2026-01-01T12:00:00Z``)."""


class Problem(BaseModel):
    """An RFC 9457 problem document: the body of every error the API answers with."""

    type: str = Field(default="about:blank", description="a URI naming the problem type")
    title: str = Field(description="a short summary of the problem type")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request, for a person to act on")


_MEANINGS = {
    400: "The body could not be read as the declared media type (not UTF-8, not JSON)",
    401: "No valid credentials: a missing or unknown operator token, or an unsigned or badly signed "
    "device request",
    403: "The credentials do not allow this: an operator token without the admin role, or a device "
    "asking for what it has no part in",
    404: "Nothing with that id or name",
    409: "The request conflicts with the current state (a job or round that has moved on, an audit "
    "held by another worker, a key already enrolled)",
    413: "The request body is over the coordinator's limit for this kind of request",
    422: "The request is invalid: a parameter, body or job spec that does not check out",
    429: "Too many requests from this address; Retry-After says when to try again",
}
_PROBLEM_SCHEMA = Problem.model_json_schema()


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting each status as an RFC 9457 problem document."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"description": _MEANINGS[status], "content": {PROBLEM: {"schema": _PROBLEM_SCHEMA}}}
        for status in statuses
    }
    if 429 in out:
        out[429]["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}, "required": True}
        }
    return out


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TokenOut(_Out):
    name: str
    role: str
    token: str


class EnrollmentTokensOut(_Out):
    tokens: list[str]
    expires_in_seconds: float


class DeviceOut(_Out):
    id: str
    name: str
    platform: str
    enrolled_at: UtcDatetime
    last_seen: float | None
    revoked_at: UtcDatetime | None
    agent_version: str
    peak_rss_mb: float | None
    online: bool = False


class ModelVersionOut(_Out):
    job_id: int
    version: int
    parent: int | None
    round_number: int | None
    sha256: str
    signature: str
    size: int
    num_parameters: int
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    released: bool
    created_at: UtcDatetime


class ParticipantOut(_Out):
    device_id: str
    status: str
    stage_done: str | None
    reason: str | None
    num_examples: int | None


class RoundOut(_Out):
    job_id: int
    number: int
    kind: str
    stage: str
    status: str
    stage_deadline: float
    reason: str | None
    started_at: UtcDatetime
    ended_at: UtcDatetime | None
    model_version_in: int | None
    model_version_out: int | None
    minimum: int
    aggregation_seconds: float | None
    metrics: dict[str, Any]
    participants: int = 0
    dropped: int = 0
    declined: int = 0
    declines: dict[str, int] = Field(
        default_factory=dict, description="why devices declined the round: each reason and how many gave it"
    )
    completed_by: int = 0
    stages: list[dict[str, Any]] = Field(
        default=[],
        description="the stages the round went through, in order: stage, started and ended (epoch seconds; "
        "ended is null while the stage runs) and seconds",
    )
    privacy: dict[str, Any] | None = Field(
        default=None,
        description="differential privacy spent by this round: level, epsilon after it at delta, noise_multiplier,"
        " clip, trusts_coordinator (docs/privacy.md); null when it released nothing noised",
    )


class RoundDetailOut(RoundOut):
    devices: list[ParticipantOut] = []


class JobOut(_Out):
    id: int
    name: str
    status: str
    reason: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    created_by: str
    rounds: int
    rounds_completed: int
    current_version: int | None
    reference: bool
    app: str = Field(
        description="the app the job trains ('module:attribute'; the built-in tabular app by default)"
    )
    app_version: str | None = Field(default=None, description="the app version every device must hold")
    spec: dict[str, Any]
    warnings: list[str] = []
    latest_round: RoundOut | None = None
    latest_metrics: dict[str, Any] = {}
    preprocess: dict[str, Any] | None = None
    waiting_for: str | None = None
    pretrain: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    benchmarks: dict[str, Any] = Field(
        default_factory=dict,
        description="lines the job's metric is read against: name -> {metrics, description}",
    )
    privacy: dict[str, Any] | None = Field(
        default=None,
        description="differential privacy: level, epsilon spent of target_epsilon at delta, noise_multiplier, clip,"
        " trusts_coordinator, rounds_spent (docs/privacy.md); null without [privacy]",
    )


class BaselineOut(_Out):
    job_id: int
    leader: str
    algorithm: str
    metrics: dict[str, Any]
    leaderboard: list[Any]
    contributions: dict[str, Any]
    provenance: dict[str, Any]
    created_at: UtcDatetime
    created_by: str


class AuditClaimOut(_Out):
    """An audit a worker took, under a lease (coordinator.audits.claim_dict)."""

    id: int
    job_id: int
    version: int
    attempt: int
    previous_version: int | None = Field(description="the version the audit's drift is measured against")
    lease_until: float = Field(description="when the lease ends (Unix seconds): report or fail before")


class AuditOut(_Out):
    job_id: int
    version: int
    status: str
    attempts: int
    worker: str | None
    verdict: str | None
    error: str | None
    seconds: float | None
    plots: list[str]
    top_features: list[str] | None = None
    rank_correlation_to_previous: float | None = None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    report: dict[str, Any] | None = None
