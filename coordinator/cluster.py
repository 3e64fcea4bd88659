"""The central cluster's side of the engine: version 0 from pre-training, AutoML baselines, the audit queue.

The cluster talks to the coordinator only through its API; these are what those routes call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from coordinator import apps, audits
from coordinator.context import EngineContext
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import Audit, Baseline, Event, Job, ModelVersion, utcnow
from coordinator.queries import get_job
from coordinator.validation import check_baseline
from shared import codec
from shared.jobspec import JobSpec


class ClusterHooks:
    """Pre-trained version 0, AutoML baselines and the reference rows both are measured on."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx

    def reference_bytes(self, job_id: int) -> bytes:
        """The job's reference data as uploaded: the rows central evaluation and baselines use."""
        with self.ctx.read() as s:
            sha = get_job(s, job_id).reference_sha256
        if not sha:
            raise NotFound(
                f"job {job_id} has no reference data (upload it with the job or PUT .../reference)"
            )
        return self.ctx.blobs.get(sha)

    def upload_version0(self, job_id: int, body: bytes, actor: str) -> ModelVersion:
        """Register centrally pre-trained weights as a ``pretrained`` job's version 0.

        The weights must be exactly the network the federation will train: the
        job's zoo model over the preprocessing its statistics round fixed.
        """
        try:
            header, vec = codec.decode(body)  # float32 only: any other dtype is a CodecError
        except codec.CodecError as err:
            raise Invalid(f"version 0: {err}") from None
        provenance = header.get("provenance")
        if not isinstance(provenance, dict):
            raise Invalid(
                "version 0: the header needs a 'provenance' object (data hash, world size, epochs...)"
            )
        missing = [k for k in ("data_sha256", "world_size", "epochs", "metrics") if k not in provenance]
        if missing:
            raise Invalid(f"version 0: provenance lacks {', '.join(missing)}")
        if not np.isfinite(vec).all():
            raise Invalid("version 0: parameters must be finite (found NaN or infinity)")
        with self.ctx.write() as s:
            job = s.scalar(self.ctx.lock(select(Job).where(Job.id == job_id)))
            if job is None:
                raise NotFound(f"no job {job_id}")
            spec = JobSpec.model_validate(job.spec)
            if spec.model.initial != "pretrained":
                raise Conflict(
                    f'job {job_id} starts from random weights (model.initial = "random");'
                    ' submit it with model.initial = "pretrained" to pre-train its version 0'
                )
            if job.status not in ("running", "pending"):
                raise Conflict(f"job {job_id} is {job.status}")
            if job.preprocess is None:
                raise Conflict(
                    f"job {job_id}'s statistics round has not finished: its preprocessing,"
                    " and so the network's input size, is not known yet"
                )
            if s.scalar(select(ModelVersion.id).where(ModelVersion.job_id == job_id)) is not None:
                raise Conflict(f"job {job_id} already has a version 0")
            app = apps.app_for(spec)
            job_ctx = apps.context(spec, job.preprocess)
            arch = apps.describe(app, job_ctx)
            if header.get("arch") != arch:
                raise Invalid(f"version 0 was built for {header.get('arch')}, but job {job_id} trains {arch}")
            size = apps.initial_vector(app, job_ctx).size
            if vec.size != size:
                raise Invalid(f"version 0 has {vec.size} parameters; {arch} has {size}")
            vector = np.array(vec, dtype=np.float32)
            row = self.ctx.register(
                s,
                job,
                vector,
                arch,
                metrics=provenance.get("metrics") if isinstance(provenance.get("metrics"), dict) else {},
                provenance={**provenance, "source": "pretrain", "uploaded_by": actor},
            )
            central = self.ctx.central(job, spec, arch, vector)
            if central:
                row.metrics = {**row.metrics, "central": central}
            job.current_version = 0
            audits.enqueue(s, job, 0, self.ctx.clock())
            s.add(
                Event(
                    actor=actor,
                    action="job.pretrained",
                    target=str(job_id),
                    detail={k: provenance.get(k) for k in ("data_sha256", "world_size", "epochs")},
                )
            )
            return row

    def put_baseline(self, job_id: int, data: dict[str, Any], actor: str) -> Baseline:
        """Store (or replace) the job's AutoML baseline."""
        leader, algorithm, fields = check_baseline(data)
        features = fields["contributions"].get("features", {})
        with self.ctx.write() as s:
            job = get_job(s, job_id)
            spec = JobSpec.model_validate(job.spec)
            names = {f.name for f in spec.data.features} if spec.data is not None else set(features)
            strangers = sorted(set(features) - names)
            if strangers:
                raise Invalid(
                    f"baseline: contributions name features the job does not have: {', '.join(strangers)}"
                )
            row = s.scalar(select(Baseline).where(Baseline.job_id == job_id))
            if row is None:
                row = Baseline(job_id=job_id)
                s.add(row)
            row.leader = leader
            row.algorithm = algorithm
            row.created_by = actor
            row.created_at = utcnow()
            for name, value in fields.items():
                setattr(row, name, value)
            s.add(
                Event(
                    actor=actor,
                    action="job.baseline",
                    target=str(job_id),
                    detail={"leader": leader, "metrics": fields["metrics"]},
                )
            )
            s.flush()
            return row


class AuditQueue:
    """Audit workers lease the next version to audit, then report its verdict or their failure."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx

    def claim(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        with self.ctx.write() as s:
            row = audits.claim(s, worker, lease_seconds, self.ctx.clock(), skip_locked=not self.ctx.sqlite)
            return None if row is None else audits.claim_dict(s, row)

    def complete(self, audit_id: int, body: dict[str, Any]) -> Audit:
        plots = audits.decode_plots(body.get("plots", {}))
        with self.ctx.write() as s:
            return audits.complete(
                s,
                self.ctx.blobs,
                audit_id,
                str(body.get("worker", "")),
                verdict=body.get("verdict"),  # type: ignore[arg-type]
                report=body.get("report"),
                seconds=body.get("seconds", 0.0),
                plots=plots,
                skip_locked=not self.ctx.sqlite,
            )

    def fail(self, audit_id: int, body: dict[str, Any]) -> Audit:
        with self.ctx.write() as s:
            return audits.fail(
                s, audit_id, str(body.get("worker", "")), body.get("error"), skip_locked=not self.ctx.sqlite
            )
