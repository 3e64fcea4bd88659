"""Operators' bearer tokens, enrollment tokens, and the check of each signed device request."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import bindparam, delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator import secure
from coordinator.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from coordinator.models import Device, DeviceNonce, EnrollmentToken, Event, OperatorToken
from shared.signing import (
    DEVICE_HEADERS,
    HEADER_DEVICE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SignatureError,
    load_public_key,
    verify_request,
)

ROLES = ("admin", "viewer")
OPERATOR_PREFIX = "aicfl_op_"
ENROLL_PREFIX = "aicfl_enr_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Operator:
    name: str
    role: str

    def require(self, role: str) -> None:
        if role == "admin" and self.role != "admin":
            raise Forbidden(f"this action needs the admin role; token {self.name!r} has {self.role!r}")


def create_operator_token(session: Session, name: str, role: str) -> str:
    """Make an operator token; only its hash is stored, the token is returned once."""
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    token = OPERATOR_PREFIX + secrets.token_urlsafe(32)
    session.add(OperatorToken(name=name, role=role, token_hash=hash_token(token)))
    session.add(Event(actor=name, action="operator_token.create", target=name, detail={"role": role}))
    return token


def bootstrap_admin(session: Session, name: str = "admin") -> str:
    """The first admin token; refused once any admin token exists."""
    existing = session.scalar(
        select(func.count())
        .select_from(OperatorToken)
        .where(OperatorToken.role == "admin", OperatorToken.revoked_at.is_(None))
    )
    if existing:
        raise Conflict("an admin token already exists; create more with an admin token (POST /v1/operators)")
    return create_operator_token(session, name, "admin")


def authenticate_operator(session: Session, token: str | None) -> Operator:
    if not token:
        raise Unauthorized("missing operator token: send 'Authorization: Bearer <token>'")
    row = session.scalar(select(OperatorToken).where(OperatorToken.token_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("operator token is not valid")
    return Operator(name=row.name, role=row.role)


def create_enrollment_tokens(session: Session, count: int, ttl_seconds: float, actor: str) -> list[str]:
    if not 1 <= count <= 10_000:
        raise Invalid(f"count must be between 1 and 10000; got {count}")
    if not 1 <= ttl_seconds <= 90 * 86400:
        raise Invalid(f"ttl must be between 1 s and 90 days; got {ttl_seconds:g} s")
    expires = time.time() + ttl_seconds
    tokens = [ENROLL_PREFIX + secrets.token_urlsafe(24) for _ in range(count)]
    session.add_all(
        EnrollmentToken(token_hash=hash_token(t), expires_at=expires, created_by=actor) for t in tokens
    )
    session.add(
        Event(actor=actor, action="enrollment_tokens.create", detail={"count": count, "ttl": ttl_seconds})
    )
    return tokens


def enroll_device(session: Session, token: str, public_key_b64: str, name: str, platform: str) -> Device:
    """Spend a one-time enrollment token on a new device identity."""
    try:
        load_public_key(public_key_b64)
    except SignatureError as err:
        raise Invalid(f"public_key: {err}") from None
    row = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)).with_for_update()
    )
    if row is None:
        raise Unauthorized("enrollment token is not valid")
    if row.used_at is not None:
        raise Unauthorized("enrollment token was already used")
    if row.expires_at < time.time():
        raise Unauthorized("enrollment token has expired")
    if session.scalar(select(Device).where(Device.public_key == public_key_b64)) is not None:
        raise Conflict("a device with this public key is already enrolled")
    device = Device(id="dev-" + secrets.token_hex(6), name=name, public_key=public_key_b64, platform=platform)
    session.add(device)
    from coordinator.models import utcnow

    row.used_at = utcnow()
    row.device_id = device.id
    session.add(
        Event(actor=f"device:{device.id}", action="device.enroll", target=device.id, detail={"name": name})
    )
    return device


# Device paths run these on their own connection (``secure.Db``): a device request's check is the
# coordinator's most frequent transaction, and the ORM's unit of work cost more than the statements.
DEVICE_KEY = select(Device.public_key, Device.revoked_at).where(Device.id == bindparam("device"))
ADD_NONCE = insert(DeviceNonce).values(
    device_id=bindparam("device"), nonce=bindparam("nonce"), seen_at=bindparam("seen")
)


def check_device_headers(headers: dict[str, str], now: float, window_seconds: float) -> None:
    """The checks of a device request that need neither its body nor the database: every signing
    header present, the timestamp a number within the window. ``Unauthorized`` names what is wrong."""
    missing = [h for h in DEVICE_HEADERS if not headers.get(h)]
    if missing:
        raise Unauthorized(f"unsigned device request: missing {', '.join(missing)}")
    try:
        ts = float(headers[HEADER_TIMESTAMP])
    except ValueError:
        raise Unauthorized("device request refused: timestamp is not a number") from None
    if not abs(now - ts) <= window_seconds:
        raise Unauthorized(f"device request refused: timestamp is outside the {window_seconds:.0f} s window")


def _signed_device(s: Session | secure.Db, headers: dict[str, str], now: float, window_seconds: float) -> str:
    """The public key of the device a request claims to come from, if its headers are complete and fresh."""
    check_device_headers(headers, now, window_seconds)
    found = secure.run(s, DEVICE_KEY, device=headers[HEADER_DEVICE]).first()
    if found is None:
        raise Unauthorized("unknown device")
    public_key, revoked_at = found
    if revoked_at is not None:
        raise Unauthorized("this device has been revoked")
    return str(public_key)


def precheck_device(s: Session | secure.Db, headers: dict[str, str], *, window_seconds: float) -> None:
    """The checks that need no body, done before a large body is read."""
    _signed_device(s, headers, time.time(), window_seconds)


@lru_cache(maxsize=65_536)
def _public_key(encoded: str) -> Ed25519PublicKey:
    """A device's key, parsed once: a device's stored key never changes (enrollment makes a new device)."""
    return load_public_key(encoded)


def authenticate_device_id(
    s: Session | secure.Db,
    headers: dict[str, str],
    method: str,
    path: str,
    body: bytes,
    *,
    window_seconds: float,
) -> str:
    """Verify a signed device request: known device, fresh timestamp, good signature, unseen nonce.

    Returns the device's id. The nonce goes in with a unique constraint, so a replay racing the
    original on another replica still fails. In an ORM session the insert runs in a savepoint (the
    transaction may go on after a refused replay); on a device path's connection it does not, and a
    refusal must end the transaction, as ``server.security.device_request``'s does.
    """
    now = time.time()
    encoded = _signed_device(s, headers, now, window_seconds)
    try:
        verify_request(
            _public_key(encoded),
            method,
            path,
            headers[HEADER_TIMESTAMP],
            headers[HEADER_NONCE],
            headers[HEADER_SIGNATURE],
            body,
            now=now,
            window_seconds=window_seconds,
        )
    except SignatureError as err:
        raise Unauthorized(f"device request refused: {err}") from None
    device_id = headers[HEADER_DEVICE]
    nonce = {"device": device_id, "nonce": headers[HEADER_NONCE], "seen": now}
    try:
        if isinstance(s, secure.Db):
            secure.run(s, ADD_NONCE, **nonce)
        else:
            with s.begin_nested():
                s.connection().execute(ADD_NONCE, nonce)
    except IntegrityError:
        raise Unauthorized("device request refused: replayed nonce") from None
    return device_id


def authenticate_device(
    session: Session,
    headers: dict[str, str],
    method: str,
    path: str,
    body: bytes,
    *,
    window_seconds: float,
) -> Device:
    """``authenticate_device_id`` in an ORM session, returning the device's row."""
    device_id = authenticate_device_id(session, headers, method, path, body, window_seconds=window_seconds)
    device = session.get(Device, device_id)
    assert device is not None  # found by the check above, in this transaction
    return device


def prune_nonces(session: Session, window_seconds: float) -> int:
    """Forget nonces older than twice the window; their timestamps are refused anyway."""
    result = session.execute(
        delete(DeviceNonce).where(DeviceNonce.seen_at < time.time() - 2 * window_seconds)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def revoke_device(session: Session, device_id: str, actor: str) -> Device:
    from coordinator.models import utcnow

    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    if device.revoked_at is None:
        device.revoked_at = utcnow()
        session.add(Event(actor=actor, action="device.revoke", target=device_id))
    return device
