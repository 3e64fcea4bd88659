"""Check-ins: what a device is told to do next, and the model it downloads for it.

A check-in is the coordinator's most frequent request (every device, every few seconds): one
prebuilt statement reads the device and its running rounds, no ORM objects, and the write lock is
taken only when the device's row must change. When to come back, or whether to hold the request
until the device has a task, is ``coordinator.pacing``'s rule.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from coordinator import boosting, pacing, registry, secure
from coordinator.context import EngineContext
from coordinator.errors import Forbidden, NotFound
from coordinator.models import Job, Participant, Round
from coordinator.pacing import Situation
from coordinator.rounds import stage_index
from coordinator.statements import CHECKIN, DEVICE_SEEN_SET, RoundRow
from shared.wire import CheckinRequest, CheckinResponse, ModelRef, Task

# A running or pending job may select any device: read at most once a second per process.
SELECTABLE = select(Job.id).where(Job.status.in_(("running", "pending"))).limit(1)
SELECTABLE_TTL = 1.0


@dataclass(frozen=True)
class CheckinAnswer:
    """A check-in's answer now, and how long the request may be held waiting for a task instead."""

    response: CheckinResponse
    hold: float = 0.0


class CheckIns:
    """A device's next task, when to come back, and the model bytes of a round it was selected for."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx
        self._model_refs: dict[tuple[int, int], ModelRef] = {}  # versions never change once written
        self._selectable: tuple[float, bool] = (float("-inf"), True)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    @property
    def pacing(self) -> pacing.Pacing:
        st = self.ctx.settings
        return pacing.Pacing(st.idle_retry, st.poll_retry, st.active_retry, st.long_poll)

    def checkin(self, device_id: str, req: CheckinRequest) -> CheckinResponse:
        """The device's task in a running round, if it has one, and when to check in again."""
        return self.answer(device_id, req.model_copy(update={"wait": 0.0})).response

    def answer(self, device_id: str, req: CheckinRequest) -> CheckinAnswer:
        """The device's task, or when to come back; and, if it can wait, how long to hold it for a task."""
        now = self.ctx.clock()
        with self.ctx.device_read() as s:
            found, rows, task = self._lookup(s, device_id, now)
            if not found:  # pragma: no cover - authenticated before
                raise NotFound("unknown device")
            last_seen, agent_version, peak_rss_mb = found[0][:3]
        # Write the device row only when something changed or a second has passed.
        if (
            last_seen is None
            or now - last_seen >= 1.0
            or (req.agent_version and req.agent_version != agent_version)
            or (req.peak_rss_mb is not None and req.peak_rss_mb != peak_rss_mb)
        ):
            with self.ctx.device_write() as s:
                secure.run(
                    s,
                    DEVICE_SEEN_SET,
                    device=device_id,
                    seen=now if last_seen is None or now - last_seen >= 1.0 else last_seen,
                    version=req.agent_version or agent_version,
                    rss=peak_rss_mb if req.peak_rss_mb is None else req.peak_rss_mb,
                )
        situation: pacing.Situation
        if task is not None:
            situation = "task"
        elif rows:
            situation = "in_round"
        else:
            situation = "selectable" if self._job_may_select(now) else "idle"
        return self._plan(situation, req.wait, task)

    def in_round(self, wait: float) -> CheckinAnswer:
        """The answer of a device known, without reading, to be in a running round and to owe nothing now:
        one whose message was just taken while no round opened, moved on or ended (``server.longpoll``)."""
        return self._plan("in_round", wait, None)

    def _plan(self, situation: Situation, wait: float, task: Task | None) -> CheckinAnswer:
        with self._rng_lock:
            draw = self._rng.random()
        p = pacing.plan(situation, wait, self.pacing, draw)
        return CheckinAnswer(CheckinResponse(retry_after=p.retry_after, task=task), p.hold)

    def woken(self, device_ids: Collection[str]) -> dict[str, CheckinResponse | None]:
        """The answers of held devices found owing a message (``coordinator.wakeups``): each one's task,
        read for all of them in one transaction (None where a device has none after all). What a
        check-in of each would answer, without its bookkeeping: a held device's ``last_seen`` is kept
        by the hold."""
        now = self.ctx.clock()
        out: dict[str, CheckinResponse | None] = {}
        with self.ctx.device_read() as s:
            for device_id in device_ids:
                task = self._lookup(s, device_id, now)[2]
                out[device_id] = None if task is None else self._plan("task", 0.0, task).response
        return out

    def _lookup(self, s: secure.Db, device_id: str, now: float) -> tuple[list[Any], list[Any], Task | None]:
        """The device's check-in rows (its own columns, then one per running round); the running rounds
        it takes part in; and the task of the first whose current stage it still owes a message before
        its deadline."""
        found = list(secure.run(s, CHECKIN, device=device_id).all())
        rows = [row[3:-1] for row in found if row[-1] is not None]  # participants.id: NULL when not in
        for row in rows:
            r, stage_done = RoundRow(*row[:-1]), row[-1]
            if (
                stage_index(r.kind, stage_done, r.secure) < stage_index(r.kind, r.stage, r.secure)
                and now < r.stage_deadline
            ):
                return found, rows, self._task(s, r, device_id)
        return found, rows, None

    def _job_may_select(self, now: float) -> bool:
        """Whether a running (or pending) job may select devices, as read in the last second."""
        read_at, may = self._selectable
        if not read_at <= now < read_at + SELECTABLE_TTL:
            with self.ctx.device_read() as s:
                may = secure.run(s, SELECTABLE).first() is not None
            self._selectable = (now, may)
        return may

    def _task(self, s: secure.Db, r: RoundRow, device_id: str) -> Task:
        spec, preprocess = self.ctx.job_spec(s, r.job_id, r.kind != "stats")
        model = None
        if r.model_version_in is not None:
            key = (r.job_id, r.model_version_in)
            model = self._model_refs.get(key)
            if model is None:
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
            secagg=secure.SecureRound(s, r).task(s, device_id) if r.secure and r.secagg else None,
            boosting=boosting.task_info(self.ctx, s, r) if r.kind == "level" else None,
        )

    def model_blob(self, device_id: str, job_id: int, version: int) -> bytes:
        """A model's bytes, for a device selected in a running round of that job."""
        with self.ctx.read() as s:
            selected = s.scalar(
                select(Participant.id)
                .join(Round, Participant.round_id == Round.id)
                .where(Participant.device_id == device_id, Round.job_id == job_id, Round.status == "running")
                .limit(1)
            )
            if selected is None:
                raise Forbidden(f"device {device_id} is not selected in a running round of job {job_id}")
            sha = registry.get_version(s, job_id, version).sha256
        return self.ctx.blobs.get(sha)
