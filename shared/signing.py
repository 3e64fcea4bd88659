"""Ed25519 signatures for device requests and model versions.

Every device request carries its device id, a timestamp, a random nonce and a
signature over the method, the path, those two values and the SHA-256 of the
body. The coordinator refuses stale timestamps and replayed nonces, so a
captured request cannot be sent again. Model versions are signed by the
coordinator over the job, the version and the blob's SHA-256.
"""

from __future__ import annotations

import base64
import functools
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


# Ed25519 (RFC 8032, section 5.1): the field prime, the curve constant d, and the order L of the
# base point's group. The whole curve has 8 * L points; the other factor, 8, is the torsion.
_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_L = 2**252 + 27742317777372353535851937790883648493
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1, 1, 0)

_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, xy = T/Z


def _decode_point(raw: bytes) -> _Point:
    """The point a 32-byte encoding names (RFC 8032, 5.1.3); SignatureError if none, or not canonically."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        raise SignatureError("Ed25519 public key is not canonically encoded (y is not below the field prime)")
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P != 0:
        x = x * _SQRT_M1 % _P
        if (v * x * x - u) % _P != 0:
            raise SignatureError("Ed25519 public key is not a point on the curve")
    if x == 0 and sign:
        raise SignatureError("Ed25519 public key is not canonically encoded (x = 0 with its sign bit set)")
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _add(a: _Point, b: _Point) -> _Point:
    """Point addition on -x^2 + y^2 = 1 + d x^2 y^2 (Hisil et al. 2008; complete, so it also doubles)."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = 2 * _D * t1 * t2 % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(n: int, point: _Point) -> _Point:
    result = _IDENTITY
    for bit in bin(n)[2:]:
        result = _add(result, result)
        if bit == "1":
            result = _add(result, point)
    return result


def _is_identity(point: _Point) -> bool:
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


@functools.lru_cache(maxsize=4096)
def _key_problem(raw: bytes) -> str | None:
    # Cached: a device's key is checked on each of its requests, and the arithmetic takes a few ms.
    try:
        point = _decode_point(raw)
    except SignatureError as err:
        return str(err)
    if _is_identity(_multiply(8, point)):
        return (
            "Ed25519 public key is a small-order point (one of the curve's 8 torsion points):"
            " signatures under it can be forged without any private key"
        )
    if not _is_identity(_multiply(_L, point)):
        return "Ed25519 public key is not in the prime-order subgroup (it has a small-order component)"
    return None


def check_public_key(raw: bytes) -> None:
    """Refuse an Ed25519 public key that no honest key generation gives: SignatureError naming the fault.

    A wrong length, a non-canonical encoding (y at or above the field prime, or
    x = 0 with its sign bit set), a point not on the curve, a small-order point
    (libsodium refuses the same ones in ``crypto_sign_verify_detached``), or a
    point with a small-order component. A small-order key is the danger: the
    all-zero key (order 4) lets anyone forge a signature that verifies one time
    in four, with no private key.
    """
    if len(raw) != 32:
        raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    problem = _key_problem(bytes(raw))
    if problem is not None:
        raise SignatureError(problem)


def load_public_key(raw_b64: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its base64 encoding, checked by :func:`check_public_key`."""
    raw = b64d(raw_b64, "public key")
    check_public_key(raw)
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
