"""Operator actions on jobs: submit, attach reference data, cancel. Each is recorded in the event log."""

from __future__ import annotations

import math
import re
from typing import Any

from sqlalchemy import select

from coordinator import apps, privacy
from coordinator.context import EngineContext
from coordinator.driver import RoundDriver
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.finish import RoundFinisher
from coordinator.models import Event, Job, Round
from coordinator.queries import get_job
from shared.apps import DataError
from shared.jobspec import JobSpec, validate_spec


class JobAdmin:
    """What an operator does to a job through the API."""

    def __init__(self, ctx: EngineContext, driver: RoundDriver, finisher: RoundFinisher):
        self.ctx = ctx
        self.driver = driver
        self.finisher = finisher

    def submit(self, spec_data: dict[str, Any], actor: str) -> Job:
        """Validate a job spec, import its app, and start the job (its first round opens on the next
        tick). An app without a statistics round gets its version 0 now."""
        spec = validate_spec(spec_data)
        # The noise multiplier exists (at example level written into the spec), the noised sum cannot wrap.
        spec = privacy.check_submission(spec)
        app = apps.app_for(spec)  # Invalid, with the import error's message, if it does not import here
        if app.statistics is None:
            apps.initial_vector(app, apps.context(spec, {}))  # a model that cannot be built is refused now
        with self.ctx.write() as s:
            job = Job(name=spec.name, spec=spec.model_dump(mode="json"), status="running", created_by=actor)
            s.add(job)
            s.flush()
            s.add(
                Event(
                    actor=actor,
                    action="job.submit",
                    target=str(job.id),
                    detail={"name": spec.name, "app": spec.app_ref, "app_version": app.version},
                )
            )
            if app.statistics is None:
                self.finisher.setup(s, job, spec, {})
            return job

    def set_reference(self, job_id: int, data: bytes, actor: str) -> str:
        """Attach the rows central evaluation, baselines and audits use; returns their blob hash."""
        with self.ctx.read() as s:
            job = get_job(s, job_id)
            spec, setup = JobSpec.model_validate(job.spec), job.preprocess
        app = apps.app_for(spec)
        try:
            df = app.load_reference(data, apps.context(spec, setup))
        except (DataError, ValueError) as err:
            raise Invalid(f"reference data: {err}") from None
        except Exception as err:  # the app's own parser
            raise Invalid(f"reference data: the app could not read it: {type(err).__name__}: {err}") from None
        sha = self.ctx.blobs.put(data)
        with self.ctx.write() as s:
            job = get_job(s, job_id)
            job.reference_sha256 = sha
            s.add(
                Event(
                    actor=actor,
                    action="job.reference",
                    target=str(job_id),
                    detail={"rows": _rows(df), "sha256": sha},
                )
            )
        self.ctx.reference[sha] = df
        return sha

    def set_benchmark(self, job_id: int, name: str, body: dict[str, Any], actor: str) -> dict[str, Any]:
        """Record a line the job's metric is read against (a centrally trained ceiling, a model in
        production); the same name replaces it. Returns the job's benchmarks."""
        bench = check_benchmark(name, body)
        with self.ctx.write() as s:
            job = s.scalar(self.ctx.lock(select(Job).where(Job.id == job_id)))
            if job is None:
                raise NotFound(f"no job {job_id}")
            current = dict(job.benchmarks or {})
            if name not in current and len(current) >= MAX_BENCHMARKS:
                raise Invalid(
                    f"job {job_id} already has {MAX_BENCHMARKS} benchmarks; replace one by its name"
                )
            current[name] = bench
            job.benchmarks = current
            s.add(
                Event(actor=actor, action="job.benchmark", target=str(job_id), detail={"name": name, **bench})
            )
            return current

    def cancel(self, job_id: int, actor: str) -> Job:
        """Stop a running job: its running round is abandoned, its versions stay.

        Rows are locked in the order every path that ends a round takes them: the round's row, then the
        job's. A device message holds its round's row while it drives the round and, finishing it, then
        updates the job (``devices``, ``driver.drive``); taking the job first would wait for that round
        while the message waits for the job, and PostgreSQL would abort one of the two as a deadlock.
        """
        for _ in range(_CANCEL_ATTEMPTS):
            try:
                return self._cancel(job_id, actor)
            except _RoundOpened:
                continue  # the ticker opened a round meanwhile: its row is now locked first
        raise Conflict(f"job {job_id} kept opening rounds while it was being cancelled; cancel it again")

    def _cancel(self, job_id: int, actor: str) -> Job:
        running = select(Round).where(Round.job_id == job_id, Round.status == "running").order_by(Round.id)
        with self.ctx.write() as s:
            # Waits for a device message that drives the round; a round it ended is no longer selected.
            rounds = list(s.scalars(self.ctx.lock(running)))
            job = s.scalar(self.ctx.lock(select(Job).where(Job.id == job_id)))
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.status not in ("running", "pending"):
                raise Conflict(f"job {job_id} is already {job.status}")
            # Rounds open only under the job's row (the ticker), so none opens from here on; one opened
            # between the two locks is not ours to change: start again, locking its row first.
            if set(s.scalars(running.with_only_columns(Round.id))) != {r.id for r in rounds}:
                raise _RoundOpened
            for r in rounds:
                self.driver.abandon(s, r, "job cancelled by the operator")
            job.status = "cancelled"
            job.reason = f"cancelled by {actor}"
            s.add(Event(actor=actor, action="job.cancel", target=str(job_id)))
            return job


class _RoundOpened(Exception):
    """A round of the job opened between the locks of ``JobAdmin._cancel``: its transaction rolls back."""


_CANCEL_ATTEMPTS = 3


MAX_BENCHMARKS = 16
BENCHMARK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.()-]{0,63}")


def check_benchmark(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """A benchmark as stored: up to 32 finite metrics and a short description, or Invalid naming the fault."""
    if not BENCHMARK_NAME.fullmatch(name):
        raise Invalid(
            "benchmark name: 1 to 64 letters, digits, spaces or ._()- starting with a letter or digit; "
            f"got {name[:80]!r}"
        )
    unknown = set(body) - {"metrics", "description"}
    if unknown:
        raise Invalid(
            f"benchmark: unknown field(s) {', '.join(sorted(unknown))}; expected metrics, description"
        )
    metrics = body.get("metrics")
    if not isinstance(metrics, dict) or not metrics or len(metrics) > 32:
        raise Invalid("benchmark: metrics must be an object of 1 to 32 metric names and numbers")
    for k, v in metrics.items():
        if not isinstance(k, str) or not 0 < len(k) <= 64:
            raise Invalid(f"benchmark: metric names must be 1 to 64 characters; got {str(k)[:80]!r}")
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise Invalid(f"benchmark: metric {k!r} must be a finite number; got {v!r}")
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 500:
        raise Invalid("benchmark: description must be a string of at most 500 characters")
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "description": description}


def _rows(reference: Any) -> int | None:
    try:
        return len(reference)
    except TypeError:
        return None
