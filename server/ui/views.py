"""What each dashboard page shows, read from the database: plain dicts for the templates.

Every list a page shows is a page of a bounded size (``PAGE``), read with one query per kind of fact
for the rows on that page, so a job of thousands of rounds or a fleet of thousands of devices costs
the same per page view as a small one. The curve is the one exception: it reads one column pair per
round (the round's number and metrics), since a learning curve is the whole history.
"""

from __future__ import annotations

import math
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator import privacy, queries
from coordinator.models import Audit, Baseline, Device, Event, Job, ModelVersion, Participant, Round
from coordinator.rounds import ACTIVE, DECLINED, DROPPED
from shared.signing import b64d, model_message

PAGE = 50
# The metric a curve draws first, when a round carries it: what the demo and the CLI judge a model by.
PREFERRED_METRICS = ("auc", "accuracy", "r2", "rmse", "mae", "loss")


def pages(total: int, page: int, size: int = PAGE) -> dict[str, int]:
    """Where ``page`` (1-based) sits among ``total`` rows: clamped, with the page count."""
    count = max(1, math.ceil(total / size))
    page = min(max(1, page), count)
    return {"page": page, "pages": count, "total": total, "offset": (page - 1) * size, "size": size}


def _paged(
    s: Session, model: Any, where: list[Any], order: list[Any], page: int
) -> tuple[dict[str, int], list[Any]]:
    """Page ``page`` of ``model``'s rows matching ``where`` in ``order``, and where that page sits."""
    total = s.scalar(select(func.count()).select_from(model).where(*where)) or 0
    p = pages(total, page)
    rows = s.scalars(select(model).where(*where).order_by(*order).offset(p["offset"]).limit(p["size"]))
    return p, list(rows)


def primary_metric(names: list[str] | set[str]) -> str | None:
    """The metric a job is judged by, among those its rounds report."""
    for name in PREFERRED_METRICS:
        if name in names:
            return name
    rest = sorted(n for n in names if n != "examples")
    return rest[0] if rest else None


def _metric(m: dict[str, Any] | None, name: str | None) -> float | None:
    v = (m or {}).get(name) if name else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def reference_lines(s: Session, job: Job) -> dict[str, dict[str, Any]]:
    """The lines a job's federated metric is read against: the AutoML leader, version 0 when it was
    pre-trained, and any benchmark recorded for the job (the demo's centrally trained ceiling)."""
    out: dict[str, dict[str, Any]] = {}
    b = s.scalar(select(Baseline).where(Baseline.job_id == job.id))
    if b is not None:
        out["AutoML leader"] = {"metrics": b.metrics or {}, "detail": b.leader}
    v0 = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job.id, ModelVersion.version == 0))
    if v0 is not None and "central" in (v0.metrics or {}):
        source = (v0.provenance or {}).get("source")
        label = "version 0 (pre-trained)" if source == "pretrain" else "version 0"
        out[label] = {"metrics": v0.metrics["central"], "detail": source or ""}
    for name, bench in (job.benchmarks or {}).items():
        out[name] = {"metrics": bench.get("metrics") or {}, "detail": bench.get("description", "")}
    return out


def _latest_train(s: Session, job_ids: list[int]) -> dict[int, Round]:
    """Each job's latest completed training round."""
    if not job_ids:
        return {}
    newest = (
        select(Round.job_id, func.max(Round.number).label("n"))
        .where(Round.job_id.in_(job_ids), Round.kind == "train", Round.status == "completed")
        .group_by(Round.job_id)
        .subquery()
    )
    rows = s.scalars(
        select(Round).join(newest, (Round.job_id == newest.c.job_id) & (Round.number == newest.c.n))
    )
    return {r.job_id: r for r in rows}


def _running(s: Session, job_ids: list[int]) -> dict[int, Round]:
    if not job_ids:
        return {}
    rows = s.scalars(select(Round).where(Round.job_id.in_(job_ids), Round.status == "running"))
    return {r.job_id: r for r in rows}


def _latest_audits(s: Session, job_ids: list[int]) -> dict[int, Audit]:
    """Each job's newest finished audit."""
    if not job_ids:
        return {}
    newest = (
        select(Audit.job_id, func.max(Audit.version).label("v"))
        .where(Audit.job_id.in_(job_ids), Audit.status == "done")
        .group_by(Audit.job_id)
        .subquery()
    )
    rows = s.scalars(
        select(Audit).join(newest, (Audit.job_id == newest.c.job_id) & (Audit.version == newest.c.v))
    )
    return {a.job_id: a for a in rows}


