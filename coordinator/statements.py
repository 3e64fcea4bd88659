"""The prebuilt SQL of the device-message paths, and the rows they read.

Device messages are the coordinator's most frequent requests. Each path runs a few statements built
once at import: building a statement costs several times what running it costs (see ``secure.run``),
and plain rows spare the ORM's identity map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from coordinator.models import Device, Job, ModelVersion, Participant, Round, RoundMessage
from coordinator.rounds import ACTIVE


@dataclass(frozen=True)
class RoundRow:
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
class PartRow:
    """A device's participant row in a round, as the device-message paths read it."""

    id: int
    status: str
    stage_done: str | None
    reason: str | None


ROUND_COLUMNS = (
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
PART_COLUMNS = (Participant.id, Participant.status, Participant.stage_done, Participant.reason)
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
PARTICIPATION = (
    select(*ROUND_COLUMNS, _WAITING_NOW, *PART_COLUMNS)
    .outerjoin(
        Participant,
        and_(Participant.round_id == Round.id, Participant.device_id == bindparam("device")),
    )
    .where(Round.id == bindparam("round"))
)
PARTICIPATION_LOCKED = PARTICIPATION.with_for_update(of=Round)
# The device, then one row per running round with its participant row (``Participant.id`` NULL where
# the device is not active in that round; no running round: one row of NULLs after the device's
# columns). Read from the few running rounds (``ix_rounds_status``) to the device's participant row in
# each (``uq_participant``), so a check-in costs the same whatever the size of the federation and however
# many rounds the device took part in: participant rows stay ``active`` after their round ends, and a
# nested ``participant JOIN round`` as the right side of the outer join made SQLite build that join for
# every participant of the federation on every check-in.
CHECKIN = (
    select(
        Device.last_seen,
        Device.agent_version,
        Device.peak_rss_mb,
        *ROUND_COLUMNS,
        Participant.stage_done,
        Participant.id,
    )
    .select_from(Device)
    .outerjoin(Round, Round.status == "running")
    .outerjoin(
        Participant,
        and_(
            Participant.round_id == Round.id,
            Participant.device_id == Device.id,
            Participant.status == ACTIVE,
        ),
    )
    .where(Device.id == bindparam("device"))
)
DEVICE_SEEN_SET = (
    update(Device)
    .where(Device.id == bindparam("device"))
    .values(last_seen=bindparam("seen"), agent_version=bindparam("version"), peak_rss_mb=bindparam("rss"))
)
STAGE_DONE = (
    update(Participant).where(Participant.id == bindparam("pid")).values(stage_done=bindparam("done"))
)
ADD_MESSAGE = insert(RoundMessage)
WAITING = (
    select(func.count())
    .select_from(Participant)
    .where(
        Participant.round_id == bindparam("round"),
        Participant.status == ACTIVE,
        or_(Participant.stage_done.is_(None), Participant.stage_done != bindparam("stage")),
    )
)
PARTICIPANTS = select(Participant.device_id, Participant.status, Participant.stage_done).where(
    Participant.round_id == bindparam("round")
)
DROP = (
    update(Participant)
    .where(
        Participant.round_id == bindparam("round"),
        Participant.device_id.in_(bindparam("devices", expanding=True)),
    )
    .values(status=bindparam("new_status"), reason=bindparam("why"))
)
NUM_PARAMETERS = select(ModelVersion.num_parameters).where(
    ModelVersion.job_id == bindparam("job"), ModelVersion.version == bindparam("version")
)
# The ticker's first read, several times a second: each running job, its running round and deadline.
RUNNING_JOBS = (
    select(Job.id, Round.id, Round.stage_deadline)
    .outerjoin(Round, and_(Round.job_id == Job.id, Round.status == "running"))
    .where(Job.status == "running")
)
