"""The blob stores against a real S3 server process (moto's, on a free loopback port).

Both stores keep one contract (the same tests, parametrised); the S3 store's keys mirror the local
folder's fan-out, it sends nothing for content it already holds, and a coordinator started with
``AICFL_BLOB_STORE=s3://...`` refuses, in one line, a URL, a bucket or an endpoint it cannot use.
Two coordinator replicas on one PostgreSQL, one bucket and one signing key, each with its own data
folder, serve each other's models: no shared volume.
"""

from __future__ import annotations

import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.blobs import BlobStore, LocalBlobStore
from coordinator.errors import NotFound
from coordinator.s3blobs import S3BlobStore, StoreUnavailable
from server.demo import free_port
from shared.signing import save_private_key
from tests.fixtures.s3 import AWS_ENV, new_bucket, s3_client

from . import harness
from .harness import Coordinator
from .test_cli import aicfl, assert_one_error_line

TOY_APP = "tests.fixtures.toy_app:app"


@pytest.fixture(scope="module")
def shared_bucket(s3_endpoint: str) -> str:
    return new_bucket(s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """A store of each kind, empty: the S3 one under a prefix of its own in the module's bucket."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("shared_bucket")
    return S3BlobStore(bucket, f"test-{secrets.token_hex(4)}", endpoint_url=endpoint)


# -- the contract both stores keep ----------------------------------------------------------------


def test_put_stores_a_blob_once_under_its_sha256_and_get_gives_it_back(store: BlobStore) -> None:
    data = b"model bytes " * 1000
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists(sha) and store.get(sha) == data
    assert store.put(memoryview(data)) == sha
    assert store.get(sha) == data


def test_put_new_writes_a_name_once_and_never_over_another_blob(store: BlobStore) -> None:
    name = secrets.token_hex(32)
    store.put_new(name, memoryview(b"first"))
    with pytest.raises(FileExistsError):
        store.put_new(name, b"second")
    assert store.get(name) == b"first"


def test_a_missing_blob_is_not_found_and_deleting_it_is_fine(store: BlobStore) -> None:
    name = secrets.token_hex(32)
    assert not store.exists(name)
    with pytest.raises(NotFound, match=f"^blob {name[:12]}… is missing from the store$"):
        store.get(name)
    store.delete(name)
    sha = store.put(b"short-lived")
    store.delete(sha)
    store.delete(sha)  # twice: rounds clean up after restarts too
    assert not store.exists(sha)
    with pytest.raises(NotFound, match="is missing from the store"):
        store.get(sha)


@pytest.mark.parametrize("name", ["../../etc/passwd", "ab" * 31, "AB" * 32, "zz" * 32, "ab/" + "c" * 61, ""])
def test_a_name_that_is_not_64_hex_digits_never_reaches_the_store(store: BlobStore, name: str) -> None:
    with pytest.raises(NotFound, match="no blob"):
        store.get(name)
    with pytest.raises(NotFound, match="no blob"):
        store.delete(name)
    with pytest.raises(NotFound, match="no blob"):
        store.put_new(name, b"x")


def test_many_threads_share_one_store(store: BlobStore) -> None:
    blobs = [secrets.token_bytes(2048) for _ in range(48)]
    with ThreadPoolExecutor(12) as pool:
        shas = list(pool.map(store.put, blobs))
        assert list(pool.map(store.get, shas)) == blobs
        list(pool.map(store.delete, shas))
    assert not any(store.exists(s) for s in shas)


# -- what is the S3 store's own -------------------------------------------------------------------


def test_s3_keys_fan_out_under_the_prefix_as_the_local_folders_do(s3_endpoint: str) -> None:
    bucket = new_bucket(s3_endpoint)
    store = S3BlobStore(bucket, "/aicfl/prod/", endpoint_url=s3_endpoint)
    sha = store.put(b"a model")
    name = secrets.token_hex(32)
    store.put_new(name, b"a masked vector")
    listed = s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(
        [f"aicfl/prod/{sha[:2]}/{sha}", f"aicfl/prod/{name[:2]}/{name}"]
    )
    assert store.url == f"s3://{bucket}/aicfl/prod" and s3_endpoint in repr(store)


def test_s3_put_of_content_already_stored_sends_nothing(s3_endpoint: str) -> None:
    # In a versioned bucket every PUT makes a version: one version means one upload.
    bucket = new_bucket(s3_endpoint, versioned=True)
    store = S3BlobStore(bucket, endpoint_url=s3_endpoint)
    sha = store.put(b"an update sent twice")
    assert store.put(b"an update sent twice") == sha
    versions = s3_client(s3_endpoint).list_object_versions(Bucket=bucket)["Versions"]
    assert [v["Key"] for v in versions] == [f"{sha[:2]}/{sha}"]


def test_s3_check_names_the_bucket_and_endpoint_it_cannot_use(s3_endpoint: str) -> None:
    S3BlobStore(new_bucket(s3_endpoint), endpoint_url=s3_endpoint).check()
    with pytest.raises(StoreUnavailable, match=f"^S3 bucket 'nosuch' at {s3_endpoint}: no such bucket$"):
        S3BlobStore("nosuch", endpoint_url=s3_endpoint).check()
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        StoreUnavailable, match=f"^S3 bucket 'aicfl' at {down}: cannot connect to the endpoint$"
    ):
        S3BlobStore("aicfl", endpoint_url=down).check()


def test_s3_check_without_credentials_says_where_they_come_from(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(s3_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(
        StoreUnavailable, match=f"^S3 bucket '{bucket}' at .*: no AWS credentials \\(set AWS_"
    ):
        S3BlobStore(bucket, endpoint_url=s3_endpoint).check()


# -- the coordinator ------------------------------------------------------------------------------


def test_server_start_refuses_a_blob_store_it_cannot_use_in_one_line(
    s3_endpoint: str, tmp_path: Path
) -> None:
    # Each URL mistake has its own message (tests/unit/test_blobs_s3_urls.py); here, that it is one line.
    args = ("server", "start", "--data-dir", str(tmp_path), "--port", str(free_port()))
    shown = aicfl(*args, env={"AICFL_BLOB_STORE": "/srv/blobs"})
    assert_one_error_line(
        shown, "cannot start the coordinator: blob store '/srv/blobs' is not an S3 URL such as s3://BUCKET"
    )
    assert not (tmp_path / "coordinator.db").exists()  # refused before the database was made
    shown = aicfl(*args, env={"AICFL_BLOB_STORE": "s3://nosuch/p", "AICFL_S3_ENDPOINT_URL": s3_endpoint})
    assert_one_error_line(
        shown, f"cannot start the coordinator: S3 bucket 'nosuch' at {s3_endpoint}: no such bucket"
    )
    down = f"http://127.0.0.1:{free_port()}"
    shown = aicfl(*args, env={"AICFL_BLOB_STORE": "s3://aicfl", "AICFL_S3_ENDPOINT_URL": down})
    assert_one_error_line(shown, f"S3 bucket 'aicfl' at {down}: cannot connect to the endpoint")


@pytest.mark.postgres
def test_replicas_on_one_bucket_serve_each_others_models_without_a_shared_folder(
    s3_endpoint: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(s3_endpoint)
    # One key for both, as replicas must have: one with a key of its own would refuse to start.
    key_file = tmp_path / "secret" / "coordinator_key.pem"
    key_file.parent.mkdir(mode=0o700)
    save_private_key(Ed25519PrivateKey.generate(), str(key_file))  # a Secret mounted in every replica
    # harness.ENV was copied from the environment when it was imported: the processes get these too.
    for name, value in {
        **AWS_ENV,
        "AICFL_BLOB_STORE": f"s3://{bucket}/coordinator",
        "AICFL_S3_ENDPOINT_URL": s3_endpoint,
        "AICFL_SIGNING_KEY_FILE": str(key_file),
    }.items():
        monkeypatch.setitem(harness.ENV, name, value)
    first = Coordinator(tmp_path / "a", db=postgres_url)
    second = Coordinator(tmp_path / "b", db=postgres_url)
    first.bootstrap()
    second.root.mkdir()
    second.token = first.token
    try:
        with ThreadPoolExecutor(2) as pool:  # two replicas starting together, as a Deployment's do
            list(pool.map(Coordinator.start, (first, second)))
        spec = {
            "name": "s3",
            "rounds": 1,
            "seed": 3,
            "model": {"app": TOY_APP},
            "cohort": {"target": 2, "minimum": 2},
            "audit": {"enabled": False},
        }
        job = first.api().json("POST", "/v1/jobs", json=spec)
        versions = second.api().json("GET", f"/v1/jobs/{job['id']}/models")
        assert [v["version"] for v in versions] == [0]
        sha = versions[0]["sha256"]
        stored = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=f"coordinator/{sha[:2]}/{sha}")
        data = stored["Body"].read()
        assert hashlib.sha256(data).hexdigest() == sha
        served = httpx.get(
            f"{second.url}/v1/jobs/{job['id']}/models/0/blob",
            headers={"Authorization": f"Bearer {first.token}"},
        )
        assert served.status_code == 200 and served.content == data
        for coord in (first, second):
            assert not (coord.data_dir / "blobs").exists(), sorted(coord.data_dir.rglob("*"))
        assert f"blobs in s3://{bucket}/coordinator at {s3_endpoint}" in first.log.read_text()
    finally:
        first.stop()
        second.stop()