def jobs_overview(s: Session, jobs: list[Job] | None = None) -> list[dict[str, Any]]:
    """The jobs page: one row per job (the newest 500 unless given), with its metric beside its
    reference lines."""
    if jobs is None:
        jobs = list(s.scalars(select(Job).order_by(Job.id.desc()).limit(500)))
    ids = [j.id for j in jobs]
    trained, running, audited = _latest_train(s, ids), _running(s, ids), _latest_audits(s, ids)
    out = []
    for job in jobs:
        done = trained.get(job.id)
        m = (done.metrics if done else None) or {}
        lines = reference_lines(s, job)
        names = set((m.get("central") or {}) | (m.get("federated") or {}))
        for line in lines.values():
            names |= set(line["metrics"])
        metric = primary_metric(names)
        r = running.get(job.id)
        a = audited.get(job.id)
        out.append(
            {
                "id": job.id,
                "name": job.name,
                "status": job.status,
                "reason": job.reason,
                "rounds": (job.spec or {}).get("rounds", 0),
                "rounds_completed": job.rounds_completed,
                "current_version": job.current_version,
                "metric": metric,
                "central": _metric(m.get("central"), metric),
                "federated": _metric(m.get("federated"), metric),
                "lines": {k: _metric(v["metrics"], metric) for k, v in lines.items()},
                "running": None if r is None else {"number": r.number, "kind": r.kind, "stage": r.stage},
                "verdict": None if a is None else {"version": a.version, "verdict": a.verdict},
            }
        )
    return out


def _stage_times(r: Round, now: float) -> list[dict[str, Any]]:
    """Time in each stage the round went through (the running stage counts up to now)."""
    out = []
    for st in getattr(r, "stages", None) or []:
        ended = st.get("ended")
        started = st.get("started")
        if not isinstance(started, int | float):
            continue
        out.append(
            {
                "stage": st.get("stage", "?"),
                "seconds": (ended if isinstance(ended, int | float) else now) - started,
                "running": ended is None and r.status == "running",
            }
        )
    return out


def live(s: Session, job: Job, now: float | None = None) -> dict[str, Any]:
    """The job's progress now: its status and, while a round runs, the round's stage and its devices."""
    now = time.time() if now is None else now
    r = s.scalar(select(Round).where(Round.job_id == job.id).order_by(Round.number.desc()).limit(1))
    out: dict[str, Any] = {
        "status": job.status,
        "reason": job.reason,
        "rounds": (job.spec or {}).get("rounds", 0),
        "rounds_completed": job.rounds_completed,
        "current_version": job.current_version,
        "active": job.status in ("pending", "running"),
        # Audits run after the rounds that made their versions: the page keeps refreshing until the
        # last verdict is in.
        "audits_pending": s.scalar(
            select(func.count())
            .select_from(Audit)
            .where(Audit.job_id == job.id, Audit.status.in_(("queued", "running")))
        )
        or 0,
        "round": None,
        # Differential privacy: epsilon spent of the target (docs/privacy.md); None without [privacy].
        "privacy": privacy.summary((job.spec or {}).get("privacy"), privacy.spent_records(s, job.id)),
    }
    if r is not None:
        row = queries.round_dict(
            r, queries.status_counts(s, [r.id]).get(r.id, {}), queries.decline_reasons(s, [r.id]).get(r.id)
        )
        row["stage_times"] = _stage_times(r, now)
        row["deadline_in"] = max(0.0, r.stage_deadline - now) if r.status == "running" else None
        out["round"] = row
    return out


def rounds_page(s: Session, job: Job, page: int) -> dict[str, Any]:
    """One page of the job's rounds, newest first, with their device counts and decline reasons."""
    p, rounds = _paged(s, Round, [Round.job_id == job.id], [Round.number.desc()], page)
    ids = [r.id for r in rounds]
    counts, declines = queries.status_counts(s, ids), queries.decline_reasons(s, ids)
    return {**p, "rows": [queries.round_dict(r, counts.get(r.id, {}), declines.get(r.id)) for r in rounds]}


def curve(s: Session, job: Job) -> dict[str, Any]:
    """The learning curve: per round, the central and federated value of every metric, and the lines."""
    rows = s.execute(
        select(Round.number, Round.kind, Round.metrics)
        .where(Round.job_id == job.id, Round.status == "completed", Round.kind != "stats")
        .order_by(Round.number)
    ).all()
    names: set[str] = set()
    for _, _, m in rows:
        names |= set((m or {}).get("central") or {}) | set((m or {}).get("federated") or {})
    lines = reference_lines(s, job)
    for line in lines.values():
        names |= set(line["metrics"])
    metric = primary_metric(names)
    series: dict[str, dict[str, list[float | None]]] = {}
    for name in sorted(n for n in names if n != "examples"):
        series[name] = {
            "central": [_metric((m or {}).get("central"), name) for _, _, m in rows],
            "federated": [_metric((m or {}).get("federated"), name) for _, _, m in rows],
        }
    return {
        "metric": metric,
        "rounds": [n for n, _, _ in rows],
        "kinds": [k for _, k, _ in rows],
        "series": series,
        "lines": {k: {n: _metric(v["metrics"], n) for n in series} for k, v in lines.items()},
    }


