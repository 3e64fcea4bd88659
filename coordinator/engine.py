"""The federation engine: jobs, rounds, device selection, aggregation.

Everything here goes through the database, so a coordinator killed at any
moment restarts and goes on: the state machine of each round is in its rows,
the deadlines are absolute times, and the aggregate of a round is recomputed
from the stored vectors whenever the running sum held in memory does not
account for exactly the devices the database says have sent theirs.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import and_, bindparam, func, insert, join, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from coordinator import audits, registry, secure
from coordinator.blobs import LocalBlobStore
from coordinator.errors import Conflict, Forbidden, Invalid, NotFound
from coordinator.evaluation import check_reference, metrics_on, weighted_mean
from coordinator.models import (
    Audit,
    Baseline,
    Device,
    Event,
    Job,
    ModelVersion,
    Participant,
    Round,
    RoundMessage,
    utcnow,
)
from coordinator.rounds import (
    ACTIVE,
    DECLINED,
    DROPPED,
    EXCLUDED,
    STAGES,
    Decision,
    ParticipantView,
    RoundView,
    decide,
    select_cohort,
    stage_index,
)
from coordinator.strategies import apply_strategy
from shared import codec
from shared.jobspec import JobSpec, validate_spec
from shared.secagg import statistics as secagg_statistics
from shared.secagg.primitives import SecAggError
from shared.secagg.protocol import finish as secagg_finish
from shared.secagg.protocol import unmask_total
from shared.tabular import DataSchemaError, Preprocessor, merge_statistics, read_table_bytes
from shared.wire import (
    CheckinRequest,
    CheckinResponse,
    ConfigureMessage,
    EvaluateMessage,
    ModelRef,
    StatsMessage,
    Task,
)
from shared.zoo import architecture, build_model, flatten_parameters, parameter_count

log = logging.getLogger("aicfl.coordinator")

MAX_EXAMPLES = 1_000_000_000
MAX_CONSECUTIVE_ABANDONED = 20


@dataclass
class EngineSettings:
    eligibility_window: float = 30.0
    idle_retry: float = 2.0
    active_retry: float = 0.5
    evaluate_after_last_round: bool = True


@dataclass
class _Accumulator:
    """The running weighted sum of one round's updates, as they arrive."""

    total: np.ndarray
    examples: int = 0
    contributors: set[str] = field(default_factory=set)
    seconds: float = 0.0


@dataclass(frozen=True)
class _RoundRow:
    """A round's row as the device-message paths read it: one Core statement, no ORM object to track."""

    id: int
    job_id: int
    number: int
    kind: str
    stage: str
    status: str
    stage_deadline: float
    secure: bool
    secagg: dict[str, Any] | None
    model_version_in: int | None
    # Active participants that had not sent the current stage's message when the row was read.
    waiting: int | None = None


@dataclass(frozen=True)
class _PartRow:
    """A device's participant row in a round, as the device-message paths read it."""

    id: int
    status: str
    stage_done: str | None
    reason: str | None


