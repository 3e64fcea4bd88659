"""Coordinators that share a blob store sign with one key, or the one that differs refuses to start.

The refusals are real ``aicfl server start`` processes; the coordinators that start are built in-process
by ``server.app.build_federation``, what ``server start`` runs before it serves.

Agents pin the coordinator's public key when they enroll: a replica with a key of its own would sign
versions that half the agents refuse. The first coordinator on a store publishes its public key there
(``coordinator.keys.publish_public_key``, a conditional write); a later one with another key stops at
start, in one line naming both keys' fingerprints and the fix. Rotating the key on purpose means
deleting the published key first (docs/replicas.md).
"""

from __future__ import annotations

import base64
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.blobs import LocalBlobStore
from coordinator.errors import SigningKeyMismatch
from coordinator.keys import PUBLISHED_KEY, fingerprint, load_or_create_signing_key, publish_public_key
from server.app import build_federation
from server.demo import free_port
from server.settings import ServerSettings
from shared.signing import b64e, public_key_bytes, save_private_key
from tests.fixtures.s3 import AWS_ENV, new_bucket, s3_client

from . import harness
from .harness import py


def key_file(path: Path) -> tuple[Path, str]:
    """A new key saved at ``path``, and its public key as the coordinator serves it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    save_private_key(key, str(path))
    return path, b64e(public_key_bytes(key))


def served_by(data_dir: Path, key: Path, **settings: str) -> str:
    """The public key a coordinator started in-process (``build_federation``, as ``server start`` does)
    signs with."""
    fed = build_federation(ServerSettings(data_dir=data_dir, signing_key_file=key, **settings))
    fed.factory.kw["bind"].dispose()
    return b64e(public_key_bytes(fed.key))


def start_refused(data_dir: Path, *flags: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``aicfl server start`` as its own process (``key``: its AICFL_SIGNING_KEY_FILE), expected to stop."""
    return subprocess.run(
        py("server", "server", "start", "--port", str(free_port()), "--data-dir", str(data_dir), *flags),
        capture_output=True,
        text=True,
        env={**harness.ENV, **({"AICFL_SIGNING_KEY_FILE": str(key)} if key else {})},
        timeout=60,
    )


def fingerprint_of(public_b64: str) -> str:
    return fingerprint(base64.b64decode(public_b64))


def test_a_coordinator_with_another_key_on_the_same_store_refuses_in_one_line_until_the_key_is_rotated(
    tmp_path: Path,
) -> None:
    first_file, first_key = key_file(tmp_path / "secret" / "first.pem")
    other_file, other_key = key_file(tmp_path / "secret" / "other.pem")
    data_dir = tmp_path / "server"
    assert served_by(data_dir, first_file) == first_key  # the first coordinator on the folder publishes
    # A second coordinator on the same folder (so the same blobs), given another key file.
    shown = start_refused(data_dir, key=other_file)
    assert shown.returncode == 1, shown
    assert shown.stdout == "" and shown.stderr.count("\n") == 1, shown
    line = shown.stderr.strip()
    assert line.startswith("error: cannot start the coordinator: the signing key "), line
    published = data_dir / "blobs" / PUBLISHED_KEY[:2] / PUBLISHED_KEY
    for fragment in (
        f"{other_file} ({fingerprint_of(other_key)})",
        f"sign with ({fingerprint_of(first_key)})",
        "give every replica the same key file (AICFL_SIGNING_KEY_FILE",
        f"to rotate the key on purpose, delete the published key {published} first",
    ):
        assert fragment in line, line
    assert served_by(data_dir, first_file) == first_key  # the refusal changed nothing
    # The operator rotates the key as the message says: the new key is published and used.
    published.unlink()
    assert served_by(data_dir, other_file) == other_key
    with pytest.raises(SigningKeyMismatch, match=fingerprint_of(other_key)):
        served_by(data_dir, first_file)


def test_replicas_on_one_bucket_start_with_one_key_file_and_not_with_their_own(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(s3_endpoint)
    store = {"blob_store": f"s3://{bucket}/fl", "s3_endpoint_url": s3_endpoint}
    # harness.ENV was copied from the environment when it was imported: the process gets these too.
    for name, value in {
        **AWS_ENV,
        "AICFL_BLOB_STORE": store["blob_store"],
        "AICFL_S3_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setitem(harness.ENV, name, value)
    # Each replica its own data folder and, without AICFL_SIGNING_KEY_FILE, its own key made there.
    first_file = tmp_path / "a" / "coordinator_key.pem"
    first_key = served_by(tmp_path / "a", first_file, **store)
    shown = start_refused(tmp_path / "b", "--log-level", "warning")
    assert shown.returncode == 1 and shown.stdout == "", shown
    assert shown.stderr.count("\n") == 1 and "Traceback" not in shown.stderr, shown
    own = load_or_create_signing_key(tmp_path / "b" / "coordinator_key.pem")
    assert f"({fingerprint(public_key_bytes(own))}) is not the one" in shown.stderr, shown
    assert f"({fingerprint_of(first_key)})" in shown.stderr, shown
    assert f"blob {PUBLISHED_KEY} in S3BlobStore('s3://{bucket}/fl'" in shown.stderr, shown
    assert not (tmp_path / "b" / "coordinator.db").exists()  # refused before the database was made
    # A replica given the first one's key file (as a Secret mounted in each) starts beside it.
    assert served_by(tmp_path / "c", first_file, **store) == first_key
    keys = s3_client(s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="fl/")["Contents"]
    assert [o["Key"] for o in keys] == [f"fl/{PUBLISHED_KEY[:2]}/{PUBLISHED_KEY}"]


def publish_together(store: LocalBlobStore, keys: list[Ed25519PrivateKey]) -> list[int]:
    """Each key published from a thread of its own, all released at once; the indices of those refused."""
    start = threading.Barrier(len(keys))
    refused: list[int] = []

    def publish(i: int) -> None:
        start.wait()
        try:
            publish_public_key(store, keys[i], f"key{i}.pem")
        except SigningKeyMismatch:
            refused.append(i)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return refused


def test_of_coordinators_starting_together_with_different_keys_exactly_one_publishes(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    keys = [Ed25519PrivateKey.generate() for _ in range(8)]
    refused = publish_together(store, keys)
    assert len(refused) == len(keys) - 1, refused
    (winner,) = set(range(len(keys))) - set(refused)
    assert b64e(public_key_bytes(keys[winner])).encode() in store.get(PUBLISHED_KEY)
    publish_public_key(store, keys[winner], "again.pem")  # the same key again: nothing to refuse
    left = [p.name for p in store.path(PUBLISHED_KEY).parent.iterdir()]
    assert left == [PUBLISHED_KEY]  # no temporary file


def test_replicas_starting_together_with_one_key_all_start(tmp_path: Path) -> None:
    # The first one's write must never be read half done by another: it would look like another key.
    key = Ed25519PrivateKey.generate()
    for attempt in range(40):
        assert publish_together(LocalBlobStore(tmp_path / f"blobs{attempt}"), [key] * 8) == []
