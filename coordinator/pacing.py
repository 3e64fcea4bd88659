"""When a device checks in again: the rule that keeps an idle fleet cheap and a new round quick.

A device that says it can wait (``CheckinRequest.wait``) and has nothing to do now is held: its
check-in is answered as soon as it owes a message in a round, or after at most ``long_poll``
seconds, so that 10,000 idle devices cost 10,000 / ``long_poll`` requests a second and a selected
device hears of its round within one tick. A device that does not wait (an older agent, or one
whose hold this process cannot take) is told to come back after ``active_retry`` in a round,
``poll_retry`` while a job may select it, and ``idle_retry`` while none could: each jittered by
``JITTER`` so that a fleet enrolled together spreads out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

JITTER = 0.1  # a fraction of each wait: never more than 1 + JITTER times the setting
ONLINE_MARGIN = 2.0  # seconds beyond the longest wait a device is told, before it counts as offline

# ``task``: it owes a message now; ``in_round``: it is in a running round, waiting for the others;
# ``selectable``: a running job may select it; ``idle``: no job could.
Situation = Literal["task", "in_round", "selectable", "idle"]


@dataclass(frozen=True)
class Pacing:
    """The settings the rule reads (``EngineSettings`` holds them)."""

    idle_retry: float = 60.0
    poll_retry: float = 2.0
    active_retry: float = 0.5
    long_poll: float = 55.0


@dataclass(frozen=True)
class Plan:
    """How to answer one check-in.

    ``hold``: seconds to hold it waiting for a task (0: answer now). ``retry_after``: what the answer
    says when it goes out without a hold (now, or because the hold could not be taken).
    """

    hold: float
    retry_after: float


def retry_after(situation: Situation, pacing: Pacing, draw: float) -> float:
    """Seconds a device that does not wait is told to wait, ``draw`` in [0, 1) spreading it by ±JITTER."""
    if situation in ("task", "in_round"):
        return pacing.active_retry
    base = pacing.idle_retry if situation == "idle" else min(pacing.poll_retry, pacing.idle_retry)
    return base * (1.0 - JITTER + 2.0 * JITTER * draw)


def plan(situation: Situation, wait: float, pacing: Pacing, draw: float) -> Plan:
    """The answer to a check-in in ``situation`` from a device that can wait ``wait`` seconds.

    A device with a task is answered now. Any other device that waits is held for ``min(wait,
    long_poll)`` less up to ``JITTER`` of it (holds that began together end apart); one that does not
    is told when to come back (``retry_after``).
    """
    told = retry_after(situation, pacing, draw)
    if situation == "task" or wait <= 0 or pacing.long_poll <= 0:
        return Plan(hold=0.0, retry_after=told)
    return Plan(hold=min(wait, pacing.long_poll) * (1.0 - JITTER * draw), retry_after=told)


def online_window(eligibility_window: float, pacing: Pacing) -> float:
    """The eligibility window made consistent with the waits devices are told.

    A device told to come back in T seconds must count as online (eligible for a round) until it
    has: never less than the longest wait it can be told, jitter included, plus a margin. Held
    devices are kept online by their hold (``coordinator.wakeups``), not by this window.
    """
    # poll_retry never exceeds idle_retry (``retry_after``).
    longest = max(pacing.idle_retry, pacing.active_retry) * (1.0 + JITTER)
    return max(eligibility_window, longest * (1.0 + JITTER) + ONLINE_MARGIN)
