"""Which held check-ins to answer now: the database side of long polls (``server.longpoll``).

A process holding check-ins learns of new rounds and stages from the database, not from the
process that opened them (replicas share one database): one pass per tick reads the running
rounds' stages (a few rows) and, only when a round opened or moved on or devices were held since
the last pass, the devices that now owe a message among those rounds and those devices: one query
for all the waiters, never one per waiting device.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from sqlalchemy import bindparam, false, or_, select, update

from coordinator import secure
from coordinator.context import EngineContext
from coordinator.models import Device, Participant, Round
from coordinator.rounds import ACTIVE

BATCH = 500  # ids per statement (SQLite's limit on bound parameters is far above)

RUNNING_STAGES = select(Round.id, Round.stage).where(Round.status == "running")
SEEN = (
    update(Device)
    .where(Device.id.in_(bindparam("devices", expanding=True)))
    .values(last_seen=bindparam("seen"))
)


def _owing(rounds: Collection[int], devices: Collection[str]) -> object:
    """Devices that owe their round's current stage a message before its deadline, among ``rounds``'
    participants and ``devices``."""
    among = []
    if rounds:
        among.append(Participant.round_id.in_(list(rounds)))
    if devices:
        among.append(Participant.device_id.in_(list(devices)))
    return (
        select(Participant.device_id)
        .join(Round, Round.id == Participant.round_id)
        .where(
            Round.status == "running",
            Round.stage_deadline > bindparam("now"),
            Participant.status == ACTIVE,
            or_(Participant.stage_done.is_(None), Participant.stage_done != Round.stage),
            or_(*among) if among else false(),
        )
    )


class WakeUps:
    """The running rounds' stages as last read, and the devices that owe one of them a message."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx
        self._stages: dict[int, str] = {}

    def due(self, fresh: Collection[str], now: float) -> set[str]:
        """Devices that owe a message now: every participant of a round that opened or changed stage
        since the last pass, and those of ``fresh`` (held since the last pass) that owe one anywhere.

        A device held before a round opens is found when the round first shows up here; one held
        after is in ``fresh``: between them no selection is missed, whatever the order of commits.
        """
        with self.ctx.device_read() as s:
            stages = {int(rid): str(stage) for rid, stage in secure.run(s, RUNNING_STAGES)}
            changed = [rid for rid, stage in stages.items() if self._stages.get(rid) != stage]
            self._stages = stages
            found: set[str] = set()
            ids = list(fresh)
            if changed and not ids:
                found.update(secure.run(s, _owing(changed, ()), now=now).scalars())  # type: ignore[arg-type]
            for i in range(0, len(ids), BATCH):
                stmt = _owing(changed if i == 0 else (), ids[i : i + BATCH])
                found.update(secure.run(s, stmt, now=now).scalars())  # type: ignore[arg-type]
        return found

    def mark_seen(self, devices: Iterable[str], now: float) -> None:
        """Record that held devices are still connected: they count as online while held."""
        ids = list(devices)
        if not ids:
            return
        with self.ctx.device_write() as s:
            for i in range(0, len(ids), BATCH):
                secure.run(s, SEEN, devices=ids[i : i + BATCH], seen=now)
