"""A device's place in a round, and the checks every device message passes before it is used.

A device may act only on its own behalf, only in a running round it was selected for, only in the
round's current stage, once per stage and before the stage's deadline. Each failed check is an error
that says which of these the message broke.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator import secure
from coordinator.errors import Conflict, Forbidden, NotFound
from coordinator.rounds import ACTIVE, stage_index
from coordinator.statements import PARTICIPATION, PARTICIPATION_LOCKED, ROUND_COLUMNS, PartRow, RoundRow


def load(
    s: Session | secure.Db, device_id: str, round_id: int, lock: bool, row_locks: bool
) -> tuple[RoundRow | None, PartRow | None]:
    """The round (its row locked for this transaction when ``lock`` and the database has ``row_locks``)
    and the device's row in it; ``None`` for what does not exist."""
    stmt = PARTICIPATION_LOCKED if lock and row_locks else PARTICIPATION
    row = secure.run(s, stmt, device=device_id, round=round_id).one_or_none()
    if row is None:
        return None, None
    n = len(ROUND_COLUMNS)
    r = RoundRow(*row[: n + 1])  # the round's columns, then how many are waiting
    return r, (None if row[n + 1] is None else PartRow(*row[n + 1 :]))


def member(r: RoundRow | None, p: PartRow | None, device_id: str, round_id: int) -> tuple[RoundRow, PartRow]:
    """The round and the device's row, if the device is still active in that running round (in
    whatever stage: what a withdrawal needs; :func:`check` adds the stage's rules)."""
    if r is None:
        raise NotFound(f"no round {round_id}")
    if p is None:
        raise Forbidden(f"device {device_id} was not selected for round {round_id}")
    if r.status != "running":
        raise Conflict(f"round {round_id} is {r.status}; the message is stale")
    if p.status != ACTIVE:
        raise Conflict(
            f"device {device_id} is {p.status} in round {round_id}" + (f": {p.reason}" if p.reason else "")
        )
    return r, p


def check(
    r: RoundRow | None,
    p: PartRow | None,
    device_id: str,
    round_id: int,
    stage: str,
    now: float,
) -> tuple[RoundRow, PartRow]:
    """The round and the device's row, if the device may send its ``stage`` message now."""
    r, p = member(r, p, device_id, round_id)
    if r.stage != stage:
        raise Conflict(f"round {round_id} is in stage {r.stage!r}, not {stage!r}")
    if stage_index(r.kind, p.stage_done, r.secure) >= stage_index(r.kind, stage, r.secure):
        raise Conflict(f"device {device_id} already sent its {stage!r} message for round {round_id}")
    if now >= r.stage_deadline:
        raise Conflict(f"the deadline of stage {stage!r} in round {round_id} has passed")
    return r, p


def one_less(r: RoundRow) -> int | None:
    """Who is still waiting once this device's message is in: it was waiting (its stage was checked) and no
    other participant of the round changed meanwhile (this transaction holds the round's row)."""
    return None if r.waiting is None else r.waiting - 1
