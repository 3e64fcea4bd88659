"""The SHAP audit queue: one row per model version, taken by workers under a lease.

Workers (``aicfl audit worker``, in the training cluster) reach this only
through the API. A claim takes the oldest queued row, or a running one whose
lease has expired (its worker died), with ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL so that several workers never take the same row. A failed attempt
puts the row back in the queue until the job's ``audit.max_attempts``; then it
is ``failed``. Nothing here blocks a round: the gate (``audit.gate``) only
decides which version devices train from.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import Audit, Event, Job, ModelVersion
from shared.jobspec import JobSpec

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
VERDICTS = ("ok", "drift")
PLOT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\.png$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PLOT_BYTES = 8 * 1024 * 1024
MAX_PLOTS = 8
MAX_ERROR_CHARS = 2000


def enqueue(s: Session, job: Job, version: int, now: float) -> Audit | None:
    """Queue the audit of a new version, when the job audits its versions."""
    spec = JobSpec.model_validate(job.spec)
    if not spec.audit.enabled:
        return None
    row = Audit(job_id=job.id, version=version, status=QUEUED, queued_at=now)
    s.add(row)
    return row


def _max_attempts(s: Session, job_id: int) -> int:
    job = s.get(Job, job_id)
    assert job is not None
    return JobSpec.model_validate(job.spec).audit.max_attempts


def claim(s: Session, worker: str, lease_seconds: float, now: float, skip_locked: bool) -> Audit | None:
    """Take the oldest audit that is queued or whose worker's lease ran out; None when there is none."""
    if not worker.strip() or len(worker) > 200:
        raise Invalid("worker must be a non-empty name of at most 200 characters")
    if not (math.isfinite(lease_seconds) and 1 <= lease_seconds <= 86400):
        raise Invalid(f"lease_seconds must be between 1 and 86400; got {lease_seconds}")
    takeable = or_(
        Audit.status == QUEUED,
        and_(Audit.status == RUNNING, Audit.lease_until < now),
    )
    while True:
        q = select(Audit).where(takeable).order_by(Audit.id).limit(1)
        if skip_locked:
            q = q.with_for_update(skip_locked=True)
        row = s.scalar(q)
        if row is None:
            return None
        if row.status == RUNNING:
            # Its worker died or stalled: that attempt failed.
            row.error = f"worker {row.worker} did not report within its lease"
            if row.attempts >= _max_attempts(s, row.job_id):
                _give_up(s, row)
                continue
        row.status = RUNNING
        row.worker = worker
        row.lease_until = now + lease_seconds
        row.attempts += 1
        s.flush()
        return row


