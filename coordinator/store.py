"""Database engine, sessions and migrations (SQLite in WAL mode or PostgreSQL).

A SQLite database holds token hashes and unmasking shares: its file, made 0600 before SQLite opens
it, gives its mode to the WAL and shared-memory files SQLite makes beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from coordinator.datadir import restrict

MIGRATIONS = Path(__file__).with_name("migrations")


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and use the psycopg 3 driver for it."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """An engine tuned for the coordinator's many short transactions."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            _private_sqlite(path)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            if path is not None:  # a database made by an older version, or under a wide umask
                for suffix in ("-wal", "-shm"):
                    restrict(f"{path}{suffix}")

        return engine
    # As many kept connections as threads that run transactions at once (Starlette's thread pool: 40), so that
    # a loaded coordinator reuses them: with 10 kept and 20 overflow, every connection past the tenth was
    # opened and closed again under load (a PostgreSQL backend forked each time; a 10,000-device idle fleet
    # showed no connection older than four seconds). 40 per replica stays under PostgreSQL's default
    # max_connections of 100 with two replicas.
    return create_engine(url, pool_size=40, max_overflow=10, pool_pre_ping=True)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _private_sqlite(path: Path) -> None:
    """Make the database file 0600 (created empty if missing, so that SQLite never makes it wider)."""
    if path.parent.is_dir():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            return  # not ours to make: SQLite will say why it cannot open it
    for suffix in ("", "-wal", "-shm"):
        restrict(f"{path}{suffix}")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several replicas may start at once: one migrates, the others wait.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(74207331)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session
