"""A round's timeline: the stages it went through, each with the times it started and ended.

Stored on ``Round.stages`` as a JSON list, in order: ``{"stage": str, "started": float, "ended": float |
None}`` on the engine's clock (epoch seconds; simulation mode's virtual clock). The last entry of a
running round is open (``ended`` None); a round that ended has every entry closed. Rounds from before
the column existed hold NULL or ``[]``: every function here takes either. The functions return new lists,
never change the one given: SQLAlchemy notices a JSON column's change only when the attribute is assigned.
"""

from __future__ import annotations

from typing import Any

Entry = dict[str, Any]


def current(stages: list[Entry] | None) -> Entry | None:
    """The open entry (the stage the round is in now), or None."""
    if stages and stages[-1].get("ended") is None:
        return stages[-1]
    return None


def close(stages: list[Entry] | None, now: float) -> list[Entry]:
    """The timeline with its open entry ended at ``now``."""
    out = list(stages or [])
    if current(out) is not None:
        out[-1] = {**out[-1], "ended": now}
    return out


def begin(stages: list[Entry] | None, stage: str, now: float) -> list[Entry]:
    """The timeline with its open entry ended at ``now`` and ``stage`` started at ``now``."""
    return [*close(stages, now), {"stage": stage, "started": now, "ended": None}]


def seconds(entry: Entry) -> float | None:
    """How long an entry's stage took; None while it runs."""
    ended = entry.get("ended")
    return None if ended is None else float(ended) - float(entry["started"])


def described(stages: list[Entry] | None) -> list[dict[str, Any]]:
    """The timeline as the API shows it: each entry with its ``seconds``."""
    return [
        {"stage": e["stage"], "started": e["started"], "ended": e.get("ended"), "seconds": seconds(e)}
        for e in stages or []
    ]


def duration(stages: list[Entry] | None, first_stage: str) -> float | None:
    """From the round's opening to the end of its last stage; None while it runs, or when the timeline
    does not start at the protocol's ``first_stage`` (a round opened before timelines were recorded)."""
    if not stages or stages[0]["stage"] != first_stage or current(stages) is not None:
        return None
    return float(stages[-1]["ended"]) - float(stages[0]["started"])
