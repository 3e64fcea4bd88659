"""The coordinator's Prometheus metrics, served on ``/metrics``; docs/monitoring.md lists every family.

Two kinds of family, because a coordinator may run as several replicas on one database:

- **Counted in this process** (``aicfl_http_*``, ``aicfl_round_*``, ``aicfl_device_bytes_received_total``):
  what this replica did. The round driver tells ``RoundMetrics`` of each stage and round it ends, once
  the transaction commits (``coordinator.observers``), so each round is counted by the one replica that
  ended it, and the replicas add up: aggregate them with ``sum()``. Deriving these histograms on scrape
  instead would make every replica report every round (sums double) and would read every round's
  timeline at each scrape.
- **Read from the database on scrape** (``aicfl_jobs``, ``aicfl_devices_*``, ``aicfl_job_*``...): the
  federation's state, the same on every replica: aggregate them with ``max()``. Each is one aggregate
  query (or one row per job), so a scrape stays cheap with thousands of rounds. Per-job families cover
  the jobs that are pending or running, or that ended in the last day (``LIVE_SECONDS``).

No label ever holds a device id: labels are a job id, a stage, a status, a round kind, a verdict, a route
template or a metric name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import timeline
from coordinator.audits import VERDICTS
from coordinator.engine import Federation
from coordinator.models import Audit, Device, Job, Participant, Round
from coordinator.observers import RoundEnded, RoundOpened, StageEnded
from coordinator.rounds import DECLINED, DROPPED, ENDED_WITHOUT_MODEL, SECURE_STAGES, STAGES

# Per-job families cover jobs that are pending, running, or ended less than this long ago.
LIVE_SECONDS = 24 * 3600
ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
AGGREGATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The stage label of received bytes: the device API's endpoints, never a path a client made up.
RECEIVED_STAGES = frozenset(
    {"enroll", "checkin", "withdraw", *SECURE_STAGES, *(s for k in STAGES.values() for s in k)}
)
# Federated metric names come from devices: only short identifiers, and a few per job, become labels.
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_METRICS_PER_SOURCE = 16


class RoundMetrics:
    """The families counted in this process; the round driver's observer."""

    def __init__(self, registry: CollectorRegistry):
        self.round_seconds = Histogram(
            "aicfl_round_seconds",
            "Rounds ended by this replica: seconds from opening to the end of the last stage",
            ["kind", "status"],
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "aicfl_round_stage_seconds",
            "Stages ended by this replica: seconds each took",
            ["kind", "stage"],
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.aggregation_seconds = Histogram(
            "aicfl_round_aggregation_seconds",
            "Training rounds completed by this replica: seconds spent aggregating the updates",
            buckets=AGGREGATION_BUCKETS,
            registry=registry,
        )
        self.devices = Counter(
            "aicfl_round_devices",
            "Devices of the rounds this replica ended, by their status at the end "
            "(active: took part to the end; dropped; declined; excluded)",
            ["kind", "status"],
            registry=registry,
        )
        self.received = Counter(
            "aicfl_device_bytes_received",
            "Request body bytes this replica read from devices, by stage (endpoint)",
            ["stage"],
            registry=registry,
        )

    def round_opened(self, event: RoundOpened) -> None:
        """Rounds are counted when they end (``round_ended``)."""

    def stage_ended(self, event: StageEnded) -> None:
        self.stage_seconds.labels(event.kind, event.stage).observe(max(event.seconds, 0.0))

    def round_ended(self, event: RoundEnded) -> None:
        if event.seconds is not None:
            self.round_seconds.labels(event.kind, event.status).observe(max(event.seconds, 0.0))
        if event.aggregation_seconds is not None:
            self.aggregation_seconds.observe(event.aggregation_seconds)
        for status, n in event.devices.items():
            self.devices.labels(event.kind, status).inc(n)

    def count_received(self, stage: str, size: int) -> None:
        self.received.labels(stage if stage in RECEIVED_STAGES else "other").inc(size)


class StateCollector:
    """The families read from the database at each scrape."""

    def __init__(self, fed: Federation, window: float):
        self.fed, self.window = fed, window

    def collect(self) -> Iterator[Metric]:
        now = self.fed.clock()
        with self.fed.read() as s:
            yield from self._totals(s, now)
            yield from self._jobs(s, now)

    def _totals(self, s: Session, now: float) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("aicfl_jobs", "Jobs by status", labels=["status"])
        for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
            jobs.add_metric([status], n)
        rounds = GaugeMetricFamily(
            "aicfl_rounds",
            "Rounds by status (abandoned, rejected: every such round so far)",
            labels=["status"],
        )
        for status, n in s.execute(select(Round.status, func.count()).group_by(Round.status)):
            rounds.add_metric([status], n)
        audits = GaugeMetricFamily(
            "aicfl_audits",
            "SHAP audits by status (queued + running: what audit workers scale on)",
            labels=["status"],
        )
        counts = dict(s.execute(select(Audit.status, func.count()).group_by(Audit.status)).all())
        for status in ("queued", "running", "done", "failed"):
            audits.add_metric([status], counts.get(status, 0))
        verdicts = GaugeMetricFamily(
            "aicfl_audit_verdicts", "Finished SHAP audits by verdict", labels=["verdict"]
        )
        done = dict(
            s.execute(
                select(Audit.verdict, func.count()).where(Audit.status == "done").group_by(Audit.verdict)
            ).all()
        )
        for verdict in VERDICTS:
            verdicts.add_metric([verdict], done.get(verdict, 0))
        enrolled_q = select(func.count()).select_from(Device).where(Device.revoked_at.is_(None))
        enrolled = GaugeMetricFamily("aicfl_devices_enrolled", "Enrolled devices (not revoked)")
        enrolled.add_metric([], s.scalar(enrolled_q) or 0)
        online = GaugeMetricFamily("aicfl_devices_online", "Devices checked in within the eligibility window")
        online.add_metric([], s.scalar(enrolled_q.where(Device.last_seen >= now - self.window)) or 0)
        yield from (jobs, rounds, online, enrolled, audits, verdicts)

    def _jobs(self, s: Session, now: float) -> Iterator[Metric]:
        cutoff = datetime.now(UTC) - timedelta(seconds=LIVE_SECONDS)
        live: dict[int, tuple[str, int]] = {}
        for job_id, status, updated, done in s.execute(
            select(Job.id, Job.status, Job.updated_at, Job.rounds_completed)
        ):
            if status in ("pending", "running") or _utc(updated) >= cutoff:
                live[job_id] = (status, done)
        running = [j for j, (status, _) in live.items() if status == "running"]
        ids = list(live)

        completed = GaugeMetricFamily(
            "aicfl_job_rounds_completed", "Training rounds the job completed", labels=["job_id"]
        )
        for j, (_, n) in live.items():
            completed.add_metric([str(j)], n)
        yield completed
        yield from self._latest_rounds(s, ids, now)
        yield from self._abandoned(s, ids, running)
        yield from self._metrics(s, ids)
        yield self._verdicts(s, ids)

    def _latest_rounds(self, s: Session, ids: list[int], now: float) -> Iterator[Metric]:
        """Participants, dropped and declined of each job's latest round; its stage's time if it runs."""
        participants = GaugeMetricFamily(
            "aicfl_job_round_participants", "Devices selected for the job's latest round", labels=["job_id"]
        )
        dropped = GaugeMetricFamily(
            "aicfl_job_round_dropped",
            "Devices dropped from the job's latest round (missed a deadline, withdrew)",
            labels=["job_id"],
        )
        declined = GaugeMetricFamily(
            "aicfl_job_round_declined", "Devices that declined the job's latest round", labels=["job_id"]
        )
        elapsed = GaugeMetricFamily(
            "aicfl_job_stage_elapsed_seconds",
            "Seconds the job's running round has been in its current stage",
            labels=["job_id", "stage"],
        )
        timeout = GaugeMetricFamily(
            "aicfl_job_stage_timeout_seconds",
            "The stage timeout of the job's running round (the stage ends at the latest then)",
            labels=["job_id", "stage"],
        )
        if ids:
            last = (
                select(Round.job_id, func.max(Round.number).label("n"))
                .where(Round.job_id.in_(ids))
                .group_by(Round.job_id)
                .subquery()
            )
            rows = s.execute(
                select(
                    Round.id, Round.job_id, Round.status, Round.stage, Round.stage_deadline, Round.stages
                ).join(last, (Round.job_id == last.c.job_id) & (Round.number == last.c.n))
            ).all()
            counts: dict[int, dict[str, int]] = {}
            for rid, status, n in s.execute(
                select(Participant.round_id, Participant.status, func.count())
                .where(Participant.round_id.in_([r.id for r in rows]))
                .group_by(Participant.round_id, Participant.status)
            ):
                counts.setdefault(rid, {})[status] = n
            for r in rows:
                job, c = str(r.job_id), counts.get(r.id, {})
                participants.add_metric([job], sum(c.values()))
                dropped.add_metric([job], c.get(DROPPED, 0))
                declined.add_metric([job], c.get(DECLINED, 0))
                if r.status != "running":
                    continue
                limit = float(self.fed.spec(s, r.job_id).cohort.stage_timeout)
                entry = timeline.current(r.stages)
                # A round opened before timelines were recorded: its stage began a timeout before its deadline.
                started = entry["started"] if entry is not None else r.stage_deadline - limit
                elapsed.add_metric([job, r.stage], max(now - started, 0.0))
                timeout.add_metric([job, r.stage], limit)
        yield from (participants, dropped, declined, elapsed, timeout)

    def _abandoned(self, s: Session, ids: list[int], running: list[int]) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "aicfl_job_rounds_abandoned",
            "Rounds of the job abandoned or rejected (aggregate out of bounds) so far",
            labels=["job_id"],
        )
        streak = GaugeMetricFamily(
            "aicfl_job_rounds_abandoned_consecutive",
            "Rounds of a running job abandoned or rejected since its last completed round",
            labels=["job_id"],
        )
        per_job: dict[int, int] = {}
        since: dict[int, int] = {}
        if ids:
            per_job = dict(
                s.execute(
                    select(Round.job_id, func.count())
                    .where(Round.job_id.in_(ids), Round.status.in_(ENDED_WITHOUT_MODEL))
                    .group_by(Round.job_id)
                ).all()
            )
        if running:
            last_done = (
                select(Round.job_id, func.max(Round.number).label("n"))
                .where(Round.job_id.in_(running), Round.status == "completed")
                .group_by(Round.job_id)
                .subquery()
            )
            since = dict(
                s.execute(
                    select(Round.job_id, func.count())
                    .outerjoin(last_done, Round.job_id == last_done.c.job_id)
                    .where(
                        Round.job_id.in_(running),
                        Round.status.in_(ENDED_WITHOUT_MODEL),
                        Round.number > func.coalesce(last_done.c.n, -1),
                    )
                    .group_by(Round.job_id)
                ).all()
            )
        for j in ids:
            total.add_metric([str(j)], per_job.get(j, 0))
        for j in running:
            streak.add_metric([str(j)], since.get(j, 0))
        yield from (total, streak)

    def _metrics(self, s: Session, ids: list[int]) -> Iterator[Metric]:
        """The latest central (reference data) and federated (device holdouts) metrics of each job."""
        family = GaugeMetricFamily(
            "aicfl_job_metric",
            "The job's latest model metrics: central on its reference data, federated on the devices' holdouts",
            labels=["job_id", "source", "metric"],
        )
        if ids:
            # Central metrics are on the latest training round; federated ones on the round before it (its
            # model is what the latest round's devices evaluated) or on the final evaluation round.
            rank = (
                func.row_number().over(partition_by=Round.job_id, order_by=Round.number.desc()).label("rank")
            )
            recent = (
                select(Round.job_id, Round.metrics, rank)
                .where(
                    Round.job_id.in_(ids), Round.status == "completed", Round.kind.in_(("train", "evaluate"))
                )
                .subquery()
            )
            found: dict[tuple[int, str], dict[str, Any]] = {}
            for job_id, metrics in s.execute(
                select(recent.c.job_id, recent.c.metrics).where(recent.c.rank <= 2).order_by(recent.c.rank)
            ):
                for source in ("central", "federated"):
                    if isinstance((metrics or {}).get(source), dict):
                        found.setdefault((job_id, source), metrics[source])
            for (job_id, source), values in sorted(found.items()):
                for name, value in _numeric(values):
                    family.add_metric([str(job_id), source, name], value)
        yield family

    def _verdicts(self, s: Session, ids: list[int]) -> Metric:
        family = GaugeMetricFamily(
            "aicfl_job_audit_verdict",
            "The verdict of the job's latest finished SHAP audit: 1 for its verdict, 0 for the others",
            labels=["job_id", "verdict"],
        )
        if ids:
            last = (
                select(Audit.job_id, func.max(Audit.version).label("v"))
                .where(Audit.job_id.in_(ids), Audit.status == "done")
                .group_by(Audit.job_id)
                .subquery()
            )
            for job_id, verdict in s.execute(
                select(Audit.job_id, Audit.verdict).join(
                    last, (Audit.job_id == last.c.job_id) & (Audit.version == last.c.v)
                )
            ):
                for v in VERDICTS:
                    family.add_metric([str(job_id), v], 1.0 if v == verdict else 0.0)
        return family


