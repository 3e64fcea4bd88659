"""Operator and device authentication, enrollment and the model registry, on a real SQLite file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.auth import (
    authenticate_device,
    authenticate_operator,
    bootstrap_admin,
    create_enrollment_tokens,
    create_operator_token,
    enroll_device,
    hash_token,
    revoke_device,
)
from coordinator.blobs import LocalBlobStore
from coordinator.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from coordinator.models import Device, DeviceNonce, EnrollmentToken, Job, ModelVersion
from coordinator.registry import get_version, load_vector, register_version
from coordinator.store import make_engine, migrate, session_factory, transaction
from shared.signing import (
    HEADER_DEVICE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    b64e,
    canonical_request,
    public_key_bytes,
    sha256_hex,
    sign_request,
    verify_model,
)

WINDOW = 300.0
PATH = "/v1/devices/checkin"
BODY = b'{"agent_version": "0.1"}'


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "aicfl.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{db_path}")
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def enroll(factory: sessionmaker[Session], key: Ed25519PrivateKey, name: str = "edge-1") -> str:
    with transaction(factory) as s:
        (token,) = create_enrollment_tokens(s, 1, 3600, actor="admin")
    with transaction(factory) as s:
        device = enroll_device(s, token, b64e(public_key_bytes(key)), name, "linux-x86_64")
        return device.id


def auth_device(factory: sessionmaker[Session], headers: dict[str, str], body: bytes = BODY) -> Device:
    with transaction(factory) as s:
        return authenticate_device(s, headers, "POST", PATH, body, window_seconds=WINDOW)


# -- operators ---------------------------------------------------------------------


def test_bootstrap_admin_returns_a_token_once(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        token = bootstrap_admin(s)
    assert token.startswith("aicfl_op_")
    with pytest.raises(Conflict, match="admin token already exists"), transaction(factory) as s:
        bootstrap_admin(s)
    with transaction(factory) as s:
        op = authenticate_operator(s, token)
    assert op.role == "admin" and op.name == "admin"
    op.require("admin")


def test_operator_tokens_are_stored_hashed(
    engine: Engine, factory: sessionmaker[Session], db_path: Path
) -> None:
    with transaction(factory) as s:
        admin = bootstrap_admin(s)
        viewer = create_operator_token(s, "ci", "viewer")
        enrollment = create_enrollment_tokens(s, 3, 600, actor="admin")
    engine.dispose()  # checkpoint the WAL, then read every file SQLite wrote
    files = sorted(db_path.parent.glob(db_path.name + "*"))
    raw = b"".join(f.read_bytes() for f in files)
    assert hash_token(admin).encode() in raw  # the rows are in the bytes we read
    for token in [admin, viewer, *enrollment]:
        assert token.encode() not in raw
        assert token.split("_", 2)[2].encode() not in raw


def test_bad_or_missing_operator_token_is_unauthorized(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        token = bootstrap_admin(s)
    for bad in ["aicfl_op_wrong", token + "x", "", None]:
        with pytest.raises(Unauthorized), transaction(factory) as s:
            authenticate_operator(s, bad)


def test_viewer_lacks_admin(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        token = create_operator_token(s, "dashboard", "viewer")
    with transaction(factory) as s:
        op = authenticate_operator(s, token)
    assert op.role == "viewer"
    op.require("viewer")
    with pytest.raises(Forbidden, match="admin role"):
        op.require("admin")


def test_unknown_role_is_invalid(factory: sessionmaker[Session]) -> None:
    with pytest.raises(Invalid, match="role"), transaction(factory) as s:
        create_operator_token(s, "x", "root")


# -- enrollment --------------------------------------------------------------------


def test_enrollment_token_is_one_time(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        (token,) = create_enrollment_tokens(s, 1, 3600, actor="admin")
    with transaction(factory) as s:
        device = enroll_device(s, token, b64e(public_key_bytes(Ed25519PrivateKey.generate())), "a", "linux")
    assert device.id.startswith("dev-")
    with pytest.raises(Unauthorized, match="already used"), transaction(factory) as s:
        enroll_device(s, token, b64e(public_key_bytes(Ed25519PrivateKey.generate())), "b", "linux")
    with factory() as s:
        assert s.scalar(select(EnrollmentToken.device_id)) == device.id
        assert len(s.scalars(select(Device)).all()) == 1


def test_expired_enrollment_token_is_refused(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        (token,) = create_enrollment_tokens(s, 1, 60, actor="admin")
    with transaction(factory) as s:
        row = s.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)))
        assert row is not None
        row.expires_at = time.time() - 1
    with pytest.raises(Unauthorized, match="expired"), transaction(factory) as s:
        enroll_device(s, token, b64e(public_key_bytes(Ed25519PrivateKey.generate())), "a", "linux")


def test_unknown_enrollment_token_is_refused(factory: sessionmaker[Session]) -> None:
    with pytest.raises(Unauthorized, match="not valid"), transaction(factory) as s:
        enroll_device(s, "aicfl_enr_nope", b64e(public_key_bytes(Ed25519PrivateKey.generate())), "a", "x")


@pytest.mark.parametrize("bad_key", ["not base64!", b64e(b"\x01" * 31), ""])
def test_bad_public_key_is_refused_and_the_token_stays_unused(
    factory: sessionmaker[Session], bad_key: str
) -> None:
    with transaction(factory) as s:
        (token,) = create_enrollment_tokens(s, 1, 3600, actor="admin")
    with pytest.raises(Invalid, match="public_key"), transaction(factory) as s:
        enroll_device(s, token, bad_key, "a", "linux")
    with transaction(factory) as s:
        enroll_device(s, token, b64e(public_key_bytes(Ed25519PrivateKey.generate())), "a", "linux")


def test_same_public_key_cannot_enrol_twice(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    enroll(factory, key)
    with pytest.raises(Conflict, match="already enrolled"):
        enroll(factory, key)


@pytest.mark.parametrize(("count", "ttl"), [(0, 60), (10_001, 60), (1, 0), (1, 91 * 86400)])
def test_enrollment_token_limits(factory: sessionmaker[Session], count: int, ttl: float) -> None:
    with pytest.raises(Invalid), transaction(factory) as s:
        create_enrollment_tokens(s, count, ttl, actor="admin")


# -- device requests ---------------------------------------------------------------


def test_good_signed_request_passes(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    device = auth_device(factory, sign_request(key, device_id, "POST", PATH, BODY))
    assert device.id == device_id


def test_replayed_nonce_is_refused(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    headers = sign_request(key, device_id, "POST", PATH, BODY)
    auth_device(factory, headers)
    with pytest.raises(Unauthorized, match="replayed"):
        auth_device(factory, headers)
    # A fresh request from the same device still passes after the refused replay.
    auth_device(factory, sign_request(key, device_id, "POST", PATH, BODY))


def test_replay_within_one_transaction_is_refused(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    headers = sign_request(key, device_id, "POST", PATH, BODY)
    with transaction(factory) as s:
        authenticate_device(s, headers, "POST", PATH, BODY, window_seconds=WINDOW)
        with pytest.raises(Unauthorized, match="replayed"):
            authenticate_device(s, headers, "POST", PATH, BODY, window_seconds=WINDOW)
    with factory() as s:
        assert len(s.scalars(select(DeviceNonce)).all()) == 1


def test_stale_timestamp_is_refused(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    timestamp, nonce = f"{time.time() - 2 * WINDOW:.3f}", "00112233445566778899aabb"
    sig = key.sign(canonical_request("POST", PATH, timestamp, nonce, BODY))
    headers = {
        HEADER_DEVICE: device_id,
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: b64e(sig),
    }
    with pytest.raises(Unauthorized, match="window"):
        auth_device(factory, headers)


def test_tampered_body_is_refused(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    headers = sign_request(key, device_id, "POST", PATH, BODY)
    with pytest.raises(Unauthorized, match="does not match"):
        auth_device(factory, headers, body=b'{"agent_version": "9.9"}')


def test_another_devices_key_is_refused(factory: sessionmaker[Session]) -> None:
    key_a, key_b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    device_a = enroll(factory, key_a, "a")
    enroll(factory, key_b, "b")
    with pytest.raises(Unauthorized, match="does not match"):
        auth_device(factory, sign_request(key_b, device_a, "POST", PATH, BODY))


def test_unknown_device_is_refused(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(Unauthorized, match="unknown device"):
        auth_device(factory, sign_request(key, "dev-000000000000", "POST", PATH, BODY))


def test_revoked_device_is_refused(factory: sessionmaker[Session]) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    with transaction(factory) as s:
        revoke_device(s, device_id, actor="admin")
    with pytest.raises(Unauthorized, match="revoked"):
        auth_device(factory, sign_request(key, device_id, "POST", PATH, BODY))


def test_revoking_an_unknown_device_is_not_found(factory: sessionmaker[Session]) -> None:
    with pytest.raises(NotFound), transaction(factory) as s:
        revoke_device(s, "dev-nope", actor="admin")


@pytest.mark.parametrize("header", [HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE])
def test_missing_header_is_refused(factory: sessionmaker[Session], header: str) -> None:
    key = Ed25519PrivateKey.generate()
    device_id = enroll(factory, key)
    headers = sign_request(key, device_id, "POST", PATH, BODY)
    del headers[header]
    with pytest.raises(Unauthorized, match=f"missing {header}"):
        auth_device(factory, headers)


# -- registry ----------------------------------------------------------------------


def make_job(factory: sessionmaker[Session]) -> int:
    with transaction(factory) as s:
        job = Job(name="churn", spec={"name": "churn"})
        s.add(job)
        s.flush()
        return job.id


def register(
    factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    key: Ed25519PrivateKey,
    job_id: int,
    vector: np.ndarray,
    version: int = 0,
) -> ModelVersion:
    with transaction(factory) as s:
        return register_version(
            s,
            blobs,
            key,
            job_id=job_id,
            version=version,
            vector=vector,
            arch={"zoo": "mlp", "hidden": [8]},
            preprocess=None,
            parent=None,
            round_number=None,
        )


def test_registered_version_is_hashed_and_signed(factory: sessionmaker[Session], tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    key = Ed25519PrivateKey.generate()
    job_id = make_job(factory)
    vector = np.linspace(-1, 1, 257, dtype=np.float32)
    row = register(factory, blobs, key, job_id, vector)
    blob = blobs.get(row.sha256)
    assert sha256_hex(blob) == row.sha256
    assert row.size == len(blob) and row.num_parameters == 257
    verify_model(key.public_key(), job_id, 0, blob, row.sha256, row.signature)
    with factory() as s:
        stored = get_version(s, job_id)
    assert stored.sha256 == row.sha256 and stored.signature == row.signature
    header, got = load_vector(blobs, stored)
    assert np.array_equal(got, vector)
    assert header["arch"] == {"zoo": "mlp", "hidden": [8]} and header["version"] == 0


def test_tampered_blob_file_is_reported_corrupt(factory: sessionmaker[Session], tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    job_id = make_job(factory)
    row = register(factory, blobs, Ed25519PrivateKey.generate(), job_id, np.ones(16, dtype=np.float32))
    path = blobs.path(row.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(NotFound, match="corrupt"):
        load_vector(blobs, row)


def test_duplicate_version_is_refused(factory: sessionmaker[Session], tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    key = Ed25519PrivateKey.generate()
    job_id = make_job(factory)
    register(factory, blobs, key, job_id, np.ones(4, np.float32))
    with pytest.raises(IntegrityError):
        register(factory, blobs, key, job_id, np.zeros(4, np.float32))
    with factory() as s:
        assert len(s.scalars(select(ModelVersion)).all()) == 1


def test_missing_version_is_not_found(factory: sessionmaker[Session]) -> None:
    job_id = make_job(factory)
    with factory() as s, pytest.raises(NotFound, match=r"job \d+ has no"):
        get_version(s, job_id)


# -- migrations --------------------------------------------------------------------


def test_migrate_is_idempotent_and_keeps_data(engine: Engine, factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        token = bootstrap_admin(s)
    migrate(engine)
    migrate(engine)
    with transaction(factory) as s:
        assert authenticate_operator(s, token).role == "admin"
