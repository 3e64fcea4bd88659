"""Held check-ins: a device that can wait is answered when it has a task, not polled for one.

The check-in route asks ``LongPolls.hold`` to keep a request open (no thread: an asyncio future per
request); one background loop per process asks the database each tick which held devices now owe a
message (``coordinator.wakeups``) and wakes exactly those. A held device stays online: its
``last_seen`` is refreshed while its connection is open. Beyond ``capacity`` held requests, or once
the process is shutting down, a check-in is answered at once with its ``retry_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Collection
from types import FrameType
from typing import Any, NamedTuple

from coordinator.context import EngineContext
from coordinator.observers import RoundEnded, RoundOpened, StageEnded
from coordinator.wakeups import WakeUps
from shared.wire import CheckinResponse

log = logging.getLogger("aicfl.server")


class Outcome(enum.Enum):
    """How a hold ended."""

    WOKEN = "woken"  # the device owes a message now
    EXPIRED = "expired"  # nothing happened for the whole hold
    REFUSED = "refused"  # this process already holds ``capacity`` requests
    CLOSING = "closing"  # the process is shutting down
    GONE = "gone"  # the device closed its connection


class Woken(NamedTuple):
    """How a hold ended, and the device's answer when the pass that woke it read it."""

    outcome: Outcome
    answer: CheckinResponse | None = None


