"""What every part of the federation engine shares: the database, the blob store, the key, the clock.

The parts (job administration, the device protocol, the round driver, aggregation, the cluster and
audit hooks) hold one ``EngineContext`` each and keep no state of their own beyond caches of facts
that never change once written (a job's spec, a version's size), so that a coordinator killed at
any moment restarts from the database alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session, sessionmaker

from coordinator import apps, registry, secure
from coordinator.blobs import BlobStore, LocalBlobStore
from coordinator.errors import NotFound
from coordinator.models import Job, ModelVersion
from coordinator.queries import get_job
from coordinator.statements import NUM_PARAMETERS, RoundRow
from shared.jobspec import JobSpec

log = logging.getLogger("aicfl.coordinator")
_AFTER_COMMIT = "aicfl_after_commit"  # the key of a session's ``info`` that holds its callbacks
# How long ``in_place`` waits for another writer of this process (a transaction takes a few ms) before the
# work goes to a thread after all. Without a wait, one request handed to a thread kept the lock while it
# waited for the GIL, the next found it taken, and so on: a quarter of a round's requests went to threads.
IN_PLACE_WAIT = 0.01
# After a wait that ran out (a long transaction: a round's finalize in the ticker), ``in_place`` does not
# wait again for this long: the event loop is not held up ``IN_PLACE_WAIT`` by every request meanwhile.
IN_PLACE_BACKOFF = 0.1


@dataclass
class EngineSettings:
    eligibility_window: float = 30.0
    # Check-in pacing (coordinator.pacing): when a device that does not wait is told to come back,
    # and the longest a check-in of one that does is held.
    idle_retry: float = 60.0
    poll_retry: float = 2.0
    active_retry: float = 0.5
    long_poll: float = 55.0
    evaluate_after_last_round: bool = True


class EngineContext:
    """Sessions, locks, blobs, signing key, clock, and the caches of facts written once."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        blobs: BlobStore,
        signing_key: Ed25519PrivateKey,
        settings: EngineSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.factory = factory
        self.clock = clock  # simulation mode advances a virtual clock past stage deadlines
        self.blobs = blobs
        self.key = signing_key
        self.settings = settings or EngineSettings()
        engine = factory.kw["bind"]
        # SQLite allows one writer: serialise our writers in-process rather than
        # let a read transaction fail to upgrade. PostgreSQL uses row locks.
        self.sqlite = engine.dialect.name == "sqlite"
        self._write_lock: Any = threading.RLock() if self.sqlite else nullcontext()
        # Every statement and blob an in-process library call (SQLite, the local folder): no device request's
        # work waits on the network (``in_place``).
        self.in_process = self.sqlite and isinstance(blobs, LocalBlobStore)
        self._in_place_after = 0.0  # in_place does not wait for the write lock before this (time.monotonic)
        self.reference: dict[str, Any] = {}  # reference data as the job's app parsed it, by blob hash
        # The newest version of each job, as registered here: the next round starts from it.
        self._latest: dict[int, tuple[str, dict[str, Any], np.ndarray]] = {}
        self._job_info: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self._specs: dict[int, JobSpec] = {}  # validated job specs: a spec never changes once submitted
        self._sizes: dict[tuple[int, int | None], int] = {}  # parameters of each (job, version): fixed too

    # -- transactions ------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction; what ``after_commit`` registered in it runs once it has committed."""
        with self._write_lock, self.factory() as session:
            with session.begin():
                yield session
            callbacks = session.info.pop(_AFTER_COMMIT, [])
        _run(callbacks)

    def after_commit(self, s: Session | secure.Db, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the write transaction of ``s`` has committed; never if it rolls back.

        For what cannot be undone and must not happen unless the transaction's decision holds: deleting
        a finished round's stored vectors. A failure of ``fn`` is logged; the transaction stands.
        """
        secure.orm(s).info.setdefault(_AFTER_COMMIT, []).append(fn)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.factory() as session:
            yield session

    def lock(self, stmt: Any) -> Any:
        """``stmt`` selecting its rows for update where the database has row locks (PostgreSQL)."""
        return stmt if self.sqlite else stmt.with_for_update()

    @contextmanager
    def device_write(self) -> Iterator[secure.Db]:
        """A write transaction of a device-message path: Core statements, an ORM session only if needed."""
        callbacks: list[Callable[[], None]] = []
        with self._write_lock, self.factory.kw["bind"].begin() as conn:
            db = secure.Db(conn)
            try:
                yield db
                db.flush()
                session = db._session  # only a path that ended a stage or a round made one
                if session is not None:
                    callbacks = session.info.pop(_AFTER_COMMIT, [])
            finally:
                db.close()
        _run(callbacks)  # the connection's transaction committed as its block ended

    @contextmanager
    def in_place(self) -> Iterator[bool]:
        """Whether a small device request's work may be done on the calling thread, now, rather than handed
        to a worker thread: only with in-process storage (``in_process``) and the write lock free, which
        is then held until the block ends, so that nothing done in it waits for another writer of this
        process. A writer in another thread is waited for up to ``IN_PLACE_WAIT``, and not at all for
        ``IN_PLACE_BACKOFF`` after such a wait ran out. The server's event loop does so
        (``server.security.SignedRequest.run``): on SQLite the hand-off to a thread and back cost more
        than the work itself.
        """
        if not self.in_process:
            yield False
            return
        lock = self._write_lock
        if not lock.acquire(blocking=False):
            if time.monotonic() < self._in_place_after:
                yield False
                return
            if not lock.acquire(timeout=IN_PLACE_WAIT):
                self._in_place_after = time.monotonic() + IN_PLACE_BACKOFF
                yield False
                return
        try:
            yield True
        finally:
            lock.release()

    @contextmanager
    def device_read(self) -> Iterator[secure.Db]:
        with self.factory.kw["bind"].connect() as conn:
            db = secure.Db(conn)
            try:
                yield db
            finally:
                db.close()

    # -- facts written once ------------------------------------------------

    def spec(self, s: Session, job_id: int) -> JobSpec:
        """A job's validated spec, read once (a spec never changes once submitted)."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = JobSpec.model_validate(get_job(s, job_id).spec)
        return spec

    def job_spec(
        self, s: Session | secure.Db, job_id: int, need_preprocess: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A job's spec and preprocessing as sent to devices, cached: both are written once and never change."""
        cached = self._job_info.get(job_id)
        if cached is None or (need_preprocess and cached[1] is None):
            job = get_job(secure.orm(s), job_id)
            cached = self._job_info[job_id] = (job.spec, job.preprocess)
        return cached

    def num_parameters(self, s: Session | secure.Db, r: RoundRow) -> int:
        """The size of the model a training round starts from."""
        key = (r.job_id, r.model_version_in)
        if key not in self._sizes:
            n = secure.run(s, NUM_PARAMETERS, job=r.job_id, version=r.model_version_in).scalar()
            if n is None:
                raise NotFound(f"job {r.job_id} has no model version {r.model_version_in}")
            self._sizes[key] = int(n)
        return self._sizes[key]

    # -- model versions ----------------------------------------------------

    def register(
        self,
        s: Session,
        job: Job,
        vector: np.ndarray,
        arch: dict[str, Any],
        *,
        version: int = 0,
        parent: int | None = None,
        round_number: int | None = None,
        metrics: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Register a version of ``job`` (content-hashed, signed) and keep it in memory: the next round
        starts from it."""
        row = registry.register_version(
            s,
            self.blobs,
            self.key,
            job_id=job.id,
            version=version,
            vector=vector,
            arch=arch,
            preprocess=job.preprocess,
            parent=parent,
            round_number=round_number,
            metrics=metrics,
            provenance=provenance,
        )
        self._latest[job.id] = (
            row.sha256,
            {"arch": arch, "preprocess": job.preprocess, "version": version},
            vector,
        )
        return row

    def vector(self, job_id: int, row: ModelVersion) -> tuple[dict[str, Any], np.ndarray]:
        """A version's header and parameters, from memory when this process made it."""
        cached = self._latest.get(job_id)
        if cached is not None and cached[0] == row.sha256:
            return cached[1], cached[2]
        return registry.load_vector(self.blobs, row)

    def central(
        self, job: Job, spec: JobSpec, arch: dict[str, Any], vec: np.ndarray
    ) -> dict[str, float] | None:
        """A model's metrics on the job's reference data (central evaluation by its app), if the job
        has reference data."""
        sha = job.reference_sha256
        if not sha or job.preprocess is None:
            return None
        app = apps.app_for(spec)
        job_ctx = apps.context(spec, job.preprocess)
        reference = self.reference.get(sha)
        if reference is None:
            reference = self.reference[sha] = app.load_reference(self.blobs.get(sha), job_ctx)
        return apps.evaluate_central(app, job_ctx, reference, vec)


def _run(callbacks: list[Callable[[], None]]) -> None:
    for fn in callbacks:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the transaction has committed: its decision stands
            log.exception("an after-commit action failed")
