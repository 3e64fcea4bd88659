"""Device request signatures and model signatures: what verifies, and every change that must not."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.signing import (
    HEADER_DEVICE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SignatureError,
    b64e,
    canonical_request,
    load_private_key,
    load_public_key,
    model_message,
    public_key_bytes,
    save_private_key,
    sha256_hex,
    sign_request,
    verify_model,
    verify_request,
)

WINDOW = 300.0
METHOD = "POST"
PATH = "/v1/rounds/7/input"
BODY = b'{"round": 7, "stage": "input"}'


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(key: Ed25519PrivateKey, body: bytes = BODY) -> dict[str, str]:
    return sign_request(key, "dev-abc", METHOD, PATH, body)


def verify(
    key: Ed25519PrivateKey,
    headers: dict[str, str],
    *,
    method: str = METHOD,
    path: str = PATH,
    body: bytes = BODY,
    now: float | None = None,
) -> None:
    verify_request(
        key.public_key(),
        method,
        path,
        headers[HEADER_TIMESTAMP],
        headers[HEADER_NONCE],
        headers[HEADER_SIGNATURE],
        body,
        now=time.time() if now is None else now,
        window_seconds=WINDOW,
    )


def sign_at(key: Ed25519PrivateKey, timestamp: str, nonce: str = "0123456789abcdef") -> dict[str, str]:
    """Headers with a chosen timestamp, signed correctly over it."""
    sig = key.sign(canonical_request(METHOD, PATH, timestamp, nonce, BODY))
    return {HEADER_TIMESTAMP: timestamp, HEADER_NONCE: nonce, HEADER_SIGNATURE: b64e(sig)}


def test_signed_request_verifies(key: Ed25519PrivateKey) -> None:
    headers = signed(key)
    assert headers[HEADER_DEVICE] == "dev-abc"
    verify(key, headers)


def test_method_is_case_insensitive(key: Ed25519PrivateKey) -> None:
    verify(key, signed(key), method="post")


def test_each_request_gets_a_fresh_nonce(key: Ed25519PrivateKey) -> None:
    assert signed(key)[HEADER_NONCE] != signed(key)[HEADER_NONCE]


def test_changed_body_fails(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, signed(key), body=BODY + b" ")


def test_changed_path_fails(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, signed(key), path="/v1/rounds/8/input")


def test_changed_method_fails(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, signed(key), method="PUT")


def test_changed_timestamp_fails(key: Ed25519PrivateKey) -> None:
    headers = signed(key)
    headers[HEADER_TIMESTAMP] = f"{float(headers[HEADER_TIMESTAMP]) + 1:.3f}"
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, headers)


def test_changed_nonce_fails(key: Ed25519PrivateKey) -> None:
    headers = signed(key)
    nonce = headers[HEADER_NONCE]
    headers[HEADER_NONCE] = ("0" if nonce[0] != "0" else "1") + nonce[1:]
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, headers)


@pytest.mark.parametrize("age", [WINDOW + 1, -(WINDOW + 1), 10 * 86400])
def test_timestamp_outside_the_window_fails(key: Ed25519PrivateKey, age: float) -> None:
    now = 1_700_000_000.0
    headers = sign_at(key, f"{now - age:.3f}")
    with pytest.raises(SignatureError, match="window"):
        verify(key, headers, now=now)


def test_timestamp_inside_the_window_passes(key: Ed25519PrivateKey) -> None:
    now = 1_700_000_000.0
    verify(key, sign_at(key, f"{now - WINDOW + 1:.3f}"), now=now)


def test_timestamp_that_is_not_a_number_fails(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match="not a number"):
        verify(key, sign_at(key, "yesterday"))


# BUG (shared/signing.py, verify_request): float("nan") parses, and
# abs(now - nan) > window is False, so a request signed with timestamp "nan"
# (or "-nan") is never stale; once its nonce is pruned (prune_nonces, after
# 2x the window) a captured copy can be replayed forever. Fix: refuse a
# timestamp that is not finite (math.isfinite(ts)), or write the check as
# `not abs(now - ts) <= window_seconds`.
@pytest.mark.parametrize("stamp", ["nan", "NaN", "inf"])
def test_timestamp_that_is_not_finite_fails(key: Ed25519PrivateKey, stamp: str) -> None:
    with pytest.raises(SignatureError):
        verify(key, sign_at(key, stamp))


@pytest.mark.parametrize("nonce", ["short", "x" * 129, "abc-def-ghi", "abc def ghi"])
def test_malformed_nonce_fails(key: Ed25519PrivateKey, nonce: str) -> None:
    with pytest.raises(SignatureError, match="nonce"):
        verify(key, sign_at(key, f"{time.time():.3f}", nonce=nonce))


def test_another_devices_key_fails(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    headers = signed(other)
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, headers)


@pytest.mark.parametrize("bad", ["not base64!!", "abc", "ü"])
def test_malformed_base64_signature_fails(key: Ed25519PrivateKey, bad: str) -> None:
    headers = signed(key)
    headers[HEADER_SIGNATURE] = bad
    with pytest.raises(SignatureError, match="signature is not valid base64"):
        verify(key, headers)


def test_signature_of_the_wrong_length_fails(key: Ed25519PrivateKey) -> None:
    headers = signed(key)
    headers[HEADER_SIGNATURE] = b64e(b"\x00" * 10)
    with pytest.raises(SignatureError, match="does not match"):
        verify(key, headers)


def test_public_key_round_trips_through_base64(key: Ed25519PrivateKey) -> None:
    raw = public_key_bytes(key)
    assert raw == public_key_bytes(key.public_key())
    assert len(raw) == 32
    assert public_key_bytes(load_public_key(b64e(raw))) == raw


@pytest.mark.parametrize("bad", [b64e(b"\x01" * 31), b64e(b"\x01" * 33), "%%%"])
def test_malformed_public_key_is_refused(bad: str) -> None:
    with pytest.raises(SignatureError):
        load_public_key(bad)


def model_signature(key: Ed25519PrivateKey, job_id: int, version: int, blob: bytes) -> tuple[str, str]:
    sha = sha256_hex(blob)
    return sha, b64e(key.sign(model_message(job_id, version, sha)))


def test_good_model_verifies(key: Ed25519PrivateKey) -> None:
    blob = os.urandom(4096)
    sha, sig = model_signature(key, 3, 5, blob)
    verify_model(key.public_key(), 3, 5, blob, sha, sig)


def test_model_with_a_flipped_byte_fails_with_hash_mismatch(key: Ed25519PrivateKey) -> None:
    blob = bytearray(os.urandom(4096))
    sha, sig = model_signature(key, 3, 5, bytes(blob))
    blob[1000] ^= 0x01
    with pytest.raises(SignatureError, match="hash mismatch"):
        verify_model(key.public_key(), 3, 5, bytes(blob), sha, sig)


def test_model_signature_over_another_version_fails(key: Ed25519PrivateKey) -> None:
    blob = os.urandom(256)
    sha, sig_v4 = model_signature(key, 3, 4, blob)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model(key.public_key(), 3, 5, blob, sha, sig_v4)


def test_model_signature_over_another_job_fails(key: Ed25519PrivateKey) -> None:
    blob = os.urandom(256)
    sha, sig = model_signature(key, 2, 5, blob)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model(key.public_key(), 3, 5, blob, sha, sig)


def test_model_signed_by_another_key_fails(key: Ed25519PrivateKey) -> None:
    blob = os.urandom(256)
    sha, sig = model_signature(Ed25519PrivateKey.generate(), 3, 5, blob)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model(key.public_key(), 3, 5, blob, sha, sig)


def test_model_with_malformed_signature_fails(key: Ed25519PrivateKey) -> None:
    blob = os.urandom(256)
    with pytest.raises(SignatureError, match="model signature is not valid base64"):
        verify_model(key.public_key(), 3, 5, blob, sha256_hex(blob), "??")


def test_private_key_file_is_owner_only_and_loads_back(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    save_private_key(key, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(str(path))) == public_key_bytes(key)


def test_saving_over_a_world_readable_file_makes_it_owner_only(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "identity.pem"
    path.write_text("old")
    path.chmod(0o644)
    save_private_key(key, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(str(path))) == public_key_bytes(key)


def test_loading_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    with pytest.raises(SignatureError, match="Ed25519"):
        load_private_key(str(path))
