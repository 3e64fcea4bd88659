"""Operator actions on jobs: submit, attach reference data, cancel. Each is recorded in the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from coordinator.context import EngineContext
from coordinator.driver import RoundDriver
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.evaluation import check_reference
from coordinator.models import Event, Job, Round
from coordinator.queries import get_job
from shared.jobspec import JobSpec, validate_spec
from shared.tabular import DataSchemaError


class JobAdmin:
    """What an operator does to a job through the API."""

    def __init__(self, ctx: EngineContext, driver: RoundDriver):
        self.ctx = ctx
        self.driver = driver

    def submit(self, spec_data: dict[str, Any], actor: str) -> Job:
        """Validate a job spec and start the job (its first round opens on the next tick)."""
        spec = validate_spec(spec_data)
        with self.ctx.write() as s:
            job = Job(name=spec.name, spec=spec.model_dump(mode="json"), status="running", created_by=actor)
            s.add(job)
            s.flush()
            s.add(Event(actor=actor, action="job.submit", target=str(job.id), detail={"name": spec.name}))
            return job

    def set_reference(self, job_id: int, data: bytes, actor: str) -> str:
        """Attach the rows central evaluation, baselines and audits use; returns their blob hash."""
        with self.ctx.read() as s:
            spec = JobSpec.model_validate(get_job(s, job_id).spec)
        try:
            df = check_reference(data, spec.data)
        except DataSchemaError as err:
            raise Invalid(f"reference data: {err}") from None
        sha = self.ctx.blobs.put(data)
        with self.ctx.write() as s:
            job = get_job(s, job_id)
            job.reference_sha256 = sha
            s.add(
                Event(
                    actor=actor,
                    action="job.reference",
                    target=str(job_id),
                    detail={"rows": len(df), "sha256": sha},
                )
            )
        self.ctx.reference[sha] = df
        return sha

    def cancel(self, job_id: int, actor: str) -> Job:
        """Stop a running job: its running round is abandoned, its versions stay."""
        with self.ctx.write() as s:
            job = s.scalar(self.ctx.lock(select(Job).where(Job.id == job_id)))
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.status not in ("running", "pending"):
                raise Conflict(f"job {job_id} is already {job.status}")
            for r in s.scalars(select(Round).where(Round.job_id == job_id, Round.status == "running")):
                self.driver.abandon(s, r, "job cancelled by the operator")
            job.status = "cancelled"
            job.reason = f"cancelled by {actor}"
            s.add(Event(actor=actor, action="job.cancel", target=str(job_id)))
            return job