def claim_dict(s: Session, row: Audit) -> dict[str, Any]:
    """What a worker needs to know about the audit it took."""
    previous = s.scalar(
        select(ModelVersion.version)
        .where(ModelVersion.job_id == row.job_id, ModelVersion.version < row.version)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    return {
        "id": row.id,
        "job_id": row.job_id,
        "version": row.version,
        "attempt": row.attempts,
        "previous_version": previous,
        "lease_until": row.lease_until,
    }


def _held(s: Session, audit_id: int, worker: str, skip_locked: bool) -> Audit:
    q = select(Audit).where(Audit.id == audit_id)
    row = s.scalar(q.with_for_update() if skip_locked else q)
    if row is None:
        raise NotFound(f"no audit {audit_id}")
    if row.status != RUNNING or row.worker != worker:
        holder = f"held by {row.worker}" if row.status == RUNNING else row.status
        raise Conflict(
            f"audit {audit_id} is not held by {worker} (it is {holder}); its lease may have expired"
        )
    return row


def decode_plots(plots: Any) -> dict[str, bytes]:
    """Base64 PNGs by file name, checked before anything is stored."""
    if not isinstance(plots, dict):
        raise Invalid("plots must be an object of file name -> base64 PNG")
    if len(plots) > MAX_PLOTS:
        raise Invalid(f"at most {MAX_PLOTS} plots per audit; got {len(plots)}")
    out = {}
    for name, data in plots.items():
        if not isinstance(name, str) or not PLOT_NAME.match(name):
            raise Invalid(f"plot name {name!r} must look like 'importance.png' (lower case, .png)")
        if not isinstance(data, str):
            raise Invalid(f"plot {name}: expected base64 text")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(f"plot {name}: not valid base64") from None
        if not raw.startswith(PNG_MAGIC):
            raise Invalid(f"plot {name}: not a PNG image")
        if len(raw) > MAX_PLOT_BYTES:
            raise Invalid(f"plot {name}: {len(raw)} bytes is over the {MAX_PLOT_BYTES}-byte limit")
        out[name] = raw
    return out


def complete(
    s: Session,
    blobs: BlobStore,
    audit_id: int,
    worker: str,
    *,
    verdict: str,
    report: Any,
    seconds: Any,
    plots: dict[str, bytes],
    skip_locked: bool,
) -> Audit:
    """Record a finished audit; under the job's gate, release the version when its verdict is ok."""
    if verdict not in VERDICTS:
        raise Invalid(f"verdict must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    if not isinstance(report, dict):
        raise Invalid("report must be a JSON object")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds < 1e7:
        raise Invalid(f"seconds must be a non-negative number; got {seconds!r}")
    row = _held(s, audit_id, worker, skip_locked)
    row.plots = {name: blobs.put(png) for name, png in plots.items()}
    row.status = DONE
    row.verdict = verdict
    row.report = report
    row.seconds = float(seconds)
    row.error = None
    row.lease_until = None
    job = s.get(Job, row.job_id)
    assert job is not None
    spec = JobSpec.model_validate(job.spec)
    if spec.audit.gate:
        _gate(s, job, row, release=verdict == "ok")
    if verdict == "drift":
        s.add(
            Event(
                actor="audit",
                action="audit.drift",
                target=f"{row.job_id}/{row.version}",
                detail={"reasons": report.get("reasons", [])},
            )
        )
    return row


def fail(s: Session, audit_id: int, worker: str, error: Any, skip_locked: bool) -> Audit:
    """Record a failed attempt: back to the queue, or ``failed`` after the job's ``max_attempts``."""
    if not isinstance(error, str) or not error.strip():
        raise Invalid("error must be a non-empty string saying what went wrong")
    row = _held(s, audit_id, worker, skip_locked)
    row.error = error[:MAX_ERROR_CHARS]
    row.lease_until = None
    if row.attempts >= _max_attempts(s, row.job_id):
        _give_up(s, row)
    else:
        row.status = QUEUED
    return row


def _give_up(s: Session, row: Audit) -> None:
    row.status = FAILED
    row.lease_until = None
    s.add(
        Event(
            actor="audit",
            action="audit.failed",
            target=f"{row.job_id}/{row.version}",
            detail={"attempts": row.attempts, "error": row.error},
        )
    )
    job = s.get(Job, row.job_id)
    assert job is not None
    if JobSpec.model_validate(job.spec).audit.gate:
        _gate(s, job, row, release=False)  # fail closed: an unaudited version is not released


def _gate(s: Session, job: Job, row: Audit, release: bool) -> None:
    mv = s.scalar(
        select(ModelVersion).where(ModelVersion.job_id == job.id, ModelVersion.version == row.version)
    )
    if mv is None:  # pragma: no cover - audits are queued with their version
        return
    mv.released = release
    if release and (job.current_version is None or mv.version > job.current_version):
        job.current_version = mv.version
    elif not release:
        s.add(
            Event(
                actor="audit",
                action="version.withheld",
                target=f"{job.id}/{mv.version}",
                detail={"verdict": row.verdict, "status": row.status},
            )
        )


def gate_holds(s: Session, job: Job, spec: JobSpec, now: float) -> bool:
    """Under the gate, whether the next round must wait for the newest version's audit."""
    if not spec.audit.gate or not spec.audit.enabled:
        return False
    newest = s.scalar(select(Audit).where(Audit.job_id == job.id).order_by(Audit.version.desc()).limit(1))
    if newest is None or newest.status not in (QUEUED, RUNNING):
        return False
    return now - (newest.queued_at or now) < spec.audit.gate_timeout


def audit_dict(row: Audit, with_report: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job_id": row.job_id,
        "version": row.version,
        "status": row.status,
        "attempts": row.attempts,
        "worker": row.worker,
        "verdict": row.verdict,
        "error": row.error,
        "seconds": row.seconds,
        "plots": sorted(row.plots or {}),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
    report = row.report or {}
    out["top_features"] = report.get("top_features")
    out["rank_correlation_to_previous"] = (report.get("drift") or {}).get("rank_correlation")
    if with_report:
        out["report"] = row.report
    return out


def list_audits(s: Session, job_id: int) -> list[Audit]:
    return list(s.scalars(select(Audit).where(Audit.job_id == job_id).order_by(Audit.version)))


def get_audit(s: Session, job_id: int, version: int) -> Audit:
    row = s.scalar(select(Audit).where(Audit.job_id == job_id, Audit.version == version))
    if row is None:
        raise NotFound(f"job {job_id} has no audit of version {version}")
    return row


def latest(s: Session, job_id: int) -> Audit | None:
    return s.scalar(select(Audit).where(Audit.job_id == job_id).order_by(Audit.version.desc()).limit(1))
