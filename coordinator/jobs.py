"""Operator actions on jobs: submit, attach reference data, cancel. Each is recorded in the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from coordinator import apps
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


def _rows(reference: Any) -> int | None:
    try:
        return len(reference)
    except TypeError:
        return None
