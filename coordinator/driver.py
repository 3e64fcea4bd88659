"""The round driver: open a round, drive it from stage to stage, finish or abandon it.

``coordinator.rounds`` decides (pure functions over a round's rows); this module reads the rows,
applies the decision in one transaction and records it. It runs on the ticker (deadlines) and after
each device message that may have completed its stage. Everything it changes is in the database, so
that a coordinator killed at any moment restarts and goes on from there.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import replace

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator import audits, boosting, privacy, registry, secure, timeline
from coordinator.aggregation import Sums
from coordinator.context import EngineContext
from coordinator.errors import Invalid, NotFound
from coordinator.finish import RoundFinisher
from coordinator.models import Device, Event, Job, Participant, Round, utcnow
from coordinator.observers import RoundEnded, RoundObserver, RoundOpened, StageEnded
from coordinator.queries import get_job
from coordinator.rounds import (
    ABANDONED,
    ACTIVE,
    DECLINED,
    DROPPED,
    ENDED_WITHOUT_MODEL,
    REJECTED,
    STAGES,
    SUMMED_KINDS,
    Decision,
    ParticipantView,
    RoundView,
    decide,
    select_cohort,
    stages_of,
)
from coordinator.statements import DROP, PARTICIPANTS, RUNNING_JOBS, WAITING, RoundRow
from shared.gbdt.rounds import bind_trees, is_boosted
from shared.jobspec import JobSpec
from shared.robustness import AggregateRejected
from shared.secagg.primitives import SecAggError

log = logging.getLogger("aicfl.coordinator")

MAX_CONSECUTIVE_ABANDONED = 20
# Seconds between the ticker's drives of a running round whose stage deadline is still ahead.
SAFETY_DRIVE = 1.0


class RoundDriver:
    """Advances every running job's rounds; opens the next round when none runs.

    Each round's timeline (``Round.stages``, see ``coordinator.timeline``) records when it entered and
    left each stage; ``observers`` hear of every stage and round that ends (``coordinator.observers``).
    """

    def __init__(self, ctx: EngineContext, sums: Sums, finisher: RoundFinisher):
        self.ctx = ctx
        self.sums = sums
        self.finisher = finisher
        self.observers: list[RoundObserver] = []
        self._driven: dict[int, float] = {}  # round id -> when the ticker last drove it (its clock)

    def tick(self) -> None:
        """One pass over every running job: advance rounds, open new ones.

        A round whose stage deadline is still ahead is left alone for up to ``SAFETY_DRIVE``
        seconds: the device message that completes a stage drives the round on at once
        (``maybe_drive``), so the ticker is there for deadlines, for opening rounds, and as a safety
        net. Driving a running round reads every participant under the write lock: at four ticks a
        second and a thousand devices that would be most of the coordinator's work.
        """
        now = self.ctx.clock()
        with self.ctx.device_read() as db:
            jobs = secure.run(db, RUNNING_JOBS).all()
        # Running sums of rounds that ended on another replica (this one had some of their vectors).
        self.sums.forget_ended({round_id for _, round_id, _ in jobs if round_id is not None})
        job_ids = []
        for job_id, round_id, deadline in jobs:
            if (
                round_id is not None
                and now < deadline
                and now - self._driven.get(round_id, -1e18) < SAFETY_DRIVE
            ):
                continue
            if round_id is not None:
                self._driven = {r: t for r, t in self._driven.items() if now - t < SAFETY_DRIVE}
                self._driven[round_id] = now
            job_ids.append(job_id)
        for job_id in job_ids:
            try:
                self._tick_job(job_id)
            except Exception:  # noqa: BLE001 - one job's failure must not stop the others
                log.exception("tick of job %s failed", job_id)

    def _tick_job(self, job_id: int) -> None:
        now = self.ctx.clock()
        with self.ctx.write() as s:
            q = select(Job).where(Job.id == job_id)
            job = s.scalar(q if self.ctx.sqlite else q.with_for_update(skip_locked=True))
            if job is None or job.status != "running":
                return
            running = select(Round).where(Round.job_id == job_id, Round.status == "running")
            if self.ctx.sqlite:
                current = s.scalar(running)
            else:
                # Device messages drive a round under its row's lock, not the job's: the ticker takes the
                # round's row too, or it would drive the round from a stale read while a message (here or
                # on another replica) drives it as well: two advances, two SecAgg+ setups, two finishes.
                # SKIP LOCKED, as for the job: a message is driving it now, so the next tick looks again;
                # never waiting also means never a deadlock with a message that waits for the job's row.
                current_id = s.scalar(running.with_only_columns(Round.id))
                if current_id is not None:
                    current = s.scalar(
                        select(Round)
                        .where(Round.id == current_id, Round.status == "running")
                        .with_for_update(skip_locked=True)
                    )
                    if current is None:
                        return  # locked by a device message, or it just ended: the next tick sees
                else:
                    current = None
            if current is not None:
                self.drive(s, current, now)
                return
            self._open(s, job, now)

    def maybe_drive(
        self, s: Session | secure.Db, r: Round | RoundRow, now: float, waiting: int | None = None
    ) -> None:
        """Drive the round only if this message may have completed its stage (the ticker handles deadlines).

        ``waiting``: the active participants yet to send this stage's message, when the caller knows.
        """
        if waiting is None:
            waiting = secure.run(s, WAITING, round=r.id, stage=r.stage).scalar()
        if not waiting or now >= r.stage_deadline:
            self.drive(secure.orm(s), self.orm_round(secure.orm(s), r), now)
        elif r.secure and r.stage == "unmask" and secure.SecureRound(s, r).can_unmask():
            # Every secret has its t shares: the devices still silent cannot change the sum.
            self.drive(secure.orm(s), self.orm_round(secure.orm(s), r), now, unmask_ready=True)

    @staticmethod
    def orm_round(s: Session, r: Round | RoundRow) -> Round:
        """The round as an ORM object, to change it (its row is already locked by this transaction)."""
        if isinstance(r, Round):
            return r
        row = s.get(Round, r.id)
        if row is None:  # pragma: no cover - read in this transaction
            raise NotFound(f"no round {r.id}")
        return row

    def drive(self, s: Session, r: Round, now: float, unmask_ready: bool = False) -> None:
        """Apply ``rounds.decide`` to the round: wait, drop the late, advance, finish or abandon."""
        # The participants as rows, not ORM objects: the device-message paths change them with Core statements.
        parts = [ParticipantView(*row) for row in secure.run(s, PARTICIPANTS, round=r.id)]
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
            secure.run(s, DROP, round=r.id, devices=list(d.drop), new_status=DROPPED, why=reason)
            parts = [replace(p, status=DROPPED) if p.device_id in d.drop else p for p in parts]
        if d.action == "abandon":
            self.abandon(s, r, d.reason or "abandoned", now)
        elif d.action == "advance":
            self._advance(s, r, parts, d.next_stage or r.stage, now)
        else:
            job = get_job(s, r.job_id)
            try:
                self.finisher.finish(s, job, r, [p for p in parts if p.status == ACTIVE])
            except AggregateRejected as err:
                # Out of the bounds of docs/robustness.md: nothing was registered, the model stays.
                self.abandon(s, r, f"aggregate rejected: {err}", now, status=REJECTED)
            # NotFound: a stored vector is gone (a finish that deleted the round's blobs died before its
            # commit); the round cannot be summed again, so it ends cleanly instead of failing every tick.
            except (Invalid, NotFound, ValueError, SecAggError) as err:
                self.abandon(s, r, f"aggregation failed: {err}", now)
                if r.kind == "stats":
                    job.status = "failed"
                    job.reason = f"statistics round failed: {err}"
                    s.add(
                        Event(
                            actor="coordinator",
                            action="job.fail",
                            target=str(job.id),
                            detail={"reason": job.reason},
                        )
                    )
            else:
                self._ended(s, r, now)

    def _advance(
        self, s: Session, r: Round, parts: list[ParticipantView], next_stage: str, now: float
    ) -> None:
        spec = self.ctx.spec(s, r.job_id)
        if r.secure and r.stage == "configure":
            accepted = sorted(p.device_id for p in parts if p.status == ACTIVE)
            try:
                r.secagg = secure.setup(
                    accepted,
                    spec.secagg,
                    r.job_id,
                    r.number,
                    max_weight=spec.robustness.max_weight if r.kind == "train" else None,
                )
                if r.kind == "stats":
                    r.secagg = {**r.secagg, "vocabulary": secure.merged_vocabulary(s, r, accepted)}
                if r.kind == "level":
                    # The context names the trees every device is sent (shared.gbdt.rounds.bind_trees).
                    trees = boosting.task_info(self.ctx, s, r)
                    context = bind_trees(base64.b64decode(r.secagg["context"]), trees or {})
                    r.secagg = {**r.secagg, "context": base64.b64encode(context).decode()}
                if r.kind == "train" and spec.privacy is not None and spec.privacy.level == "device":
                    # Every device clips, rounds and noises its update with these before masking it.
                    dim = registry.get_version(s, r.job_id, r.model_version_in).num_parameters
                    r.secagg = {
                        **r.secagg,
                        "privacy": privacy.device_round(spec, s, r.job_id, int(dim), len(accepted)),
                    }
            except ValueError as err:
                self.abandon(s, r, f"secure aggregation cannot run with {len(accepted)} devices: {err}", now)
                return
        if r.secure and r.stage == "masked_input" and self.ctx.sqlite:
            lost = self.sums.store_masked(s, r)
            if lost is not None:
                self.abandon(s, r, lost, now)
                return
        left = timeline.current(r.stages)
        r.stage = next_stage
        r.stage_deadline = now + spec.cohort.stage_timeout
        r.stages = timeline.begin(r.stages, next_stage, now)
        if left is not None:
            self._observe(s, [StageEnded(r.kind, left["stage"], now - left["started"])])

    def abandon(
        self, s: Session, r: Round, reason: str, now: float | None = None, status: str = ABANDONED
    ) -> None:
        """End the round without a new version (the model stays as it was); fail the job after too many.

        ``now``: the engine's clock when the decision was taken (read here when the caller has none).
        ``status``: ``abandoned``, or ``rejected`` for an aggregate out of bounds; both count toward
        the rounds in a row that fail the job.
        """
        r.status = status
        r.reason = reason
        r.ended_at = utcnow()
        self._ended(s, r, self.ctx.clock() if now is None else now)
        self.finisher.discard(s, r)
        job = get_job(s, r.job_id)
        s.add(
            Event(
                actor="coordinator",
                action="round.reject" if status == REJECTED else "round.abandon",
                target=f"{job.id}/{r.number}",
                detail={"reason": reason},
            )
        )
        log.warning("job %s round %s %s: %s", job.id, r.number, status, reason)
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
            and all(x in ENDED_WITHOUT_MODEL for x in recent)
            and job.status == "running"
        ):
            job.status = "failed"
            ended = "abandoned" if all(x == ABANDONED for x in recent) else "abandoned or rejected"
            job.reason = f"{MAX_CONSECUTIVE_ABANDONED} rounds in a row were {ended}; last: {reason}"
            s.add(
                Event(
                    actor="coordinator", action="job.fail", target=str(job.id), detail={"reason": job.reason}
                )
            )

    def _ended(self, s: Session, r: Round, now: float) -> None:
        """Close the timeline of a round that just ended (completed or abandoned), and tell the observers."""
        left = timeline.current(r.stages)
        r.stages = timeline.close(r.stages, now)
        if not self.observers:
            return
        events: list[RoundOpened | StageEnded | RoundEnded] = []
        if left is not None:
            events.append(StageEnded(r.kind, left["stage"], now - left["started"]))
        devices = s.execute(
            select(Participant.status, func.count())
            .where(Participant.round_id == r.id)
            .group_by(Participant.status)
        ).all()
        events.append(
            RoundEnded(
                kind=r.kind,
                status=r.status,
                seconds=timeline.duration(r.stages, stages_of(r.kind, r.secure)[0]),
                aggregation_seconds=r.aggregation_seconds,
                devices={status: n for status, n in devices},
            )
        )
        self._observe(s, events)

    def _observe(self, s: Session, events: list[RoundOpened | StageEnded | RoundEnded]) -> None:
        """Tell the observers of ``events`` once this transaction commits."""
        if not self.observers:
            return
        observers = list(self.observers)

        def tell() -> None:
            for o in observers:
                for e in events:
                    if isinstance(e, StageEnded):
                        o.stage_ended(e)
                    elif isinstance(e, RoundOpened):
                        o.round_opened(e)
                    else:
                        o.round_ended(e)

        # Once the commit has landed (not SQLAlchemy's commit event, which fires before it): a long-poll
        # pass it starts must see the round it is told of.
        self.ctx.after_commit(s, tell)

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
                    Device.last_seen >= now - self.ctx.settings.eligibility_window,
                    Device.id.not_in(busy),
                    Device.id.not_in(declined),
                )
            )
        )

    def _next_kind(self, job: Job, spec: JobSpec, s: Session) -> str | None:
        if job.preprocess is None:
            return "stats"
        if is_boosted(spec):
            kind = boosting.next_kind(job, spec)
            if kind is not None:
                return kind
        elif job.rounds_completed < spec.rounds:
            return "train"
        if self.ctx.settings.evaluate_after_last_round and spec.evaluation.federated:
            evaluated = s.scalar(
                select(Round.id).where(
                    Round.job_id == job.id, Round.kind == "evaluate", Round.status == "completed"
                )
            )
            if evaluated is None:
                return "evaluate"
        return None

    def _open(self, s: Session, job: Job, now: float) -> None:
        """Open the job's next round with a cohort of eligible devices, or complete the job."""
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
        if kind == "train" and spec.privacy is not None:
            dim = registry.get_version(s, job.id, job.current_version).num_parameters
            spent = privacy.check_budget(s, job.id, spec, int(dim))
            if spent is not None:
                # The job ends with its budget unspent rather than overspent (next_round_fits).
                job.status = "completed"
                job.reason = spent
                s.add(
                    Event(
                        actor="coordinator",
                        action="job.complete",
                        target=str(job.id),
                        detail={"reason": spent},
                    )
                )
                log.info("job %s ends: %s", job.id, spent)
                return
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
            secure=kind in SUMMED_KINDS and spec.secure,
            secagg=None,
            stage=STAGES[kind][0],
            stages=timeline.begin([], STAGES[kind][0], now),
            stage_deadline=now + spec.cohort.stage_timeout,
            minimum=spec.cohort.minimum,
            model_version_in=job.current_version if kind not in ("stats", "bins") else None,
        )
        s.add(r)
        s.flush()
        s.add_all(Participant(round_id=r.id, device_id=d) for d in cohort)
        job.next_round += 1
        job.waiting_since = None
        self._observe(s, [RoundOpened(kind, len(cohort))])
        log.info("job %s round %s (%s) opened with %d devices", job.id, r.number, kind, len(cohort))
