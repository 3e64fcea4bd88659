"""Ed25519 signatures for device requests and model versions.

Every device request carries its device id, a timestamp, a random nonce and a
signature over the method, the path, those two values and the SHA-256 of the
body. The coordinator refuses stale timestamps and replayed nonces, so a
captured request cannot be sent again. Model versions are signed by the
coordinator over the job, the version and the blob's SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HEADER_DEVICE = "X-AICFL-Device"
HEADER_TIMESTAMP = "X-AICFL-Timestamp"
HEADER_NONCE = "X-AICFL-Nonce"
HEADER_SIGNATURE = "X-AICFL-Signature"
DEVICE_HEADERS = (HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)


class SignatureError(ValueError):
    """A signature, key or signed message that does not check out."""


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def b64d(text: str, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SignatureError(f"{what} is not valid base64") from None


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (provenance of central data files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw_b64: str) -> Ed25519PublicKey:
    raw = b64d(raw_b64, "public key")
    if len(raw) != 32:
        raise SignatureError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def canonical_request(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes a device signs for one request."""
    return "\n".join(["AICFL-DEVICE-v1", method.upper(), path, timestamp, nonce, sha256_hex(body)]).encode()


def sign_request(
    key: Ed25519PrivateKey, device_id: str, method: str, path: str, body: bytes
) -> dict[str, str]:
    """Headers that authenticate one request as ``device_id``."""
    timestamp = f"{time.time():.3f}"
    nonce = secrets.token_hex(16)
    sig = key.sign(canonical_request(method, path, timestamp, nonce, body))
    return {
        HEADER_DEVICE: device_id,
        HEADER_TIMESTAMP: timestamp,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: b64e(sig),
    }


def verify_request(
    public_key: Ed25519PublicKey,
    method: str,
    path: str,
    timestamp: str,
    nonce: str,
    signature_b64: str,
    body: bytes,
    *,
    now: float,
    window_seconds: float,
) -> None:
    """Check one device request's signature and freshness (the nonce is checked by the caller)."""
    try:
        ts = float(timestamp)
    except ValueError:
        raise SignatureError("timestamp is not a number") from None
    if not abs(now - ts) <= window_seconds:  # also refuses nan and inf
        raise SignatureError(f"timestamp is outside the {window_seconds:.0f} s window")
    if not (8 <= len(nonce) <= 128) or not nonce.isalnum():
        raise SignatureError("nonce must be 8 to 128 letters or digits")
    try:
        public_key.verify(
            b64d(signature_b64, "signature"), canonical_request(method, path, timestamp, nonce, body)
        )
    except InvalidSignature:
        raise SignatureError("signature does not match the request") from None


def identity_verifier(keys: Mapping[str, str]) -> Callable[[str, bytes, bytes], bool]:
    """``verify(device, message, signature)`` against the devices' enrolled keys (base64).

    False for an unknown device, a malformed key or a bad signature: the form
    the SecAgg+ code takes to check advertised keys.
    """

    def verify(device: str, message: bytes, signature: bytes) -> bool:
        try:
            load_public_key(keys[device]).verify(signature, message)
        except (KeyError, SignatureError, InvalidSignature, ValueError):
            return False
        return True

    return verify


def model_message(job_id: int, version: int, sha256: str) -> bytes:
    """The bytes the coordinator signs for one model version."""
    return f"AICFL-MODEL-v1\n{job_id}\n{version}\n{sha256}".encode()


def verify_model(
    public_key: Ed25519PublicKey, job_id: int, version: int, blob: bytes, sha256: str, signature_b64: str
) -> None:
    """Refuse a model whose hash or coordinator signature does not match."""
    actual = sha256_hex(blob)
    if actual != sha256:
        raise SignatureError(f"model hash mismatch: expected {sha256[:12]}…, got {actual[:12]}…")
    try:
        public_key.verify(b64d(signature_b64, "model signature"), model_message(job_id, version, sha256))
    except InvalidSignature:
        raise SignatureError("model signature does not verify with the coordinator's key") from None


def save_private_key(key: Ed25519PrivateKey, path: str) -> None:
    """Write a PEM private key readable by its owner only (mode 0600)."""
    import os

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def load_private_key(path: str) -> Ed25519PrivateKey:
    with open(path, "rb") as fh:
        key = serialization.load_pem_private_key(fh.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} does not hold an Ed25519 private key")
    return key