def _utc(at: datetime) -> datetime:
    """SQLite gives back naive datetimes: they were written in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _numeric(values: dict[str, Any]) -> Iterable[tuple[str, float]]:
    kept = [
        (name, float(v))
        for name, v in sorted(values.items())
        if isinstance(v, int | float) and not isinstance(v, bool) and _METRIC_NAME.fullmatch(name)
    ]
    return kept[:MAX_METRICS_PER_SOURCE]


class CoordinatorMetrics:
    """The registry behind ``/metrics``: HTTP requests, rounds, device bytes, and the database's state."""

    def __init__(self, fed: Federation, eligibility_window: float):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aicfl_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "aicfl_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry
        )
        self.rounds = RoundMetrics(self.registry)
        self.registry.register(StateCollector(fed, eligibility_window))  # type: ignore[arg-type]
        fed.driver.observers.append(self.rounds)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Count every HTTP request by route template and status, and observe its latency.

    A pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) runs
    each request in a task of its own with memory streams between them, which cost more
    coordinator CPU than a device's check-in itself.
    """

    def __init__(self, app: ASGIApp, metrics: CoordinatorMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception before the response started: the server answers 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            # The route's template (``/v1/jobs/{job_id}``), never the path itself: labels stay bounded.
            name = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)


def install(app: FastAPI, fed: Federation, eligibility_window: float) -> CoordinatorMetrics:
    """Count the app's HTTP requests and the federation's rounds, and serve them on ``/metrics``."""
    metrics = CoordinatorMetrics(fed, eligibility_window)
    app.state.metrics = metrics

    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/metrics", tags=["meta"], include_in_schema=False)
    def _metrics() -> Response:
        return metrics.exposition()

    return metrics


def count_received(request: Request, stage: str, body: bytes) -> None:
    """Count a device request's body under its stage (an app built without metrics counts nothing)."""
    metrics: CoordinatorMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rounds.count_received(stage, len(body))
