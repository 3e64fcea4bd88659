"""Ending a secure round deletes every masked blob of that round, also one that no row names.

A device's masked vector is written to the blob store before the row that names it commits
(``devices.masked_input``; with one process, the masked sum before the round's row names it,
``Sums.store_masked``). A coordinator killed between the two leaves a blob nothing refers to. Its name
begins with the round's prefix (``aggregation.round_prefix``), and the round's end deletes everything
under that prefix (``BlobStore.delete_prefix``), on the local folder and on S3 alike.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator import s3blobs
from coordinator.aggregation import ROUND_PREFIX_DIGITS, round_prefix
from coordinator.blobs import BlobStore, LocalBlobStore
from coordinator.s3blobs import S3BlobStore
from shared import codec
from tests.fixtures.s3 import new_bucket

from . import test_secure_engine
from .test_secure_engine import STAGES, Rig, masked_header

rig = test_secure_engine.rig  # the fixture: a SecAgg+ round on each database


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The rigs of the test keep their blobs in a local folder, or in a bucket of a moto S3 server."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = new_bucket(endpoint)
        monkeypatch.setattr(
            test_secure_engine,
            "LocalBlobStore",
            lambda folder: S3BlobStore(bucket, f"rig-{secrets.token_hex(4)}", endpoint_url=endpoint),
        )
    return str(request.param)


def killed_upload(r: Rig, round_id: int) -> str:
    """What a coordinator killed mid-upload leaves: a masked vector stored, its message never committed."""
    body = codec.encode(masked_header(round_id), np.arange(r.n_params + 1, dtype=np.uint64))
    return r.fed.sums.spool(body)


@pytest.mark.parametrize("ending", ["completed", "cancelled"])
def test_a_masked_vector_whose_message_never_committed_is_deleted_when_its_round_ends(
    rig: Callable[..., Rig], store_kind: str, ending: str
) -> None:
    r = rig(4)
    for name in STAGES[:3]:
        r.stage(name)
    orphan = killed_upload(r, r.round_id)
    elsewhere = killed_upload(r, r.round_id + 1)  # another round's, still running somewhere
    assert orphan.startswith(r.fed.sums.prefix(r.round_id))
    assert not elsewhere.startswith(r.fed.sums.prefix(r.round_id))
    r.stage("masked_input")
    named = r.masked_blobs()  # each vector (PostgreSQL) or their sum (SQLite), named by rows
    assert named and all(r.fed.blobs.exists(b) for b in [orphan, *named])
    if ending == "completed":
        r.stage("unmask")
        r.assert_exact()  # the stray vector took no part in the sum
    else:
        r.fed.jobs.cancel(r.job_id, "test")
        assert r.round_row()["status"] == "abandoned"
    assert not r.fed.blobs.exists(orphan), "the unnamed masked vector outlived its round"
    assert not any(r.fed.blobs.exists(b) for b in named)
    assert r.fed.blobs.exists(elsewhere)  # another round's prefix: untouched
    np.testing.assert_array_equal(r.version(0), r.v0)  # models live beside them: untouched


def test_round_prefixes_differ_by_round_and_by_coordinator_key() -> None:
    a, b = secrets.token_bytes(32), secrets.token_bytes(32)
    prefixes = {round_prefix(key, n) for key in (a, b) for n in range(1, 101)}
    assert len(prefixes) == 200
    assert all(len(p) == ROUND_PREFIX_DIGITS and int(p, 16) >= 0 for p in prefixes)
    assert round_prefix(a, 7) == round_prefix(a, 7)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """An empty store of each kind: the S3 one under a prefix of its own in a new bucket."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3BlobStore(new_bucket(endpoint), f"test-{secrets.token_hex(4)}", endpoint_url=endpoint)


def test_delete_prefix_deletes_the_blobs_under_it_and_nothing_else(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3blobs, "PAGE", 2)  # several LIST pages and DeleteObjects requests
    prefix = "ab" + secrets.token_hex(7)
    under = [prefix + secrets.token_hex(24) for _ in range(5)]
    beside = "ab" + secrets.token_hex(31)  # the same fan-out folder, another prefix
    for name in [*under, beside]:
        store.put_new(name, name.encode())
    model = store.put(b"a model")
    assert store.delete_prefix(prefix) == len(under)
    assert not any(store.exists(n) for n in under)
    assert store.exists(beside) and store.exists(model)
    assert store.delete_prefix(prefix) == 0  # nothing left: fine, as deleting a missing blob is


def test_delete_prefix_on_the_local_folder_also_removes_a_write_a_killed_process_left(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    prefix = secrets.token_hex(8)
    name = prefix + secrets.token_hex(24)
    store.put_new(name, b"kept until the round ends")
    half = store.path(name).parent / f".{prefix}{secrets.token_hex(24)}.k1ll3d"  # put_new's temporary
    half.write_bytes(b"half a masked vec")
    model_write = store.path(name).parent / ".tmp-unfinished"  # put's temporary: not the round's
    model_write.write_bytes(b"half a model")
    assert store.delete_prefix(prefix) == 1
    assert not store.exists(name) and not half.exists() and model_write.exists()


@pytest.mark.parametrize("prefix", ["", "a", "AB", "../etc", "ab/", "g" * 16, "a" * 65])
def test_a_prefix_that_is_not_2_to_64_hex_digits_is_refused(store: BlobStore, prefix: str) -> None:
    name = store.put(b"still here")
    with pytest.raises(ValueError, match="2 to 64 lowercase hex digits"):
        store.delete_prefix(prefix)
    assert store.exists(name)


def test_the_temporary_of_put_new_is_gone_once_the_name_is_written_or_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    name = hashlib.sha256(b"a name").hexdigest()
    store.put_new(name, b"first")
    with pytest.raises(FileExistsError):
        store.put_new(name, b"second")
    assert store.get(name) == b"first"
    assert [p.name for p in store.path(name).parent.iterdir()] == [name]
