"""The dashboard's sign-in: an operator token pasted once, then a signed session cookie.

The cookie never holds the token. It holds the token's row id and an expiry, with an HMAC-SHA256 over
them and over the token's stored hash, keyed by a secret derived (HKDF) from the coordinator's signing
key, so every replica that shares the key accepts it and nobody without the key can forge one. Each
request checks the token row again: revoking the operator token ends its dashboard sessions at once,
and signing out deletes the cookie. The cookie is HttpOnly (no script reads it), SameSite=Strict (no
other site's page can send it: the dashboard's only forms are sign-in and sign-out) and Secure when the
coordinator serves TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.auth import Operator, hash_token
from coordinator.models import OperatorToken

COOKIE = "aicfl_session"
LIFETIME_SECONDS = 12 * 3600


class SignInError(Exception):
    """Why a token or a session was not accepted, in words for the sign-in page."""


@dataclass(frozen=True)
class SignedIn:
    """A signed-in operator, and when the session ends."""

    operator: Operator
    expires: int


def session_key(signing_key: Ed25519PrivateKey) -> bytes:
    """The cookie's HMAC key: HKDF-SHA256 of the coordinator's private signing key (RFC 5869)."""
    raw = signing_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"aicfl dashboard session v1").derive(
        raw
    )


def _mac(key: bytes, token_id: int, expires: int, token_hash: str) -> str:
    msg = f"{token_id}.{expires}.{token_hash}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode().rstrip("=")


def sign_in(s: Session, key: bytes, token: str, now: float | None = None) -> tuple[str, Operator]:
    """Check a pasted operator token; the cookie value for its session, and who it is."""
    token = token.strip()
    if not token:
        raise SignInError("Paste an operator token to sign in.")
    if len(token) > 512:
        raise SignInError("That is not an operator token (too long).")
    row = s.scalar(select(OperatorToken).where(OperatorToken.token_hash == hash_token(token)))
    if row is None:
        raise SignInError("That token was not accepted: it is not an operator token of this coordinator.")
    if row.revoked_at is not None:
        raise SignInError("That token was not accepted: it has been revoked.")
    expires = int((time.time() if now is None else now) + LIFETIME_SECONDS)
    return f"{row.id}.{expires}.{_mac(key, row.id, expires, row.token_hash)}", Operator(row.name, row.role)


def current(s: Session, key: bytes, cookie: str | None, now: float | None = None) -> SignedIn:
    """The operator a session cookie stands for; SignInError when there is none or it no longer holds."""
    if not cookie:
        raise SignInError("Sign in with an operator token to see the federation.")
    parts = cookie.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or len(parts[0]) > 18:
        raise SignInError("Your session is not valid; sign in again.")
    token_id, expires = int(parts[0]), int(parts[1])
    if expires < (time.time() if now is None else now):
        raise SignInError("Your session has ended; sign in again.")
    row = s.get(OperatorToken, token_id)
    if row is None or not hmac.compare_digest(parts[2], _mac(key, token_id, expires, row.token_hash)):
        raise SignInError("Your session is not valid; sign in again.")
    if row.revoked_at is not None:
        raise SignInError("The token of this session has been revoked; sign in with another.")
    return SignedIn(Operator(row.name, row.role), expires)
