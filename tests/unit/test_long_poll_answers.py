"""The long-poll pass reads the answers of the held devices it wakes, all in one call, and a woken hold
ends with its answer; a device found owing but no longer held is not read for."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from types import SimpleNamespace
from typing import Any

from server.longpoll import LongPolls, Outcome, Woken
from shared.wire import CheckinResponse, Task

TASK = Task(round_id=3, job_id=1, round=0, kind="train", stage="masked_input", deadline=9e9, seed=1, spec={})


class Due:
    """Stands in for the database side (``coordinator.wakeups``): which devices owe a message now."""

    def __init__(self, owing: set[str]):
        self.owing = owing

    def due(self, fresh: Collection[str], now: float) -> set[str]:
        return set(self.owing)


def test_a_pass_wakes_held_devices_with_the_answers_it_read_in_one_call() -> None:
    reads: list[list[str]] = []

    def answers(devices: Collection[str]) -> dict[str, CheckinResponse | None]:
        reads.append(sorted(devices))
        return {d: (CheckinResponse(retry_after=0.5, task=TASK) if d == "a" else None) for d in devices}

    async def scenario() -> list[Woken]:
        polls = LongPolls(
            SimpleNamespace(clock=lambda: 100.0),  # type: ignore[arg-type]
            interval=60,
            capacity=10,
            online_window=60,
            answers=answers,
        )
        polls.wakeups = Due({"a", "b", "gone"})  # type: ignore[assignment]
        never: Any = asyncio.Event()

        async def receive() -> dict[str, str]:  # the client stays connected
            await never.wait()
            return {"type": "http.disconnect"}

        held = [asyncio.create_task(polls.hold(d, 30, receive)) for d in ("a", "b")]
        await asyncio.sleep(0.05)
        await polls.step()
        return list(await asyncio.wait_for(asyncio.gather(*held), 5))

    a, b = asyncio.run(scenario())
    assert reads == [["a", "b"]]  # one read for every woken device; "gone" is held by no one here
    assert a == Woken(Outcome.WOKEN, CheckinResponse(retry_after=0.5, task=TASK))
    assert b == Woken(Outcome.WOKEN, None)  # owing by the pass, no task by the read: the route asks again