def signature_ok(public_key: Ed25519PublicKey, v: ModelVersion) -> bool:
    """Whether the version's stored signature is the coordinator's over its job, number and hash."""
    try:
        public_key.verify(b64d(v.signature), model_message(v.job_id, v.version, v.sha256))
    except (InvalidSignature, ValueError):
        return False
    return True


def provenance(v: ModelVersion) -> str:
    """Where a version came from, in words: random, pre-trained, or the round that made it."""
    source = (v.provenance or {}).get("source")
    if source == "pretrain":
        ranks = (v.provenance or {}).get("world_size")
        return f"pre-trained ({ranks} ranks)" if ranks else "pre-trained"
    if source == "initialised":
        return "random (seed {})".format((v.provenance or {}).get("seed"))
    if v.round_number is not None:
        return f"round {v.round_number}"
    return source or "-"


def versions_page(s: Session, job: Job, public_key: Ed25519PublicKey, page: int) -> dict[str, Any]:
    """One page of the job's model versions, newest first, each with its signature check and audit."""
    p, versions = _paged(
        s, ModelVersion, [ModelVersion.job_id == job.id], [ModelVersion.version.desc()], page
    )
    numbers = [v.version for v in versions]
    audits = {
        a.version: a
        for a in s.scalars(select(Audit).where(Audit.job_id == job.id, Audit.version.in_(numbers)))
    }
    rows = []
    for v in versions:
        a = audits.get(v.version)
        report = (a.report if a else None) or {}
        rows.append(
            {
                "version": v.version,
                "sha256": v.sha256,
                "signature_ok": signature_ok(public_key, v),
                "provenance": provenance(v),
                "parent": v.parent,
                "size": v.size,
                "num_parameters": v.num_parameters,
                "released": v.released,
                "created_at": v.created_at,
                "central": (v.metrics or {}).get("central") or {},
                "federated": (v.metrics or {}).get("federated") or {},
                "audit": None
                if a is None
                else {
                    "status": a.status,
                    "verdict": a.verdict,
                    "error": a.error,
                    "top_features": (report.get("top_features") or [])[:5],
                    "rank_correlation": (report.get("drift") or {}).get("rank_correlation"),
                    "plots": sorted(a.plots or {}),
                },
            }
        )
    return {**p, "rows": rows}


def devices_page(
    s: Session, eligibility_window: float, page: int, now: float | None = None
) -> dict[str, Any]:
    """One page of devices (online first, then by last check-in), with what each did in rounds."""
    now = time.time() if now is None else now
    p, devices = _paged(
        s,
        Device,
        [],
        [Device.revoked_at.is_not(None), Device.last_seen.desc().nulls_last(), Device.id],
        page,
    )
    ids = [d.id for d in devices]
    taken: dict[str, dict[str, int]] = {}
    reasons: dict[str, dict[str, int]] = {}
    if ids:
        for device_id, status, n in s.execute(
            select(Participant.device_id, Participant.status, func.count())
            .where(Participant.device_id.in_(ids))
            .group_by(Participant.device_id, Participant.status)
        ):
            taken.setdefault(device_id, {})[status] = n
        for device_id, reason, n in s.execute(
            select(Participant.device_id, Participant.reason, func.count())
            .where(Participant.device_id.in_(ids), Participant.status.in_((DECLINED, DROPPED)))
            .group_by(Participant.device_id, Participant.reason)
        ):
            reasons.setdefault(device_id, {})[reason or "(no reason given)"] = n
    rows = []
    for d in devices:
        c = taken.get(d.id, {})
        rows.append(
            {
                "id": d.id,
                "name": d.name,
                "platform": d.platform,
                "agent_version": d.agent_version or "-",
                "revoked": d.revoked_at is not None,
                "online": d.revoked_at is None
                and d.last_seen is not None
                and d.last_seen >= now - eligibility_window,
                "last_seen_ago": None if d.last_seen is None else max(0.0, now - d.last_seen),
                "rounds": sum(n for st, n in c.items() if st != DECLINED),
                "completed": c.get(ACTIVE, 0),
                "dropped": c.get(DROPPED, 0),
                "declined": c.get(DECLINED, 0),
                "reasons": sorted(reasons.get(d.id, {}).items(), key=lambda kv: -kv[1])[:3],
                "peak_rss_mb": d.peak_rss_mb,
            }
        )
    online = (
        s.scalar(
            select(func.count())
            .select_from(Device)
            .where(Device.revoked_at.is_(None), Device.last_seen >= now - eligibility_window)
        )
        or 0
    )
    return {**p, "rows": rows, "online": online}


def events_page(s: Session, page: int) -> dict[str, Any]:
    """One page of the event log, newest first."""
    p, events = _paged(s, Event, [], [Event.id.desc()], page)
    rows = [
        {"at": e.at, "actor": e.actor, "action": e.action, "target": e.target, "detail": e.detail or {}}
        for e in events
    ]
    return {**p, "rows": rows}
