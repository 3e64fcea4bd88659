"""The Alembic migrations build exactly the schema the SQLAlchemy models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from coordinator.models import Base
from coordinator.store import make_engine, migrate


def test_migrations_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_round_timelines_migration_keeps_older_rounds_readable(database_url: str) -> None:
    """0004 adds ``rounds.stages``: a round written under 0003 reads as an empty timeline afterwards."""
    import json
    from datetime import UTC, datetime

    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from coordinator.models import Round
    from coordinator.queries import round_dict
    from coordinator.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_revision("0004").down_revision == "0003"
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            now = datetime.now(UTC)
            conn.execute(
                text(
                    "INSERT INTO jobs (id, name, spec, status, created_at, updated_at, created_by, "
                    "rounds_completed, next_round) VALUES (1, 'old', :spec, 'running', :now, :now, 'op', 0, 1)"
                ),
                {"spec": json.dumps({}), "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO rounds (id, job_id, number, kind, stage, status, stage_deadline, started_at, "
                    "minimum, metrics, secure) VALUES (1, 1, 0, 'stats', 'input', 'running', 10.0, :now, 2, "
                    "'{}', false)"
                ),
                {"now": now},
            )
        migrate(engine)
        with Session(engine) as s:
            r = s.get(Round, 1)
            assert r is not None and r.stages is None
            assert round_dict(r, {})["stages"] == []
    finally:
        engine.dispose()
