"""Shared fixtures: a fresh database of each kind (SQLite file, PostgreSQL on 127.0.0.1:5432), and a
real coordinator process on loopback."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest-xdist's workers start with COLUMNS=80 in their environment, where a serial run has none,
# and rich reads COLUMNS once, when the CLI's console is made (at import): drop it before any test
# imports the CLI, so that each test's command draws at the width that test sets, with -n or without.
os.environ.pop("COLUMNS", None)

PG_ADMIN = os.environ.get("AICFL_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def _pg_connect():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"aicfl_test_{secrets.token_hex(4)}"
    try:
        admin = _pg_connect()
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is not reachable with {PG_ADMIN!r}: {err}")
    admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_ADMIN.split())
    url = f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{name}"
    try:
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on both databases."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[object]:
    """A real coordinator (``tests.integration.harness.Coordinator``) on a free loopback port, with its
    first admin token; its agents and itself are stopped afterwards."""
    from tests.integration.harness import Coordinator

    c = Coordinator(tmp_path)
    c.bootstrap()
    c.start()
    yield c
    c.stop_agents()
    c.stop()
