"""Cryptographic primitives of SecAgg+ (Bonawitz et al., CCS 2017, section 3; Bell et al., CCS 2020).

Everything comes from well-kept libraries: X25519, HKDF-SHA256, AES-GCM and
AES-CTR from ``cryptography``; Shamir secret sharing from pycryptodome.
"""

from __future__ import annotations

import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
SECRET_BYTES = 32  # Shamir secrets: a self-mask seed or an X25519 private key
SHARE_BYTES = 32
_ZERO_CTR_NONCE = bytes(16)


class SecAggError(Exception):
    """A secure-aggregation message or state that does not check out; the message says which device."""


def frame(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part prefixed by its 4-byte big-endian length."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def x25519_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key and the raw 32-byte public key."""
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an X25519 private key."""
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 private key (what is Shamir-shared as s_sk)."""
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from its raw 32 bytes; SecAggError if malformed."""
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """X25519 with the peer's raw public key, then HKDF-SHA256 to 32 bytes.

    ``info`` binds the round context and the purpose (share encryption or
    masking), so one agreed secret never serves two uses. A malformed or
    low-order peer key (all-zero shared secret) raises SecAggError.
    """
    if len(peer_public) != KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"X25519 agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM under ``key`` with a random 12-byte nonce, returned as nonce | ciphertext | tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`; a wrong key or aad, or any tampering, raises SecAggError."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise SecAggError("ciphertext too short to hold a nonce and a tag")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("ciphertext does not authenticate (wrong key, wrong context or tampered)") from None


def expand_mask(key: bytes, length: int) -> np.ndarray:
    """``length`` uint64 mask values: the AES-256-CTR keystream under the whole 32-byte ``key``.

    The counter block starts at zero: that is safe because every key masks
    exactly one vector (a self-mask seed is fresh per round, a pairwise key is
    bound by HKDF to one round and one pair), so no keystream is ever reused.
    The keystream is read as little-endian words, the same on every platform.
    """
    if len(key) != KEY_BYTES:
        raise SecAggError(f"a mask key is {KEY_BYTES} bytes, got {len(key)}")
    if length < 0:
        raise ValueError("mask length must be non-negative")
    out = np.zeros(length, dtype="<u8")
    enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_CTR_NONCE)).encryptor()
    # Encrypting the zero buffer in place yields the keystream itself.
    view = out.data.cast("B")
    enc.update_into(view, view)
    enc.finalize()
    return out.view(np.uint64)


def shamir_split(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """Shamir shares (indices 1..n) of a 32-byte secret, any ``t`` of which rebuild it.

    pycryptodome shares 16-byte blocks over GF(2**128): each half is shared
    with the same indices and the two 16-byte shares of an index are
    concatenated into one 32-byte share.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a Shamir secret here is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= t <= n:
        raise ValueError(f"need 1 <= t <= n, got t={t}, n={n}")
    low = Shamir.split(t, n, secret[:16], ssss=False)
    high = Shamir.split(t, n, secret[16:], ssss=False)
    return [(i, a + b) for (i, a), (j, b) in zip(low, high, strict=True) if i == j]


def shamir_combine(shares: list[tuple[int, bytes]]) -> bytes:
    """The 32-byte secret from shares produced by :func:`shamir_split`.

    Shamir cannot tell a right answer from a wrong one: given fewer than the
    threshold t of shares it returns garbage without complaint, so callers
    must count (the coordinator does, in ``unmask_total``). Pass exactly t
    shares. Duplicate indices or malformed shares raise SecAggError.
    """
    if not shares:
        raise SecAggError("no shares to combine")
    indices = [i for i, _ in shares]
    if len(set(indices)) != len(indices):
        raise SecAggError("duplicate share indices")
    if any(len(s) != SHARE_BYTES or not 1 <= i < 2**16 for i, s in shares):
        raise SecAggError(f"a share is an index in [1, 65535] and {SHARE_BYTES} bytes")
    low = Shamir.combine([(i, s[:16]) for i, s in shares], ssss=False)
    high = Shamir.combine([(i, s[16:]) for i, s in shares], ssss=False)
    return low + high
