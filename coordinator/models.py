"""SQLAlchemy 2 models: every piece of coordinator state.

Changes to these tables go through Alembic migrations in ``migrations/``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class OperatorToken(Base):
    __tablename__ = "operator_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_by: Mapped[str] = mapped_column(String(200), default="")


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    platform: Mapped[str] = mapped_column(String(200), default="")
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[float | None] = mapped_column(Float, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    peak_rss_mb: Mapped[float | None] = mapped_column(Float, default=None)
    # The device list's order: a page is one range read of this index (keyset paging).
    __table_args__ = (Index("ix_devices_enrolled", "enrolled_at", "id"),)


class DeviceNonce(Base):
    """Nonces seen inside the signature window; a repeat is a replay."""

    __tablename__ = "device_nonces"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(128))
    seen_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (
        UniqueConstraint("device_id", "nonce", name="uq_device_nonce"),
        Index("ix_device_nonces_seen_at", "seen_at"),
    )


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    preprocess: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    reference_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    current_version: Mapped[int | None] = mapped_column(Integer, default=None)
    rounds_completed: Mapped[int] = mapped_column(Integer, default=0)
    next_round: Mapped[int] = mapped_column(Integer, default=0)
    waiting_since: Mapped[float | None] = mapped_column(Float, default=None)
    strategy_state_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # Lines the job's metric is read against, recorded by an operator (the demo's centrally trained
    # ceiling): name -> {"metrics": {metric: value}, "description": str}.
    benchmarks: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="running")
    stage_deadline: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
    model_version_in: Mapped[int | None] = mapped_column(Integer, default=None)
    model_version_out: Mapped[int | None] = mapped_column(Integer, default=None)
    minimum: Mapped[int] = mapped_column(Integer)
    aggregation_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Secure aggregation: the round's parameters (k, t, quantisation), graph seed and context.
    secure: Mapped[bool] = mapped_column(Boolean, default=False)
    secagg: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The round's timeline: [{"stage", "started", "ended"}] on the engine's clock (coordinator.timeline);
    # NULL for rounds from before it was recorded.
    stages: Mapped[list[Any] | None] = mapped_column(JSON, default=list)
    # Differential privacy (coordinator/privacy.py): what the round's noised release cost, epsilon after it
    # at the job's delta, its noise and clip; NULL for a round that released nothing noised.
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_round_job_number"),
        Index("ix_rounds_status", "status"),
    )


class Participant(Base):
    __tablename__ = "participants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    status: Mapped[str] = mapped_column(String(16), default="active")
    stage_done: Mapped[str | None] = mapped_column(String(32), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    num_examples: Mapped[int | None] = mapped_column(Integer, default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    __table_args__ = (
        UniqueConstraint("round_id", "device_id", name="uq_participant"),
        Index("ix_participants_device", "device_id", "status"),
    )


class RoundMessage(Base):
    """A device's message for one stage: small ones inline, vectors in the blob store."""

    __tablename__ = "round_messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    device_id: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    blob_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # SHA-256 of the message as the device sent it: a resend of the same message is accepted again
    # (its first answer was lost), a different one refused. NULL for messages from before revision 0006.
    digest: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("round_id", "device_id", "stage", name="uq_round_message"),)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    version: Mapped[int] = mapped_column(Integer)
    parent: Mapped[int | None] = mapped_column(Integer, default=None)
    round_number: Mapped[int | None] = mapped_column(Integer, default=None)
    sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    released: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("job_id", "version", name="uq_model_version"),)


class Baseline(Base):
    """A job's AutoML baseline (``aicfl cluster automl``): its leaderboard, the leader's metrics on the
    reference rows and a summary of its TreeSHAP contributions. One per job; a new run replaces it."""

    __tablename__ = "baselines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    leader: Mapped[str] = mapped_column(String(300))
    algorithm: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    leaderboard: Mapped[list[Any]] = mapped_column(JSON, default=list)
    contributions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="")


class Audit(Base):
    """The SHAP audit of one model version, and its place in the audit queue.

    ``queued`` → ``running`` (claimed by a worker under a lease) → ``done`` or
    back to ``queued`` on a failed attempt or an expired lease, until
    ``max_attempts`` makes it ``failed``. Workers take rows with ``FOR UPDATE
    SKIP LOCKED`` on PostgreSQL, so several can share the queue.
    """

    __tablename__ = "audits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    queued_at: Mapped[float | None] = mapped_column(Float, default=None)  # the engine's clock
    lease_until: Mapped[float | None] = mapped_column(Float, default=None)
    verdict: Mapped[str | None] = mapped_column(String(16), default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    plots: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # name -> blob SHA-256
    error: Mapped[str | None] = mapped_column(Text, default=None)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    __table_args__ = (
        UniqueConstraint("job_id", "version", name="uq_audit_version"),
        Index("ix_audits_status", "status", "id"),
    )


class Event(Base):
    """The event log of operator actions and notable coordinator decisions."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