class Federation:
    """Drives every job's rounds; the API's routers call into it."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        blobs: LocalBlobStore,
        signing_key: Ed25519PrivateKey,
        settings: EngineSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.factory = factory
        self.clock = clock  # simulation mode advances a virtual clock past stage deadlines
        self.blobs = blobs
        self.key = signing_key
        self.settings = settings or EngineSettings()
        engine = factory.kw["bind"]
        # SQLite allows one writer: serialise our writers in-process rather than
        # let a read transaction fail to upgrade. PostgreSQL uses row locks.
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock: Any = threading.RLock() if self._sqlite else nullcontext()
        self._acc: dict[int, _Accumulator] = {}
        self._acc_lock = threading.Lock()
        self._reference: dict[str, Any] = {}
        # The newest version of each job, as registered here: the next round starts from it.
        self._latest: dict[int, tuple[str, dict[str, Any], np.ndarray]] = {}
        self._model_refs: dict[tuple[int, int], ModelRef] = {}
        self._job_info: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self._specs: dict[int, JobSpec] = {}  # validated job specs: a spec never changes once submitted
        self._sizes: dict[tuple[int, int | None], int] = {}  # parameters of each (job, version): fixed too

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._write_lock, self.factory() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.factory() as session:
            yield session

    def _lock(self, stmt: Any) -> Any:
        return stmt if self._sqlite else stmt.with_for_update()

    @contextmanager
    def _device_write(self) -> Iterator[secure.Db]:
        """A write transaction of a device-message path: Core statements, an ORM session only if needed."""
        with self._write_lock, self.factory.kw["bind"].begin() as conn:
            db = secure.Db(conn)
            try:
                yield db
                db.flush()
            finally:
                db.close()

    @contextmanager
    def _device_read(self) -> Iterator[secure.Db]:
        with self.factory.kw["bind"].connect() as conn:
            db = secure.Db(conn)
            try:
                yield db
            finally:
                db.close()

    # -- jobs -------------------------------------------------------------

    def submit_job(self, spec_data: dict[str, Any], actor: str) -> Job:
        spec = validate_spec(spec_data)
        with self.write() as s:
            job = Job(name=spec.name, spec=spec.model_dump(mode="json"), status="running", created_by=actor)
            s.add(job)
            s.flush()
            s.add(Event(actor=actor, action="job.submit", target=str(job.id), detail={"name": spec.name}))
            return job

    def set_reference(self, job_id: int, data: bytes, actor: str) -> str:
        with self.read() as s:
            job = self._job(s, job_id)
            spec = JobSpec.model_validate(job.spec)
        try:
            df = check_reference(data, spec.data)
        except DataSchemaError as err:
            raise Invalid(f"reference data: {err}") from None
        sha = self.blobs.put(data)
        with self.write() as s:
            job = self._job(s, job_id)
            job.reference_sha256 = sha
            s.add(
                Event(
                    actor=actor,
                    action="job.reference",
                    target=str(job_id),
                    detail={"rows": len(df), "sha256": sha},
                )
            )
        self._reference[sha] = df
        return sha

    def cancel_job(self, job_id: int, actor: str) -> Job:
        with self.write() as s:
            job = s.scalar(self._lock(select(Job).where(Job.id == job_id)))
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.status not in ("running", "pending"):
                raise Conflict(f"job {job_id} is already {job.status}")
            for r in s.scalars(select(Round).where(Round.job_id == job_id, Round.status == "running")):
                self._abandon(s, r, "job cancelled by the operator")
            job.status = "cancelled"
            job.reason = f"cancelled by {actor}"
            s.add(Event(actor=actor, action="job.cancel", target=str(job_id)))
            return job

    # -- the training cluster (through the API) ----------------------------

    def reference_bytes(self, job_id: int) -> bytes:
        """The job's reference data as uploaded: the rows central evaluation and baselines use."""
        with self.read() as s:
            sha = self._job(s, job_id).reference_sha256
        if not sha:
            raise NotFound(
                f"job {job_id} has no reference data (upload it with the job or PUT .../reference)"
            )
        return self.blobs.get(sha)

    def upload_version0(self, job_id: int, body: bytes, actor: str) -> ModelVersion:
        """Register centrally pre-trained weights as a ``pretrained`` job's version 0.

        The weights must be exactly the network the federation will train: the
        job's zoo model over the preprocessing its statistics round fixed.
        """
        try:
            header, vec = codec.decode(body)
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
        if vec.dtype != np.float32:
            raise Invalid(f"version 0: parameters must be float32, got {vec.dtype}")
        if not np.isfinite(vec).all():
            raise Invalid("version 0: parameters must be finite (found NaN or infinity)")
        with self.write() as s:
            job = s.scalar(self._lock(select(Job).where(Job.id == job_id)))
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
            pre = Preprocessor.from_dict(job.preprocess)
            arch = architecture(spec.model, pre.input_dim, pre.output_dim)
            if header.get("arch") != arch:
                raise Invalid(f"version 0 was built for {header.get('arch')}, but job {job_id} trains {arch}")
            if vec.size != parameter_count(arch):
                raise Invalid(f"version 0 has {vec.size} parameters; {arch} has {parameter_count(arch)}")
            vector = np.array(vec, dtype=np.float32)
            row = registry.register_version(
                s,
                self.blobs,
                self.key,
                job_id=job_id,
                version=0,
                vector=vector,
                arch=arch,
                preprocess=job.preprocess,
                parent=None,
                round_number=None,
                metrics=provenance.get("metrics") if isinstance(provenance.get("metrics"), dict) else {},
                provenance={**provenance, "source": "pretrain", "uploaded_by": actor},
            )
            central = self._central(job, spec, arch, vector)
            if central:
                row.metrics = {**row.metrics, "central": central}
            job.current_version = 0
            audits.enqueue(s, job, 0, self.clock())
            s.add(
                Event(
                    actor=actor,
                    action="job.pretrained",
                    target=str(job_id),
                    detail={k: provenance.get(k) for k in ("data_sha256", "world_size", "epochs")},
                )
            )
            self._latest[job_id] = (
                row.sha256,
                {"arch": arch, "preprocess": job.preprocess, "version": 0},
                vector,
            )
            return row

    def put_baseline(self, job_id: int, data: dict[str, Any], actor: str) -> Baseline:
        """Store (or replace) the job's AutoML baseline."""
        leader = data.get("leader")
        if not isinstance(leader, str) or not leader.strip() or len(leader) > 300:
            raise Invalid("baseline: 'leader' must be the leader's model id (a non-empty string)")
        fields: dict[str, Any] = {}
        for name, kind in (
            ("metrics", dict),
            ("leaderboard", list),
            ("contributions", dict),
            ("provenance", dict),
        ):
            value = data.get(name, kind())
            if not isinstance(value, kind):
                raise Invalid(f"baseline: '{name}' must be a JSON {'object' if kind is dict else 'array'}")
            fields[name] = value
        if not all(isinstance(v, int | float) and _finite(v) for v in fields["metrics"].values()):
            raise Invalid("baseline: every metric must be a finite number")
        features = fields["contributions"].get("features", {})
        if not isinstance(features, dict) or not all(
            isinstance(v, int | float) and _finite(v) for v in features.values()
        ):
            raise Invalid("baseline: contributions.features must map feature names to finite numbers")
        unknown_extra = set(data) - {
            "leader",
            "algorithm",
            "metrics",
            "leaderboard",
            "contributions",
            "provenance",
        }
        if unknown_extra:
            raise Invalid(f"baseline: unknown field(s) {', '.join(sorted(unknown_extra))}")
        algorithm = str(data.get("algorithm", ""))[:64]
        with self.write() as s:
            job = self._job(s, job_id)
            spec = JobSpec.model_validate(job.spec)
            names = {f.name for f in spec.data.features}
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

    def claim_audit(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        with self.write() as s:
            row = audits.claim(s, worker, lease_seconds, self.clock(), skip_locked=not self._sqlite)
            return None if row is None else audits.claim_dict(s, row)

    def complete_audit(self, audit_id: int, body: dict[str, Any]) -> Audit:
        plots = audits.decode_plots(body.get("plots", {}))
        with self.write() as s:
            return audits.complete(
                s,
                self.blobs,
                audit_id,
                str(body.get("worker", "")),
                verdict=body.get("verdict"),  # type: ignore[arg-type]
                report=body.get("report"),
                seconds=body.get("seconds", 0.0),
                plots=plots,
                skip_locked=not self._sqlite,
            )

    def fail_audit(self, audit_id: int, body: dict[str, Any]) -> Audit:
        with self.write() as s:
            return audits.fail(
                s, audit_id, str(body.get("worker", "")), body.get("error"), skip_locked=not self._sqlite
            )

    def _job(self, s: Session, job_id: int) -> Job:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    # -- device side ------------------------------------------------------

    def checkin(self, device_id: str, req: CheckinRequest) -> CheckinResponse:
        now = self.clock()
        # Check-ins are the coordinator's most frequent request: one prebuilt statement reads the device and
        # its running rounds, no ORM objects, and the write lock is taken only to write the device's row.
        task: Task | None = None
        with self._device_read() as s:
            found = secure.run(s, _CHECKIN, device=device_id).all()
            if not found:  # pragma: no cover - authenticated before
                raise NotFound("unknown device")
            last_seen, agent_version, peak_rss_mb = found[0][:3]
            rows = [row[3:] for row in found if row[3] is not None]  # rounds.id is NULL when there is none
            for row in rows:
                r, stage_done = _RoundRow(*row[:-1]), row[-1]
                if (
                    stage_index(r.kind, stage_done, r.secure) < stage_index(r.kind, r.stage, r.secure)
                    and now < r.stage_deadline
                ):
                    task = self._task(s, r, device_id)
                    break
        # Write the device row only when something changed or a second has passed.
        if (
            last_seen is None
            or now - last_seen >= 1.0
            or (req.agent_version and req.agent_version != agent_version)
            or (req.peak_rss_mb is not None and req.peak_rss_mb != peak_rss_mb)
        ):
            with self._device_write() as s:
                secure.run(
                    s,
                    _DEVICE_SEEN_SET,
                    device=device_id,
                    seen=now if last_seen is None or now - last_seen >= 1.0 else last_seen,
                    version=req.agent_version or agent_version,
                    rss=peak_rss_mb if req.peak_rss_mb is None else req.peak_rss_mb,
                )
        retry = self.settings.active_retry if rows else self.settings.idle_retry
        return CheckinResponse(retry_after=retry, task=task)

    def _job_spec(
        self, s: Session | secure.Db, job_id: int, need_preprocess: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A job's spec and preprocessing, cached: both are written once and never change."""
        cached = self._job_info.get(job_id)
        if cached is None or (need_preprocess and cached[1] is None):
            job = self._job(secure.orm(s), job_id)
            cached = self._job_info[job_id] = (job.spec, job.preprocess)
        return cached

    def _task(self, s: Session | secure.Db, r: Round | _RoundRow, device_id: str | None = None) -> Task:
        spec, preprocess = self._job_spec(s, r.job_id, r.kind != "stats")
        model = None
        if r.model_version_in is not None:
            key = (r.job_id, r.model_version_in)
            model = self._model_refs.get(key)
            if model is None:  # versions never change once written
                mv = registry.get_version(secure.orm(s), r.job_id, r.model_version_in)
                model = ModelRef(version=mv.version, sha256=mv.sha256, signature=mv.signature, size=mv.size)
                self._model_refs[key] = model
        return Task(
            round_id=r.id,
            job_id=r.job_id,
            round=r.number,
            kind=r.kind,  # type: ignore[arg-type]
            stage=r.stage,  # type: ignore[arg-type]
            deadline=r.stage_deadline,
            seed=(spec.get("seed", 0) * 1_000_003 + r.number) % (2**31),
            spec=spec,
            model=model,
            preprocess=preprocess if r.kind != "stats" else None,
            secagg=secure.SecureRound(s, r).task(s, device_id)
            if r.secure and r.secagg and device_id
            else None,
        )

    def model_blob_for_device(self, device_id: str, job_id: int, version: int) -> bytes:
        """A model's bytes, for a device selected in a running round of that job."""
        with self.read() as s:
            selected = s.scalar(
                select(Participant.id)
                .join(Round, Participant.round_id == Round.id)
                .where(Participant.device_id == device_id, Round.job_id == job_id, Round.status == "running")
                .limit(1)
            )
            if selected is None:
                raise Forbidden(f"device {device_id} is not selected in a running round of job {job_id}")
            mv = registry.get_version(s, job_id, version)
            sha = mv.sha256
        return self.blobs.get(sha)

    def _load(
        self, s: Session | secure.Db, device_id: str, round_id: int, lock: bool = True
    ) -> tuple[_RoundRow | None, _PartRow | None]:
        """The round (its row locked for this transaction when ``lock``) and the device's row in it."""
        stmt = _PARTICIPATION if self._sqlite or not lock else _PARTICIPATION_LOCKED
        row = secure.run(s, stmt, device=device_id, round=round_id).one_or_none()
        if row is None:
            return None, None
        n = len(_ROUND_COLUMNS)
        r = _RoundRow(*row[: n + 1])  # the round's columns, then how many are waiting
        return r, (None if row[n + 1] is None else _PartRow(*row[n + 1 :]))

    def _participation(
        self,
        s: Session | secure.Db,
        device_id: str,
        round_id: int,
        stage: str,
        now: float,
        lock: bool = True,
    ) -> tuple[_RoundRow, _PartRow]:
        """The round and the device's place in it, after every check of stage and deadline."""
        r, p = self._load(s, device_id, round_id, lock)
        return self._check_participation(r, p, device_id, round_id, stage, now)

    def _check_participation(
        self,
        r: _RoundRow | None,
        p: _PartRow | None,
        device_id: str,
        round_id: int,
        stage: str,
        now: float,
    ) -> tuple[_RoundRow, _PartRow]:
        if r is None:
            raise NotFound(f"no round {round_id}")
        if p is None:
            raise Forbidden(f"device {device_id} was not selected for round {round_id}")
        if r.status != "running":
            raise Conflict(f"round {round_id} is {r.status}; the message is stale")
        if p.status != ACTIVE:
            raise Conflict(
                f"device {device_id} is {p.status} in round {round_id}"
                + (f": {p.reason}" if p.reason else "")
            )
        if r.stage != stage:
            raise Conflict(f"round {round_id} is in stage {r.stage!r}, not {stage!r}")
        if stage_index(r.kind, p.stage_done, r.secure) >= stage_index(r.kind, stage, r.secure):
            raise Conflict(f"device {device_id} already sent its {stage!r} message for round {round_id}")
        if now >= r.stage_deadline:
            raise Conflict(f"the deadline of stage {stage!r} in round {round_id} has passed")
        return r, p

    def handle_configure(self, device_id: str, round_id: int, msg: ConfigureMessage) -> None:
        now = self.clock()
        with self._device_write() as s:
            r, p = self._participation(s, device_id, round_id, "configure", now)
            if msg.accepted:
                secure.run(s, _STAGE_DONE, pid=p.id, done="configure")
            else:
                reason = (msg.reason or "declined without a reason")[:2000]
                secure.run(
                    s,
                    update(Participant).where(Participant.id == p.id).values(status=DECLINED, reason=reason),
                )
                log.info("device %s declined round %s of job %s: %s", device_id, r.number, r.job_id, reason)
            secure.run(
                s,
                _ADD_MESSAGE,
                round_id=round_id,
                device_id=device_id,
                stage="configure",
                payload=msg.model_dump(),
            )
            self._maybe_drive(s, r, now, _one_less(r))

    def handle_input_json(self, device_id: str, round_id: int, body: dict[str, Any]) -> None:
        now = self.clock()
        with self._device_write() as s:
            r, p = self._participation(s, device_id, round_id, "input", now)
            try:
                if r.kind == "stats":
                    payload = StatsMessage.model_validate(body).model_dump()
                    _check_statistics(payload["statistics"])
                elif r.kind == "evaluate":
                    ev = EvaluateMessage.model_validate(body)
                    _check_metrics(ev.metrics)
                    payload = ev.model_dump()
                else:
                    raise Invalid(
                        f"round {round_id} is a training round: send the update as application/octet-stream"
                    )
            except ValueError as err:
                raise Invalid(f"{r.kind} message: {err}") from None
            secure.run(
                s, _ADD_MESSAGE, round_id=round_id, device_id=device_id, stage="input", payload=payload
            )
            secure.run(s, _STAGE_DONE, pid=p.id, done="input")
            self._maybe_drive(s, r, now, _one_less(r))

    def handle_update(self, device_id: str, round_id: int, body: bytes) -> None:
        """A device's model update: checked, stored, added to the running sum."""
        now = self.clock()
        with self._device_read() as s:
            r, _ = self._participation(s, device_id, round_id, "input", now, lock=False)
            if r.kind != "train":
                raise Invalid(f"round {round_id} is a {r.kind} round: send a JSON message")
            numel = self._num_parameters(s, r)
        try:
            header, vec = codec.decode(body, expected_numel=numel)
        except codec.CodecError as err:
            raise Invalid(f"update: {err}") from None
        meta = _check_update_header(header, round_id)
        sha = self.blobs.put(body)
        with self._device_write() as s:
            r, p = self._participation(s, device_id, round_id, "input", self.clock())
            secure.run(
                s,
                _ADD_MESSAGE,
                round_id=round_id,
                device_id=device_id,
                stage="input",
                payload=meta,
                blob_sha256=sha,
            )
            secure.run(
                s,
                update(Participant)
                .where(Participant.id == p.id)
                .values(stage_done="input", num_examples=meta["num_examples"]),
            )
        self._accumulate(round_id, device_id, vec, meta["num_examples"])
        with self._device_write() as s:
            r2, _ = self._load(s, device_id, round_id)
            if r2 is not None and r2.status == "running":
                self._maybe_drive(s, r2, self.clock())

    # -- secure rounds (SecAgg+) ---------------------------------------------

    def _exclude_in(
        self, s: Session | secure.Db, r: _RoundRow, device_id: str, p: _PartRow, reason: str
    ) -> None:
        """Take a device out of a secure round for a message that cannot be used; the round goes on."""
        secure.run(
            s, update(Participant).where(Participant.id == p.id).values(status=EXCLUDED, reason=reason[:2000])
        )
        session = secure.orm(s)
        session.add(
            Event(
                actor="coordinator",
                action="participant.exclude",
                target=f"{r.job_id}/{r.number}/{device_id}",
                detail={"reason": reason[:500]},
            )
        )
        log.warning("job %s round %s: excluded %s: %s", r.job_id, r.number, device_id, reason)
        self._drive(session, self._orm_round(session, r), self.clock())

    def _exclude(self, device_id: str, round_id: int, reason: str) -> None:
        with self._device_write() as s:
            r, p = self._load(s, device_id, round_id)
            if r is not None and p is not None and p.status == ACTIVE and r.status == "running":
                self._exclude_in(s, r, device_id, p, reason)

    def _secure_message(
        self, s: Session | secure.Db, device_id: str, round_id: int, stage: str, lock: bool = True
    ) -> tuple[_RoundRow, _PartRow, str | None]:
        """The round and participant for a secure-stage message, or the reason to exclude its sender."""
        r, p = self._load(s, device_id, round_id, lock)
        if r is not None and not r.secure:
            raise Invalid(f"round {round_id} does not use secure aggregation")
        if (
            r is not None
            and p is not None
            and r.status == "running"
            and p.status == ACTIVE
            and r.stage != stage
        ):
            return r, p, f"sent a {stage!r} message while the round is in stage {r.stage!r}"
        r, p = self._check_participation(r, p, device_id, round_id, stage, self.clock())
        return r, p, None

    def handle_secure_json(
        self, device_id: str, round_id: int, stage: str, raw: bytes | dict[str, Any]
    ) -> None:
        """advertise_keys, share_keys or unmask: checked, stored, and the round driven on.

        A message that is malformed, wrongly signed, addressed wrongly or sent
        in another stage excludes its sender from the round (reason recorded);
        it never reaches the arithmetic.
        """
        if stage not in secure.JSON_STAGES:
            raise NotFound(f"no stage {stage!r} takes a JSON message")
        body: Any = raw
        if isinstance(raw, bytes | bytearray):
            try:
                body = json.loads(raw or b"{}")
            except (ValueError, RecursionError):
                body = None
        problem: str | None = None
        with self._device_write() as s:
            r, p, problem = self._secure_message(s, device_id, round_id, stage)
            if problem is None and not isinstance(body, dict):
                problem = f"{stage} message refused: not a JSON object"
            if problem is None:
                sr = secure.SecureRound(s, r)
                try:
                    if stage == "advertise_keys":
                        payload = sr.check_advertise(s, device_id, body)
                    elif stage == "share_keys":
                        payload = sr.check_share_keys(device_id, body)
                    else:
                        payload = sr.check_unmask(device_id, body)
                except secure.Refused as err:
                    problem = f"{stage} message refused: {err}"
                else:
                    secure.run(
                        s, _ADD_MESSAGE, round_id=round_id, device_id=device_id, stage=stage, payload=payload
                    )
                    secure.run(s, _STAGE_DONE, pid=p.id, done=stage)
                    self._maybe_drive(s, r, self.clock(), _one_less(r))
            if problem is not None:
                self._exclude_in(s, r, device_id, p, problem)
        if problem is not None:
            raise Invalid(f"device excluded from round {round_id}: {problem}")

    def handle_masked_input(self, device_id: str, round_id: int, body: bytes) -> None:
        """A masked vector: checked, stored (it reveals nothing alone) and added to the running sum."""
        problem: str | None = None
        with self._device_read() as s:
            r, _, problem = self._secure_message(s, device_id, round_id, "masked_input", lock=False)
            if r.kind == "stats":
                numel = len(secure.SecureRound(s, r).layout())
            else:
                numel = self._num_parameters(s, r) + 1
        if problem is None:
            try:
                header, vec = codec.decode(body, expected_numel=numel, dtype="uint64")
                if header.get("kind") != "masked_input":
                    raise Invalid("header kind must be 'masked_input'")
                meta = _check_update_header({**header, "kind": "update", "num_examples": 1}, round_id)
            except (codec.CodecError, Invalid, Conflict) as err:
                problem = f"masked input refused: {getattr(err, 'detail', str(err))}"
        if problem is not None:
            self._exclude(device_id, round_id, problem)
            raise Invalid(f"device excluded from round {round_id}: {problem}")
        meta.pop("num_examples")
        # With replicas (PostgreSQL) whichever one finishes the round needs every vector: each is stored. One
        # coordinator process (SQLite) keeps the running sum and stores it once, when the stage ends.
        name = None if self._sqlite else self._spool(body)
        added = False
        try:
            with self._device_write() as s:
                r, p = self._participation(s, device_id, round_id, "masked_input", self.clock())
                secure.run(
                    s,
                    _ADD_MESSAGE,
                    round_id=round_id,
                    device_id=device_id,
                    stage="masked_input",
                    payload=meta,
                    blob_sha256=name,
                )
                secure.run(s, _STAGE_DONE, pid=p.id, done="masked_input")
                # Into the running sum before the commit, so that this message may end the stage itself.
                added = self._accumulate(round_id, device_id, vec, 0)
                self._maybe_drive(s, r, self.clock(), _one_less(r))
        except BaseException:
            if name is not None:
                self.blobs.delete(name)
            if added:  # not committed: take the vector out of the running sum again (exact modulo 2**64)
                with self._acc_lock:
                    acc = self._acc.get(round_id)
                    if acc is not None and device_id in acc.contributors:
                        acc.total -= vec
                        acc.contributors.discard(device_id)
            raise

    def _spool(self, body: bytes) -> str:
        """Keep a masked vector (or a masked sum) in the blob store until its round ends, so that a restarted
        coordinator or another replica can still add it; returns the name it is stored under.

        The name is 256 random bits, not the body's SHA-256: content addressing buys nothing for data
        written once, read at most once and deleted with its round, and hashing 8 MB costs as much as
        writing it.
        """
        name = secrets.token_hex(32)
        path = self.blobs.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as fh:  # read only once its message row is committed, after this returns
            fh.write(body)
        return name

    def _accumulate(self, round_id: int, device_id: str, vec: np.ndarray, n: int) -> bool:
        """Add a vector to the round's running sum; False when it was not added (already in, or misfit)."""
        with self._acc_lock:
            # This thread's CPU time: what the addition costs, not the wait for the lock or the GIL
            # while other uploads are being received.
            t0 = time.thread_time()
            acc = self._acc.get(round_id)
            if acc is None:
                acc = self._acc[round_id] = _Accumulator(total=np.zeros(vec.size, dtype=vec.dtype))
            if device_id in acc.contributors or acc.total.size != vec.size or acc.total.dtype != vec.dtype:
                return False
            acc.total += vec  # updates arrive weighted by their example counts
            acc.examples += n
            acc.contributors.add(device_id)
            acc.seconds += time.thread_time() - t0
            return True

    # -- the driver -------------------------------------------------------

    def tick(self) -> None:
        """One pass over every running job: advance rounds, open new ones."""
        with self.read() as s:
            job_ids = list(s.scalars(select(Job.id).where(Job.status == "running")))
        for job_id in job_ids:
            try:
                self._tick_job(job_id)
            except Exception:  # noqa: BLE001 - one job's failure must not stop the others
                log.exception("tick of job %s failed", job_id)

    def _tick_job(self, job_id: int) -> None:
        now = self.clock()
        with self.write() as s:
            q = select(Job).where(Job.id == job_id)
            job = s.scalar(q if self._sqlite else q.with_for_update(skip_locked=True))
            if job is None or job.status != "running":
                return
            current = s.scalar(select(Round).where(Round.job_id == job_id, Round.status == "running"))
            if current is not None:
                self._drive(s, current, now)
                return
            self._open_round(s, job, now)

    def _maybe_drive(
        self, s: Session | secure.Db, r: Round | _RoundRow, now: float, waiting: int | None = None
    ) -> None:
        """Drive the round only if this message may have completed its stage (the ticker handles deadlines).

        ``waiting``: the active participants yet to send this stage's message, when the caller knows.
        """
        if waiting is None:
            waiting = secure.run(s, _WAITING, round=r.id, stage=r.stage).scalar()
        if not waiting or now >= r.stage_deadline:
            self._drive(secure.orm(s), self._orm_round(secure.orm(s), r), now)
        elif r.secure and r.stage == "unmask" and secure.SecureRound(s, r).can_unmask():
            # Every secret has its t shares: the devices still silent cannot change the sum.
            self._drive(secure.orm(s), self._orm_round(secure.orm(s), r), now, unmask_ready=True)

    def _orm_round(self, s: Session, r: Round | _RoundRow) -> Round:
        """The round as an ORM object, to change it (its row is already locked by this transaction)."""
        if isinstance(r, Round):
            return r
        row = s.get(Round, r.id)
        if row is None:  # pragma: no cover - read in this transaction
            raise NotFound(f"no round {r.id}")
        return row

    def _num_parameters(self, s: Session | secure.Db, r: _RoundRow) -> int:
        """The size of the model a training round starts from."""
        key = (r.job_id, r.model_version_in)
        if key not in self._sizes:
            n = secure.run(s, _NUM_PARAMETERS, job=r.job_id, version=r.model_version_in).scalar()
            if n is None:
                raise NotFound(f"job {r.job_id} has no model version {r.model_version_in}")
            self._sizes[key] = int(n)
        return self._sizes[key]

    def _spec(self, s: Session, job_id: int) -> JobSpec:
        """A job's validated spec, read once (a spec never changes once submitted)."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = JobSpec.model_validate(self._job(s, job_id).spec)
        return spec

    def _drive(self, s: Session, r: Round, now: float, unmask_ready: bool = False) -> None:
        # The participants as rows, not ORM objects: the device-message paths change them with Core statements.
        parts = [ParticipantView(*row) for row in secure.run(s, _PARTICIPANTS, round=r.id)]
        view = RoundView(
            kind=r.kind,
            stage=r.stage,
            deadline=r.stage_deadline,
            minimum=r.minimum,
            participants=tuple(parts),
            secure=r.secure,
        )
        d = decide(view, now)
        if (
            d.action == "wait"
            and r.secure
            and r.stage == "unmask"
            and (unmask_ready or secure.SecureRound(s, r).can_unmask())
        ):
            # Every secret has its t shares: the devices still silent cannot change the sum.
            d = Decision("finish")
        if d.action == "wait":
            return
        if d.drop:
            reason = f"missed the deadline of stage {r.stage!r}"
            secure.run(s, _DROP, round=r.id, devices=list(d.drop), new_status=DROPPED, why=reason)
            parts = [replace(p, status=DROPPED) if p.device_id in d.drop else p for p in parts]
        if d.action == "abandon":
            self._abandon(s, r, d.reason or "abandoned")
        elif d.action == "advance":
            spec = self._spec(s, r.job_id)
            if r.secure and r.stage == "configure":
                accepted = sorted(p.device_id for p in parts if p.status == ACTIVE)
                try:
                    r.secagg = secure.setup(accepted, spec.secagg, r.job_id, r.number)
                    if r.kind == "stats":
                        r.secagg = {**r.secagg, "vocabulary": secure.merged_vocabulary(s, r, accepted)}
                except ValueError as err:
                    self._abandon(s, r, f"secure aggregation cannot run with {len(accepted)} devices: {err}")
                    return
            if r.secure and r.stage == "masked_input" and self._sqlite:
                lost = self._store_masked_sum(s, r)
                if lost is not None:
                    self._abandon(s, r, lost)
                    return
            r.stage = d.next_stage or r.stage
            r.stage_deadline = now + spec.cohort.stage_timeout
        else:
            job = self._job(s, r.job_id)
            try:
                self._finish(s, job, r, [p for p in parts if p.status == ACTIVE])
            except (Invalid, DataSchemaError, ValueError, SecAggError) as err:
                self._abandon(s, r, f"aggregation failed: {err}")
                if r.kind == "stats":
                    job.status = "failed"
                    job.reason = f"statistics round failed: {err}"

    def _abandon(self, s: Session, r: Round, reason: str) -> None:
        r.status = "abandoned"
        r.reason = reason
        r.ended_at = utcnow()
        self._discard_round_data(s, r)
        job = self._job(s, r.job_id)
        s.add(
            Event(
                actor="coordinator",
                action="round.abandon",
                target=f"{job.id}/{r.number}",
                detail={"reason": reason},
            )
        )
        log.warning("job %s round %s abandoned: %s", job.id, r.number, reason)
        recent = list(
            s.scalars(
                select(Round.status)
                .where(Round.job_id == job.id)
                .order_by(Round.number.desc())
                .limit(MAX_CONSECUTIVE_ABANDONED)
            )
        )
        if (
            len(recent) >= MAX_CONSECUTIVE_ABANDONED
            and all(x == "abandoned" for x in recent)
            and job.status == "running"
        ):
            job.status = "failed"
            job.reason = f"{MAX_CONSECUTIVE_ABANDONED} rounds in a row were abandoned; last: {reason}"

    def _discard_round_data(self, s: Session, r: Round) -> None:
        with self._acc_lock:
            self._acc.pop(r.id, None)
        stored_sum = (r.secagg or {}).get("masked_sum")
        if stored_sum:
            self.blobs.delete(stored_sum["blob"])
        shas = s.scalars(
            select(RoundMessage.blob_sha256).where(
                RoundMessage.round_id == r.id, RoundMessage.blob_sha256.is_not(None)
            )
        )
        for sha in shas:
            if sha:
                self.blobs.delete(sha)

    def _eligible(self, s: Session, job: Job, now: float) -> list[str]:
        busy = (
            select(Participant.device_id)
            .join(Round, Participant.round_id == Round.id)
            .where(Round.status == "running", Participant.status == ACTIVE)
        )
        declined = (
            select(Participant.device_id)
            .join(Round, Participant.round_id == Round.id)
            .where(Round.job_id == job.id, Participant.status == DECLINED)
        )
        return list(
            s.scalars(
                select(Device.id).where(
                    Device.revoked_at.is_(None),
                    Device.last_seen >= now - self.settings.eligibility_window,
                    Device.id.not_in(busy),
                    Device.id.not_in(declined),
                )
            )
        )

    def _next_kind(self, job: Job, spec: JobSpec, s: Session) -> str | None:
        if job.preprocess is None:
            return "stats"
        if job.rounds_completed < spec.rounds:
            return "train"
        if self.settings.evaluate_after_last_round and spec.evaluation.federated:
            evaluated = s.scalar(
                select(Round.id).where(
                    Round.job_id == job.id, Round.kind == "evaluate", Round.status == "completed"
                )
            )
            if evaluated is None:
                return "evaluate"
        return None

    def _open_round(self, s: Session, job: Job, now: float) -> None:
        spec = JobSpec.model_validate(job.spec)
        kind = self._next_kind(job, spec, s)
        if kind is None:
            job.status = "completed"
            s.add(Event(actor="coordinator", action="job.complete", target=str(job.id)))
            return
        if kind == "train" and job.current_version is None:
            return  # a pretrained job waits for `aicfl cluster pretrain` to upload version 0
        if kind == "train" and audits.gate_holds(s, job, spec, now):
            return  # the audit gate: the next round starts from a version whose audit is in
        eligible = self._eligible(s, job, now)
        waited = None if job.waiting_since is None else now - job.waiting_since
        cohort = select_cohort(
            eligible,
            target=spec.cohort.target,
            minimum=spec.cohort.minimum,
            seed=spec.seed,
            round_number=job.next_round,
            waited=waited,
            selection_timeout=spec.cohort.selection_timeout,
        )
        if cohort is None:
            if len(eligible) >= spec.cohort.minimum and job.waiting_since is None:
                job.waiting_since = now
            elif len(eligible) < spec.cohort.minimum:
                job.waiting_since = None
            return
        r = Round(
            job_id=job.id,
            number=job.next_round,
            kind=kind,
            # SecAgg+ parameters and the neighbour graph are fixed once configure says who takes part.
            secure=kind in ("train", "stats") and spec.secure,
            secagg=None,
            stage=STAGES[kind][0],
            stage_deadline=now + spec.cohort.stage_timeout,
            minimum=spec.cohort.minimum,
            model_version_in=job.current_version if kind != "stats" else None,
        )
        s.add(r)
        s.flush()
        s.add_all(Participant(round_id=r.id, device_id=d) for d in cohort)
        job.next_round += 1
        job.waiting_since = None
        log.info("job %s round %s (%s) opened with %d devices", job.id, r.number, kind, len(cohort))

    # -- aggregation ------------------------------------------------------

    def _finish(self, s: Session, job: Job, r: Round, active: list[ParticipantView]) -> None:
        spec = JobSpec.model_validate(job.spec)
        msgs = {
            m.device_id: m
            for m in s.scalars(
                select(RoundMessage).where(RoundMessage.round_id == r.id, RoundMessage.stage == "input")
            )
        }
        senders = [p.device_id for p in active if p.device_id in msgs]
        if r.kind == "stats" and r.secure:
            sr = secure.SecureRound(s, r)
            total, _ = self._masked_sum(r, sr, len(sr.layout()))
            merged = secagg_statistics.decode(
                unmask_total(total, **sr.reconstruction_inputs()), spec.data, sr.vocabulary
            )
            self._finish_stats(s, job, spec, [merged])
        elif r.kind == "stats":
            self._finish_stats(s, job, spec, [msgs[d].payload["statistics"] for d in senders])
        elif r.kind == "train" and r.secure:
            self._finish_train(s, job, spec, r, [], secure.SecureRound(s, r))
        elif r.kind == "train":
            self._finish_train(s, job, spec, r, [msgs[d] for d in senders])
        else:
            fed = weighted_mean(
                [(int(msgs[d].payload["examples"]), msgs[d].payload["metrics"]) for d in senders]
            )
            r.metrics = {"federated": fed}
            self._record_federated(s, job, r.model_version_in, fed)
        r.status = "completed"
        r.ended_at = utcnow()
        s.add(
            Event(
                actor="coordinator",
                action="round.complete",
                target=f"{job.id}/{r.number}",
                detail={"participants": len(senders)},
            )
        )

    def _finish_stats(self, s: Session, job: Job, spec: JobSpec, stats: list[dict[str, Any]]) -> None:
        merged = merge_statistics(stats)
        pre = Preprocessor.from_statistics(merged, spec.data)
        job.preprocess = pre.to_dict()
        arch = architecture(spec.model, pre.input_dim, pre.output_dim)
        existing = s.scalar(
            select(ModelVersion).where(ModelVersion.job_id == job.id, ModelVersion.version == 0)
        )
        if existing is not None:
            header, _ = registry.load_vector(self.blobs, existing)
            if header.get("arch") != arch:
                raise Invalid(
                    f"version 0 was built for {header.get('arch')}, but the federation's data needs {arch}"
                )
            job.current_version = 0
            return
        if spec.model.initial == "pretrained":
            # `aicfl cluster pretrain` reads this preprocessing, trains exactly this network
            # centrally and uploads it as version 0; training rounds wait for it.
            s.add(
                Event(
                    actor="coordinator",
                    action="job.awaiting_pretrain",
                    target=str(job.id),
                    detail={"arch": arch},
                )
            )
            return
        model = build_model(arch, seed=spec.seed)
        vector = flatten_parameters(model)
        row = registry.register_version(
            s,
            self.blobs,
            self.key,
            job_id=job.id,
            version=0,
            vector=vector,
            arch=arch,
            preprocess=job.preprocess,
            parent=None,
            round_number=None,
            provenance={"source": "initialised", "seed": spec.seed, "statistics_rows": merged.get("rows")},
        )
        audits.enqueue(s, job, 0, self.clock())
        self._latest[job.id] = (
            row.sha256,
            {"arch": arch, "preprocess": job.preprocess, "version": 0},
            vector,
        )
        job.current_version = 0

    def _finish_train(
        self,
        s: Session,
        job: Job,
        spec: JobSpec,
        r: Round,
        msgs: list[RoundMessage],
        sr: secure.SecureRound | None = None,
    ) -> None:
        t0 = time.perf_counter()
        current_row = registry.get_version(s, job.id, r.model_version_in)
        header, current = self._vector(job.id, current_row)
        unmask_seconds: float | None = None
        # What each contributor said beside its vector (example count, loss, metrics), in sender order.
        payloads = [m.payload for m in msgs]
        if sr is not None:
            payloads = [p for _, p in sorted(sr.payloads("masked_input").items())]
            total, incremental = self._masked_sum(r, sr, current.size + 1)
            t_unmask = time.perf_counter()
            mean_delta, examples = secagg_finish(unmask_total(total, **sr.reconstruction_inputs()), sr.params)
            unmask_seconds = time.perf_counter() - t_unmask
            mean: np.ndarray = current + mean_delta
        else:
            total, examples, incremental = self._plain_sum(r, msgs, current.size)
            mean = current + total / np.float32(examples)
        state = self.blobs.get(job.strategy_state_sha256) if job.strategy_state_sha256 else None
        new, new_state = apply_strategy(
            spec.strategy, current, mean, examples, job.rounds_completed + 1, state
        )
        version = registry.get_version(s, job.id).version + 1
        # Under secure aggregation a device's example count stays inside the masked sum.
        train_loss = weighted_mean(
            [(int(m.get("num_examples", 1)), {"loss": m["train_loss"]}) for m in payloads]
        )
        row = registry.register_version(
            s,
            self.blobs,
            self.key,
            job_id=job.id,
            version=version,
            vector=new,
            arch=header["arch"],
            preprocess=job.preprocess,
            parent=current_row.version,
            round_number=r.number,
            metrics={"train_loss": train_loss.get("loss")},
            provenance={
                "source": "federated",
                "round": r.number,
                "participants": len(payloads),
                "examples": examples,
            },
        )
        if new_state is not None:
            job.strategy_state_sha256 = self.blobs.put(new_state)
        self._latest[job.id] = (row.sha256, {**header, "version": row.version}, new)
        finalize = time.perf_counter() - t0
        r.aggregation_seconds = incremental + finalize
        r.model_version_out = row.version
        audit = audits.enqueue(s, job, row.version, self.clock())
        if audit is not None and spec.audit.gate:
            row.released = False  # released when its audit's verdict is ok
        else:
            job.current_version = row.version
        job.rounds_completed += 1
        fed = weighted_mean([(int(m.get("holdout_examples", 0)), m.get("metrics", {})) for m in payloads])
        metrics: dict[str, Any] = {
            "train_loss": train_loss.get("loss"),
            "examples": examples,
            "aggregation": {
                "accumulate_cpu_seconds": incremental,
                "finalize_seconds": finalize,
                "from_store": incremental == 0.0,
            },
            "secure": sr is not None,
        }
        if unmask_seconds is not None:
            metrics["unmask_seconds"] = unmask_seconds
        central = self._central(job, spec, header["arch"], new)
        if central:
            metrics["central"] = central
            row.metrics = {**row.metrics, "central": central}
        r.metrics = metrics
        if fed:
            self._record_federated(s, job, current_row.version, fed)
        self._discard_round_data(s, r)

    def _running_sum(self, r: Round, senders: AbstractSet[str], numel: int) -> _Accumulator | None:
        """The sum kept in memory as the vectors arrived, if it holds exactly the senders' vectors."""
        with self._acc_lock:
            acc = self._acc.pop(r.id, None)
        if acc is not None and acc.contributors == senders and acc.total.size == numel:
            return acc
        return None  # another replica took some vectors, or this process restarted: sum from the store

    def _plain_sum(self, r: Round, msgs: list[RoundMessage], numel: int) -> tuple[np.ndarray, int, float]:
        """The sum of a plain round's example-weighted updates, their example count, and the adding's CPU time."""
        acc = self._running_sum(r, {m.device_id for m in msgs}, numel)
        if acc is not None:
            return acc.total, acc.examples, acc.seconds
        total = np.zeros(numel, dtype=np.float32)
        for m in msgs:
            total += codec.decode(self.blobs.get(m.blob_sha256 or ""), expected_numel=numel)[1]
        return total, sum(int(m.payload["num_examples"]) for m in msgs), 0.0

    def _masked_sum(self, r: Round, sr: secure.SecureRound, numel: int) -> tuple[np.ndarray, float]:
        """The sum modulo 2**64 of a secure round's masked vectors, and the adding's CPU time."""
        senders = sr.sent("masked_input")
        acc = self._running_sum(r, senders, numel)
        if acc is not None:
            return acc.total, acc.seconds
        # This process restarted (or another replica took some vectors): the stored sum, or the stored vectors.
        stored_sum = (r.secagg or {}).get("masked_sum")
        if stored_sum and set(stored_sum["contributors"]) == senders:
            blob = self.blobs.get(stored_sum["blob"])
            return codec.decode(blob, expected_numel=numel, dtype="uint64")[1].copy(), 0.0
        stored = sr.blobs()
        missing = sorted(senders - set(stored))
        if missing:
            raise SecAggError(
                f"the masked inputs of {len(missing)} devices are neither in this process's running sum nor"
                " stored (the coordinator restarted during the masked-input stage)"
            )
        total = np.zeros(numel, dtype=np.uint64)
        for d in sorted(senders):
            total += codec.decode(self.blobs.get(stored[d]), expected_numel=numel, dtype="uint64")[
                1
            ]  # mod 2**64
        return total, 0.0

    def _store_masked_sum(self, s: Session, r: Round) -> str | None:
        """At the end of a secure round's masked-input stage, with one coordinator process: store the running
        sum (once, instead of every vector) and name its contributors in the round's SecAgg+ state, so that
        a coordinator restarted during the unmask stage still finishes the round.

        Returns why the round must be abandoned instead: this process restarted during the stage, so the
        inputs it had added before are lost (the devices do not send them twice).
        """
        senders = secure.SecureRound(s, r).sent("masked_input")
        if not senders:
            return None  # nothing to store; the round's own checks end it
        with self._acc_lock:
            acc = self._acc.get(r.id)
            if acc is None or acc.contributors != senders:
                kept = 0 if acc is None else len(acc.contributors & senders)
                return (
                    f"the coordinator restarted during the masked-input stage: {len(senders) - kept} of the "
                    f"{len(senders)} masked inputs were lost with its running sum"
                )
            body = codec.encode({"kind": "masked_sum", "round_id": r.id}, acc.total)
        name = self._spool(body)
        r.secagg = {**(r.secagg or {}), "masked_sum": {"blob": name, "contributors": sorted(senders)}}
        return None

    def _vector(self, job_id: int, row: ModelVersion) -> tuple[dict[str, Any], np.ndarray]:
        """A version's header and parameters, from memory when this process made it."""
        cached = self._latest.get(job_id)
        if cached is not None and cached[0] == row.sha256:
            return cached[1], cached[2]
        return registry.load_vector(self.blobs, row)

    def _record_federated(self, s: Session, job: Job, version: int | None, fed: dict[str, float]) -> None:
        """Federated metrics describe the model the devices received: file them with its version."""
        if version is None:
            return
        mv = registry.get_version(s, job.id, version)
        mv.metrics = {**mv.metrics, "federated": fed}
        producer = s.scalar(select(Round).where(Round.job_id == job.id, Round.model_version_out == version))
        if producer is not None:
            producer.metrics = {**producer.metrics, "federated": fed}

    def _central(
        self, job: Job, spec: JobSpec, arch: dict[str, Any], vec: np.ndarray
    ) -> dict[str, float] | None:
        sha = job.reference_sha256
        if not sha or job.preprocess is None:
            return None
        df = self._reference.get(sha)
        if df is None:
            df = self._reference[sha] = read_table_bytes(self.blobs.get(sha), spec.data)
        return metrics_on(df, spec.data, job.preprocess, arch, vec)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_metrics(metrics: dict[str, Any]) -> None:
    if len(metrics) > 64:
        raise ValueError("too many metrics (at most 64)")
    for name, value in metrics.items():
        if not _finite(value):
            raise ValueError(f"metric {name!r} must be a finite number")


def _check_statistics(stats: dict[str, Any]) -> None:
    if not isinstance(stats.get("rows"), int) or stats["rows"] < 0:
        raise ValueError("statistics.rows must be a non-negative integer")
    for section in ("numeric", "categorical"):
        if not isinstance(stats.get(section, {}), dict):
            raise ValueError(f"statistics.{section} must be a table")
    for col, v in stats.get("numeric", {}).items():
        if not isinstance(v, dict) or not all(_finite(v.get(k)) for k in ("count", "sum", "sum_sq")):
            raise ValueError(f"statistics.numeric.{col} needs finite count, sum and sum_sq")


def _one_less(r: _RoundRow) -> int | None:
    """Who is still waiting once this device's message is in: it was waiting (its stage was checked) and no
    other participant of the round changed meanwhile (this transaction holds the round's row)."""
    return None if r.waiting is None else r.waiting - 1


def _check_update_header(header: dict[str, Any], round_id: int) -> dict[str, Any]:
    if header.get("kind") != "update":
        raise Invalid("update: header kind must be 'update'")
    if header.get("round_id") != round_id:
        raise Conflict(f"update was made for round {header.get('round_id')}, not round {round_id}")
    n = header.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_EXAMPLES:
        raise Invalid(f"update: num_examples must be an integer from 1 to {MAX_EXAMPLES}")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict):
        raise Invalid("update: metrics must be a table")
    try:
        _check_metrics(metrics)
    except ValueError as err:
        raise Invalid(f"update: {err}") from None
    loss = header.get("train_loss", 0.0)
    if not _finite(loss):
        raise Invalid("update: train_loss must be a finite number")
    holdout = header.get("holdout_examples", 0)
    if not isinstance(holdout, int) or holdout < 0:
        raise Invalid("update: holdout_examples must be a non-negative integer")
    return {"num_examples": n, "metrics": metrics, "train_loss": float(loss), "holdout_examples": holdout}


# -- prebuilt statements of the device-message paths ------------------------------------------
# Built once: building a statement costs several times what running it costs (see secure.run).

_ROUND_COLUMNS = (
    Round.id,
    Round.job_id,
    Round.number,
    Round.kind,
    Round.stage,
    Round.status,
    Round.stage_deadline,
    Round.secure,
    Round.secagg,
    Round.model_version_in,
)
_PART_COLUMNS = (Participant.id, Participant.status, Participant.stage_done, Participant.reason)
_OTHERS = aliased(Participant)
_WAITING_NOW = (
    select(func.count())
    .select_from(_OTHERS)
    .where(
        _OTHERS.round_id == Round.id,
        _OTHERS.status == ACTIVE,
        or_(_OTHERS.stage_done.is_(None), _OTHERS.stage_done != Round.stage),
    )
    .correlate(Round)
    .scalar_subquery()
)
_PARTICIPATION = (
    select(*_ROUND_COLUMNS, _WAITING_NOW, *_PART_COLUMNS)
    .outerjoin(
        Participant,
        and_(Participant.round_id == Round.id, Participant.device_id == bindparam("device")),
    )
    .where(Round.id == bindparam("round"))
)
_PARTICIPATION_LOCKED = _PARTICIPATION.with_for_update(of=Round)
# The device, and the rounds running with it active in them (none: one row of NULLs after its columns).
_CHECKIN = (
    select(
        Device.last_seen, Device.agent_version, Device.peak_rss_mb, *_ROUND_COLUMNS, Participant.stage_done
    )
    .select_from(Device)
    .outerjoin(
        join(Participant, Round, and_(Round.id == Participant.round_id, Round.status == "running")),
        and_(Participant.device_id == Device.id, Participant.status == ACTIVE),
    )
    .where(Device.id == bindparam("device"))
)
_DEVICE_SEEN_SET = (
    update(Device)
    .where(Device.id == bindparam("device"))
    .values(last_seen=bindparam("seen"), agent_version=bindparam("version"), peak_rss_mb=bindparam("rss"))
)
_STAGE_DONE = (
    update(Participant).where(Participant.id == bindparam("pid")).values(stage_done=bindparam("done"))
)
_ADD_MESSAGE = insert(RoundMessage)
_WAITING = (
    select(func.count())
    .select_from(Participant)
    .where(
        Participant.round_id == bindparam("round"),
        Participant.status == ACTIVE,
        or_(Participant.stage_done.is_(None), Participant.stage_done != bindparam("stage")),
    )
)
_PARTICIPANTS = select(Participant.device_id, Participant.status, Participant.stage_done).where(
    Participant.round_id == bindparam("round")
)
_DROP = (
    update(Participant)
    .where(
        Participant.round_id == bindparam("round"),
        Participant.device_id.in_(bindparam("devices", expanding=True)),
    )
    .values(status=bindparam("new_status"), reason=bindparam("why"))
)
_NUM_PARAMETERS = select(ModelVersion.num_parameters).where(
    ModelVersion.job_id == bindparam("job"), ModelVersion.version == bindparam("version")
)
