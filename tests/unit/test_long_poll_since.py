"""A hold whose answer was not read (a round message taken while no round moved here) is woken by a pass
made at once if a round did move before the hold began, not at the next interval; a hold where nothing
moved waits for the pass a move starts; and such a device's ``last_seen`` is written by the next pass."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from types import SimpleNamespace
from typing import Any

from coordinator.observers import StageEnded
from server.longpoll import LongPolls, Outcome, Woken


class Wakeups:
    """Stands in for the database side (``coordinator.wakeups``): every held device owes a message."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def due(self, fresh: Collection[str], now: float) -> set[str]:
        return set(fresh)

    def mark_seen(self, devices: Iterable[str], now: float) -> None:
        self.seen.extend(devices)


async def _never() -> dict[str, str]:  # the client stays connected
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


def _polls() -> tuple[LongPolls, Wakeups]:
    polls = LongPolls(SimpleNamespace(clock=lambda: 100.0), interval=60, capacity=10, online_window=60)  # type: ignore[arg-type]
    wakeups = Wakeups()
    polls.wakeups = wakeups  # type: ignore[assignment]
    return polls, wakeups


def test_a_hold_after_a_round_moved_is_passed_at_once() -> None:
    async def scenario() -> tuple[Woken, list[str]]:
        polls, wakeups = _polls()
        polls.start()
        try:
            since = polls.generation  # read before the message's work
            polls.stage_ended(StageEnded("train", "share_keys", 0.1))  # meanwhile, in another thread
            await asyncio.sleep(0.1)  # the pass it started ran before this device was held: it found no one
            woken = await asyncio.wait_for(polls.hold("a", 30, _never, since), 5)
            await asyncio.sleep(0.2)  # the same pass goes on to write last_seen
            return woken, wakeups.seen
        finally:
            await polls.stop()

    woken, seen = asyncio.run(scenario())
    assert woken.outcome is Outcome.WOKEN  # by a pass made for it: the next interval is 60 s away
    assert seen == ["a"]  # its last_seen, not written when its answer was skipped, is written by that pass


def test_a_hold_where_nothing_moved_waits_for_a_move() -> None:
    async def scenario() -> tuple[Woken, Any]:
        polls, _ = _polls()
        polls.start()
        try:
            quiet = await polls.hold("a", 0.5, _never, polls.generation)
            held = asyncio.create_task(polls.hold("a", 30, _never, polls.generation))
            await asyncio.sleep(0.1)
            polls.stage_ended(StageEnded("train", "share_keys", 0.1))  # the stage ends: its pass wakes it
            return quiet, await asyncio.wait_for(held, 5)
        finally:
            await polls.stop()

    quiet, woken = asyncio.run(scenario())
    assert quiet.outcome is Outcome.EXPIRED  # no pass was made for it: it owes nothing until a round moves
    assert woken.outcome is Outcome.WOKEN


def test_every_round_event_moves_the_generation() -> None:
    polls, _ = _polls()
    before = polls.generation
    polls.round_opened(SimpleNamespace())  # type: ignore[arg-type]
    polls.stage_ended(StageEnded("train", "configure", 0.1))
    polls.round_ended(SimpleNamespace())  # type: ignore[arg-type]
    assert polls.generation == before + 3
