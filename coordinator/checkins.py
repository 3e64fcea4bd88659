"""Check-ins: what a device is told to do next, and the model it downloads for it.

A check-in is the coordinator's most frequent request (every device, every few seconds): one
prebuilt statement reads the device and its running rounds, no ORM objects, and the write lock is
taken only when the device's row must change.
"""

from __future__ import annotations

from sqlalchemy import select

from coordinator import registry, secure
from coordinator.context import EngineContext
from coordinator.errors import Forbidden, NotFound
from coordinator.models import Participant, Round
from coordinator.rounds import stage_index
from coordinator.statements import CHECKIN, DEVICE_SEEN_SET, RoundRow
from shared.wire import CheckinRequest, CheckinResponse, ModelRef, Task


class CheckIns:
    """A device's next task, when to come back, and the model bytes of a round it was selected for."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx
        self._model_refs: dict[tuple[int, int], ModelRef] = {}  # versions never change once written

    def checkin(self, device_id: str, req: CheckinRequest) -> CheckinResponse:
        """The device's task in a running round, if it has one, and when to check in again."""
        now = self.ctx.clock()
        task: Task | None = None
        with self.ctx.device_read() as s:
            found = secure.run(s, CHECKIN, device=device_id).all()
            if not found:  # pragma: no cover - authenticated before
                raise NotFound("unknown device")
            last_seen, agent_version, peak_rss_mb = found[0][:3]
            rows = [row[3:] for row in found if row[3] is not None]  # rounds.id is NULL when there is none
            for row in rows:
                r, stage_done = RoundRow(*row[:-1]), row[-1]
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
            with self.ctx.device_write() as s:
                secure.run(
                    s,
                    DEVICE_SEEN_SET,
                    device=device_id,
                    seen=now if last_seen is None or now - last_seen >= 1.0 else last_seen,
                    version=req.agent_version or agent_version,
                    rss=peak_rss_mb if req.peak_rss_mb is None else req.peak_rss_mb,
                )
        retry = self.ctx.settings.active_retry if rows else self.ctx.settings.idle_retry
        return CheckinResponse(retry_after=retry, task=task)

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
