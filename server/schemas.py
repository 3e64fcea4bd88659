"""Operator-facing API responses (the agent's messages live in shared/wire.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    enrolled_at: datetime
    last_seen: float | None
    revoked_at: datetime | None
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
    created_at: datetime


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
    started_at: datetime
    ended_at: datetime | None
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


class RoundDetailOut(RoundOut):
    devices: list[ParticipantOut] = []


class JobOut(_Out):
    id: int
    name: str
    status: str
    reason: str | None
    created_at: datetime
    updated_at: datetime
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


class BaselineOut(_Out):
    job_id: int
    leader: str
    algorithm: str
    metrics: dict[str, Any]
    leaderboard: list[Any]
    contributions: dict[str, Any]
    provenance: dict[str, Any]
    created_at: datetime
    created_by: str


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
    created_at: datetime
    updated_at: datetime
    report: dict[str, Any] | None = None
