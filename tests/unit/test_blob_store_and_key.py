"""The blob store (content-addressed, atomic, no path tricks) and the coordinator's one signing key."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from coordinator.blobs import LocalBlobStore
from coordinator.errors import NotFound
from coordinator.keys import load_or_create_signing_key
from shared.signing import public_key_bytes, save_private_key


def test_blobs_are_stored_once_under_their_sha256(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    sha = store.put(b"model bytes")
    assert sha == hashlib.sha256(b"model bytes").hexdigest()
    assert store.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert store.get(sha) == b"model bytes" and store.exists(sha)
    mtime = store.path(sha).stat().st_mtime_ns
    assert store.put(memoryview(b"model bytes")) == sha  # the same content is not written again
    assert store.path(sha).stat().st_mtime_ns == mtime
    store.delete(sha)
    store.delete(sha)  # deleting twice is fine: rounds clean up after restarts too
    assert not store.exists(sha)
    with pytest.raises(NotFound, match=f"blob {sha[:12]}… is missing from the store"):
        store.get(sha)


@pytest.mark.parametrize("name", ["../../etc/passwd", "ab" * 31, "AB" * 32, "zz" * 32, ""])
def test_a_name_that_is_not_a_sha256_never_reaches_the_filesystem(tmp_path: Path, name: str) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(NotFound, match="no blob"):
        store.get(name)
    with pytest.raises(NotFound, match="no blob"):
        store.delete(name)


def test_a_failed_write_leaves_no_blob_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"x" * 100
    sha = hashlib.sha256(data).hexdigest()

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.put(data)
    assert not store.exists(sha)
    assert list(store.path(sha).parent.iterdir()) == []


def test_signing_key_is_made_once_private_and_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "data" / "coordinator_key.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert public_key_bytes(again) == public_key_bytes(key)
    assert [p.name for p in path.parent.iterdir()] == ["coordinator_key.pem"]  # no temporary left


def test_a_replica_that_loses_the_race_uses_the_key_that_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "coordinator_key.pem"
    winner = load_or_create_signing_key(tmp_path / "other.pem")
    real_link = os.link

    def link_after_the_other_replica(src: str | Path, dst: str | Path) -> None:
        # The other replica links its key in between our existence check and our link.
        save_private_key(winner, str(dst))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_other_replica)
    key = load_or_create_signing_key(path)
    assert public_key_bytes(key) == public_key_bytes(winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coordinator_key.pem", "other.pem"]
