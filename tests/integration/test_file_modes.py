"""What the coordinator keeps on disk is its own: no other local user may read it.

The data folder holds the SQLite database (operator and enrolment token hashes, unmasking shares), the
blob store (models, masked vectors) and the model-signing key. Folders are 0700 and files 0600, under
a wide umask too, and a data folder left readable by an older version is made private again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from coordinator.blobs import LocalBlobStore
from coordinator.datadir import prepare_data_dir
from coordinator.keys import load_or_create_signing_key
from coordinator.store import make_engine, migrate

from .harness import Coordinator


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wide_modes(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that another user could read or enter."""
    return [
        f"{p} {mode(p):o}" for p in [root, *root.rglob("*")] if mode(p) != (0o700 if p.is_dir() else 0o600)
    ]


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """The umask most systems start processes with: new files 0644, folders 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_database_blobs_and_key_are_private_under_a_wide_umask(tmp_path: Path, wide_umask: None) -> None:
    data = prepare_data_dir(tmp_path / "data")
    engine = make_engine(f"sqlite:///{data / 'coordinator.db'}")
    migrate(engine)
    with engine.begin() as conn:  # a write, so that the WAL and shared-memory files exist
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    blobs = LocalBlobStore(data / "blobs")
    blobs.put(b"a model")
    blobs.put_new("ab" * 32, b"a masked vector")
    load_or_create_signing_key(data / "coordinator_key.pem")
    assert {p.name for p in data.iterdir()} >= {
        "coordinator.db",
        "coordinator.db-wal",
        "coordinator.db-shm",
        "blobs",
        "coordinator_key.pem",
    }
    assert wide_modes(data) == []
    engine.dispose()


def test_a_data_folder_left_readable_is_made_private(tmp_path: Path, wide_umask: None) -> None:
    data = tmp_path / "data"
    (data / "blobs" / "ab").mkdir(parents=True)
    for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "coordinator_key.pem"):
        (data / name).touch(mode=0o644)
    load_or_create_signing_key(tmp_path / "elsewhere" / "key.pem").public_key()  # made 0600 where asked
    (data / "coordinator_key.pem").write_bytes((tmp_path / "elsewhere" / "key.pem").read_bytes())
    os.chmod(data / "coordinator_key.pem", 0o644)
    prepare_data_dir(data)
    LocalBlobStore(data / "blobs")
    assert mode(data) == 0o700 and mode(data / "blobs") == 0o700
    for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "coordinator_key.pem"):
        assert mode(data / name) == 0o600, name
    assert mode(tmp_path / "elsewhere" / "key.pem") == 0o600


def test_a_running_coordinator_keeps_its_data_private(tmp_path: Path, wide_umask: None) -> None:
    """As the operator starts it (``aicfl admin bootstrap``, ``aicfl server start``); what the blob store
    writes is checked above."""
    coord = Coordinator(tmp_path)
    coord.bootstrap()
    coord.start()
    try:
        coord.api().json("POST", "/v1/enrollment-tokens", json={"count": 1, "ttl_seconds": 60})  # a write
        assert {p.name for p in coord.data_dir.iterdir()} >= {
            "coordinator.db",
            "blobs",
            "coordinator_key.pem",
        }
        assert wide_modes(coord.data_dir) == []
    finally:
        coord.stop()
