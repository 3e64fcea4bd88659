"""The federation engine: one context and the parts that act on it.

| part | module | what it does |
|---|---|---|
| ``jobs`` | ``coordinator.jobs`` | operator actions: submit, reference data, cancel |
| ``checkins`` | ``coordinator.checkins`` | a device's next task, and its model download |
| ``devices`` | ``coordinator.devices`` | each stage's device message |
| ``driver`` | ``coordinator.driver`` | open, drive, finish (``coordinator.finish``) and abandon rounds |
| ``sums`` | ``coordinator.aggregation`` | the running plain and masked sums of each round |
| ``cluster`` | ``coordinator.cluster`` | pre-trained version 0, AutoML baselines |
| ``audits`` | ``coordinator.cluster`` | the audit workers' queue |

Everything goes through the database, so a coordinator killed at any moment
restarts and goes on: the state machine of each round is in its rows, the
deadlines are absolute times, and the aggregate of a round is recomputed from
the stored vectors whenever the running sum held in memory does not account
for exactly the devices the database says have sent theirs. The API's routers
call the parts directly; docs/architecture.md draws the whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session, sessionmaker

from coordinator.aggregation import Sums
from coordinator.blobs import BlobStore
from coordinator.checkins import CheckIns
from coordinator.cluster import AuditQueue, ClusterHooks
from coordinator.context import EngineContext, EngineSettings
from coordinator.devices import DeviceProtocol
from coordinator.driver import RoundDriver
from coordinator.finish import RoundFinisher
from coordinator.jobs import JobAdmin

__all__ = ["EngineSettings", "Federation"]


class Federation(EngineContext):
    """The engine's context (sessions, blobs, key, clock) with its parts attached, each sharing it."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        blobs: BlobStore,
        signing_key: Ed25519PrivateKey,
        settings: EngineSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(factory, blobs, signing_key, settings, clock)
        self.sums = Sums(self)
        finisher = RoundFinisher(self, self.sums)
        self.driver = RoundDriver(self, self.sums, finisher)
        self.jobs = JobAdmin(self, self.driver, finisher)
        self.checkins = CheckIns(self)
        self.devices = DeviceProtocol(self, self.driver, self.sums)
        self.cluster = ClusterHooks(self)
        self.audits = AuditQueue(self)

    def tick(self) -> None:
        """One pass of the round driver over every running job."""
        self.driver.tick()
