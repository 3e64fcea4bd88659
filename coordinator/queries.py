"""Read models for operators: jobs, rounds and devices with their counts."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from coordinator import privacy, timeline
from coordinator.errors import NotFound
from coordinator.models import Audit, Baseline, Device, Job, ModelVersion, Participant, Round
from coordinator.rounds import ACTIVE, DECLINED, DROPPED
from shared.apps import BUILTIN


def get_job(s: Session, job_id: int) -> Job:
    """A job by id, or NotFound naming it."""
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def round_dict(r: Round, counts: dict[str, int], declines: dict[str, int] | None = None) -> dict[str, Any]:
    out = {
        c: getattr(r, c)
        for c in (
            "job_id",
            "number",
            "kind",
            "stage",
            "status",
            "stage_deadline",
            "reason",
            "started_at",
            "ended_at",
            "model_version_in",
            "model_version_out",
            "minimum",
            "aggregation_seconds",
            "metrics",
            "privacy",
        )
    }
    out["participants"] = sum(counts.values())
    out["dropped"] = counts.get(DROPPED, 0)
    out["declined"] = counts.get(DECLINED, 0)
    out["declines"] = declines or {}
    out["completed_by"] = counts.get(ACTIVE, 0) if r.status == "completed" else 0
    out["stages"] = timeline.described(r.stages)
    return out


def status_counts(s: Session, round_ids: list[int]) -> dict[int, dict[str, int]]:
    if not round_ids:
        return {}
    rows = s.execute(
        select(Participant.round_id, Participant.status, func.count())
        .where(Participant.round_id.in_(round_ids))
        .group_by(Participant.round_id, Participant.status)
    ).all()
    out: dict[int, dict[str, int]] = {}
    for rid, status, n in rows:
        out.setdefault(rid, {})[status] = n
    return out


def decline_reasons(s: Session, round_ids: list[int]) -> dict[int, dict[str, int]]:
    """Why devices declined each round: reason -> how many devices gave it."""
    if not round_ids:
        return {}
    rows = s.execute(
        select(Participant.round_id, Participant.reason, func.count())
        .where(Participant.round_id.in_(round_ids), Participant.status == DECLINED)
        .group_by(Participant.round_id, Participant.reason)
    ).all()
    out: dict[int, dict[str, int]] = {}
    for rid, reason, n in rows:
        out.setdefault(rid, {})[reason or "(no reason given)"] = n
    return out


def rounds_of(s: Session, job_id: int, include_stats: bool = True) -> list[dict[str, Any]]:
    if s.get(Job, job_id) is None:
        raise NotFound(f"no job {job_id}")
    q = select(Round).where(Round.job_id == job_id).order_by(Round.number)
    rounds = list(s.scalars(q))
    ids = [r.id for r in rounds]
    counts, declines = status_counts(s, ids), decline_reasons(s, ids)
    return [
        round_dict(r, counts.get(r.id, {}), declines.get(r.id))
        for r in rounds
        if include_stats or r.kind != "stats"
    ]


def round_detail(s: Session, job_id: int, number: int) -> dict[str, Any]:
    r = s.scalar(select(Round).where(Round.job_id == job_id, Round.number == number))
    if r is None:
        raise NotFound(f"job {job_id} has no round {number}")
    parts = list(
        s.scalars(select(Participant).where(Participant.round_id == r.id).order_by(Participant.device_id))
    )
    counts: dict[str, int] = {}
    declines: dict[str, int] = {}
    for p in parts:
        counts[p.status] = counts.get(p.status, 0) + 1
        if p.status == DECLINED:
            reason = p.reason or "(no reason given)"
            declines[reason] = declines.get(reason, 0) + 1
    out = round_dict(r, counts, declines)
    out["devices"] = [
        {
            "device_id": p.device_id,
            "status": p.status,
            "stage_done": p.stage_done,
            "reason": p.reason,
            "num_examples": p.num_examples,
        }
        for p in parts
    ]
    return out


def job_dict(s: Session, job: Job, with_latest: bool = True) -> dict[str, Any]:
    spec = job.spec
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "reason": job.reason,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "created_by": job.created_by,
        "rounds": spec.get("rounds", 0),
        "rounds_completed": job.rounds_completed,
        "current_version": job.current_version,
        "reference": job.reference_sha256 is not None,
        "app": (spec.get("model") or {}).get("app") or BUILTIN,
        "app_version": (spec.get("model") or {}).get("app_version"),
        "spec": spec,
        "warnings": job_warnings(spec),
        "benchmarks": job.benchmarks or {},
    }
    if spec.get("privacy"):
        out["privacy"] = privacy.summary(spec["privacy"], privacy.spent_records(s, job.id))
    if with_latest:
        latest = s.scalar(select(Round).where(Round.job_id == job.id).order_by(Round.number.desc()).limit(1))
        if latest is not None:
            out["latest_round"] = round_dict(
                latest,
                status_counts(s, [latest.id]).get(latest.id, {}),
                decline_reasons(s, [latest.id]).get(latest.id),
            )
        done = s.scalar(
            select(Round)
            .where(
                Round.job_id == job.id,
                # a gbdt job's level rounds that completed a boosting round (docs/gbdt.md)
                Round.kind.in_(("train", "level")),
                Round.model_version_out.is_not(None),
                Round.status == "completed",
            )
            .order_by(Round.number.desc())
            .limit(1)
        )
        if done is not None:
            out["latest_metrics"] = done.metrics
        out.update(cluster_dict(s, job))
    return out


def baseline_dict(b: Baseline) -> dict[str, Any]:
    return {
        "job_id": b.job_id,
        "leader": b.leader,
        "algorithm": b.algorithm,
        "metrics": b.metrics,
        "leaderboard": b.leaderboard,
        "contributions": b.contributions,
        "provenance": b.provenance,
        "created_at": b.created_at,
        "created_by": b.created_by,
    }


def cluster_dict(s: Session, job: Job) -> dict[str, Any]:
    """What the training cluster added to a job: pre-training, the AutoML baseline, the latest audit."""
    out: dict[str, Any] = {"preprocess": job.preprocess, "waiting_for": None}
    v0 = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job.id, ModelVersion.version == 0))
    if v0 is not None and v0.provenance.get("source") == "pretrain":
        p = v0.provenance
        out["pretrain"] = {
            "world_size": p.get("world_size"),
            "epochs": p.get("epochs"),
            "metrics": {
                **p.get("metrics", {}),
                **({"central": v0.metrics["central"]} if "central" in v0.metrics else {}),
            },
            "data_sha256": p.get("data_sha256"),
        }
    elif v0 is None and job.preprocess is not None and job.status == "running":
        out["waiting_for"] = "version 0 from `aicfl cluster pretrain`"
    b = s.scalar(select(Baseline).where(Baseline.job_id == job.id))
    if b is not None:
        out["baseline"] = {"leader": b.leader, "algorithm": b.algorithm, "metrics": b.metrics}
    a = s.scalar(select(Audit).where(Audit.job_id == job.id).order_by(Audit.version.desc()).limit(1))
    if a is not None:
        out["audit"] = {"version": a.version, "status": a.status, "verdict": a.verdict}
        done = s.scalar(
            select(Audit)
            .where(Audit.job_id == job.id, Audit.status == "done")
            .order_by(Audit.version.desc())
            .limit(1)
        )
        if done is not None:
            out["audit"]["latest_verdict"] = {"version": done.version, "verdict": done.verdict}
    return out


def job_warnings(spec: dict[str, Any]) -> list[str]:
    """Things an operator should know about a spec that is valid but risky."""
    warnings = []
    cohort = spec.get("cohort", {})
    if cohort.get("minimum", 2) < 2:
        warnings.append("cohort.minimum < 2: a round may aggregate a single device's update")
    if spec.get("secure") is False:
        warnings.append("secure = false: the coordinator sees every device's update (for experiments only)")
    return warnings


def list_jobs(s: Session) -> list[dict[str, Any]]:
    return [job_dict(s, j, with_latest=False) for j in s.scalars(select(Job).order_by(Job.id))]


DEVICE_COLUMNS = (
    Device.id,
    Device.name,
    Device.platform,
    Device.enrolled_at,
    Device.last_seen,
    Device.revoked_at,
    Device.agent_version,
    Device.peak_rss_mb,
)


def list_devices(
    s: Session, eligibility_window: float, limit: int | None = None, after: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Devices in enrolment order (then id), at most ``limit`` of them after the device ``after``,
    and whether more follow. Plain column rows, not ORM objects: a fleet of thousands is listed a page
    at a time, and a page costs one indexed range read (keyset paging, no OFFSET to walk past).

    Raises ``LookupError`` when ``after`` names no device."""
    now = time.time()
    q = select(*DEVICE_COLUMNS).order_by(Device.enrolled_at, Device.id)
    if after is not None:
        mark = s.scalar(select(Device.enrolled_at).where(Device.id == after))
        if mark is None:
            raise LookupError(after)
        q = q.where(or_(Device.enrolled_at > mark, and_(Device.enrolled_at == mark, Device.id > after)))
    if limit is not None:
        q = q.limit(limit + 1)
    out = []
    floor = now - eligibility_window
    for r in s.execute(q):
        row = r._asdict()
        row["online"] = r.revoked_at is None and r.last_seen is not None and r.last_seen >= floor
        out.append(row)
    more = limit is not None and len(out) > limit
    return (out[:limit] if more else out), more
