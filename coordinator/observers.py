"""Hooks on what the round driver decides (a round opened, a stage ended, a round ended), so that the
server can count them (Prometheus histograms in ``server/metrics.py``) and answer held check-ins at once
(``server/longpoll.py``) without the coordinator importing either.

An observer hears of a decision once the transaction that made it commits, never if it rolls back: a
round that is decided again after a rollback is counted once. With several coordinator replicas on one
database, each replica hears of the rounds it drove itself, so the counts of all replicas add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StageEnded:
    """A round left a stage after ``seconds`` (engine clock)."""

    kind: str
    stage: str
    seconds: float


@dataclass(frozen=True)
class RoundEnded:
    """A round ended (``completed`` or ``abandoned``) ``seconds`` after it opened (None when unknown: a round
    opened before timelines were recorded); ``devices``: its participants by status."""

    kind: str
    status: str
    seconds: float | None
    aggregation_seconds: float | None
    devices: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundOpened:
    """A round opened with ``devices`` selected."""

    kind: str
    devices: int


class RoundObserver(Protocol):
    """What the round driver tells an observer."""

    def round_opened(self, event: RoundOpened) -> None: ...

    def stage_ended(self, event: StageEnded) -> None: ...

    def round_ended(self, event: RoundEnded) -> None: ...