class LongPolls:
    """The check-ins this process holds, by device, and the loop that wakes them."""

    def __init__(
        self,
        ctx: EngineContext,
        *,
        interval: float,
        capacity: int,
        online_window: float,
        answers: Callable[[Collection[str]], dict[str, CheckinResponse | None]] | None = None,
    ):
        self.wakeups = WakeUps(ctx)
        # Reads the woken devices' answers in the pass that found them (one thread hop, one transaction
        # for all), so that a woken request answers without a hop and a transaction of its own.
        self.answers = answers
        self.clock = ctx.clock
        self.interval = interval
        self.capacity = capacity
        # A held device's last_seen is written again before half the window has passed.
        self.refresh_every = max(interval, online_window / 2)
        # Bumped (from any thread) as a round opens, moves on or ends in this process, once committed: a request
        # that read it before its work and finds it unchanged after knows no round here moved meanwhile.
        self.generation = 0
        self._held: dict[str, set[asyncio.Future[Woken]]] = {}
        self._count = 0
        self._fresh: set[str] = set()  # held since the last pass
        self._seen: dict[str, float] = {}  # when each held device's last_seen was last written
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poked: asyncio.Event | None = None

    @property
    def held(self) -> int:
        """Requests held now."""
        return self._count

    async def hold(
        self,
        device_id: str,
        seconds: float,
        receive: Callable[[], Awaitable[Any]],
        since: int | None = None,
    ) -> Woken:
        """Hold a check-in until its device owes a message, its connection closes, or ``seconds`` pass.

        ``receive``: the request's ASGI receive, whose next message (the body was read) is the
        client's disconnect. A device woken by a pass comes with its answer when the pass read it.

        ``since``: a hold whose answer was not read (a round message taken while no round here moved,
        ``server.routers.device_api``): the ``generation`` before the message's work. If a round moved
        since, a pass is made now, so that the device is not left waiting for the next tick if the pass
        the move started missed it; its ``last_seen`` is written by the next pass.
        """
        if self._closing:
            return Woken(Outcome.CLOSING)
        if self._count >= self.capacity:
            return Woken(Outcome.REFUSED)
        fut: asyncio.Future[Woken] = asyncio.get_running_loop().create_future()
        self._held.setdefault(device_id, set()).add(fut)
        self._count += 1
        self._fresh.add(device_id)
        self._seen.setdefault(device_id, self.clock() if since is None else float("-inf"))
        if since is not None and since != self.generation and self._poked is not None:
            self._poked.set()
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            either: set[asyncio.Future[Any]] = {fut, gone}
            done, _ = await asyncio.wait(either, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            return Woken(Outcome.GONE if gone in done else Outcome.EXPIRED)
        finally:
            gone.cancel()
            if not fut.done():
                fut.cancel()
            self._count -= 1
            futures = self._held.get(device_id)
            if futures is not None:
                futures.discard(fut)
                if not futures:
                    del self._held[device_id]
                    self._seen.pop(device_id, None)

    def wake(
        self, device_id: str, outcome: Outcome = Outcome.WOKEN, answer: CheckinResponse | None = None
    ) -> None:
        """Answer the device's held check-ins (with ``answer``, when the pass read it)."""
        for fut in self._held.get(device_id, ()):
            if not fut.done():
                fut.set_result(Woken(outcome, answer))

    def release_all(self) -> None:
        """Answer every held check-in and hold no more: the process is shutting down."""
        self._closing = True
        for device_id in list(self._held):
            self.wake(device_id, Outcome.CLOSING)

    # -- the loop ------------------------------------------------------------

    def start(self) -> None:
        """Start the loop on the running event loop (the app's startup)."""
        self.capacity = fit_open_files(self.capacity)
        self._loop = asyncio.get_running_loop()
        self._poked = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="aicfl-long-polls")

    async def stop(self) -> None:
        """Answer every held check-in and stop the loop (the app's shutdown)."""
        self.release_all()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Make a pass now rather than at the next interval; from any thread."""
        loop, poked = self._loop, self._poked
        if loop is not None and poked is not None and not loop.is_closed():
            loop.call_soon_threadsafe(poked.set)

    # A round this process opened or moved on: its devices hear of it now, not at the next pass. Rounds that
    # another replica drives are found by the pass every ``interval``.

    def round_opened(self, event: RoundOpened) -> None:
        self.generation += 1
        self.poke()

    def stage_ended(self, event: StageEnded) -> None:
        self.generation += 1
        self.poke()

    def round_ended(self, event: RoundEnded) -> None:
        """Nothing to answer (a device that took part owes no more messages), but its devices' next answer
        is no longer ``in_round``."""
        self.generation += 1

    async def _run(self) -> None:
        assert self._poked is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.interval)
            self._poked.clear()
            if not self._held:
                self._fresh.clear()
                continue
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - the loop must outlive a failed pass (the database away)
                log.exception("long-poll pass failed")

    async def step(self) -> None:
        """One pass: wake the held devices that owe a message; keep the others online."""
        now = self.clock()
        fresh = {d for d in self._fresh if d in self._held}
        self._fresh = set()
        for device_id, answer in (await asyncio.to_thread(self._due, fresh, now)).items():
            self.wake(device_id, Outcome.WOKEN, answer)
        stale = [d for d, t in self._seen.items() if now - t >= self.refresh_every]
        if stale:
            await asyncio.to_thread(self.wakeups.mark_seen, stale, now)
            for d in stale:
                if d in self._seen:
                    self._seen[d] = now

    def _due(self, fresh: set[str], now: float) -> dict[str, CheckinResponse | None]:
        """The held devices that owe a message now, with their answers when ``answers`` reads them."""
        due = self.wakeups.due(fresh, now)
        held = [d for d in due if d in self._held]  # a hold may have ended meanwhile: not read for
        if self.answers is None or not held:
            return dict.fromkeys(due)
        return {**dict.fromkeys(due), **self.answers(held)}

    # -- shutdown ------------------------------------------------------------

    def release_on_signals(self) -> Callable[[], None]:
        """Answer the held check-ins as soon as SIGTERM or SIGINT arrives, before the server's handler.

        uvicorn's graceful shutdown waits for every open request before the app hears of it; without
        this it would wait out each hold. Only in the main thread, and only over a handler the
        server installed. Returns what puts the previous handlers back.
        """
        if threading.current_thread() is not threading.main_thread() or self._loop is None:
            return lambda: None
        loop = self._loop
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            prev = signal.getsignal(sig)
            if not callable(prev):
                continue

            def handler(signum: int, frame: FrameType | None, prev: Callable[..., Any] = prev) -> None:
                loop.call_soon_threadsafe(self.release_all)
                prev(signum, frame)

            previous[sig] = prev
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, prev in previous.items():
                signal.signal(sig, prev)

        return restore


SPARE_FILES = 256  # open files kept for the database, blobs, logs and requests not held


def fit_open_files(capacity: int) -> int:
    """The held check-ins this process can afford: each is an open socket. Raises the soft limit on
    open files toward the hard one if needed; below ``capacity`` it holds fewer, and says so."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return capacity
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = capacity + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(0, soft - SPARE_FILES)
        log.warning("%d open files allowed: holding at most %d check-ins, not %d", soft, fitted, capacity)
        return fitted
    return capacity


async def _disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the client has closed its connection."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return
