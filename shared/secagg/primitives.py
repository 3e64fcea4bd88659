"""Cryptographic primitives of SecAgg+ (Bonawitz et al., CCS 2017, section 3; Bell et al., CCS 2020).

X25519, HKDF-SHA256, AES-GCM and AES-CTR come from ``cryptography``. Shamir
secret sharing is a small prime-field version over Python integers (docs/architecture.md
allows it once a benchmark shows the library's version dominates the round:
pycryptodome's combine took 87-98% of the coordinator's unmask time, see
BENCHMARKS.md), with its coefficients from ``secrets`` and property tests in
tests/unit/test_shamir.py.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
SECRET_BYTES = 32  # Shamir secrets: a self-mask seed or an X25519 private key
# Shamir works in GF(p) for the smallest prime p above 2**256, so that every 32-byte secret is a field
# element; tests/unit/test_shamir.py checks that p is prime and that no number between 2**256 and p is.
_PRIME = 2**256 + 297
SHARE_BYTES = (_PRIME.bit_length() + 7) // 8  # 33: a share is a field element, fixed-length big-endian
_MAX_SHARES = 2**16 - 1  # share indices travel in 2 bytes (protocol.encode_share)
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


def check_agreement_key(raw: bytes) -> None:
    """Refuse an X25519 public key of small order; SecAggError if it is one, or is malformed.

    A small-order u-coordinate (0, 1, p - 1, the two of order 8, and their
    non-canonical forms at or above p, or with the ignored top bit set:
    libsodium's blocklist) gives the all-zero shared secret with every private
    key, so pairwise masks and share encryption keyed by it would be known to
    everyone. Such a key is exactly one whose agreement with a fresh key is
    all-zero, which ``cryptography`` refuses with a ValueError: that test is
    used here, so no list of encodings needs keeping.
    """
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(raw)}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise SecAggError("X25519 public key is a small-order point (every shared secret is zero)") from None


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


MASK_BLOCK = 1 << 15  # values per block in apply_masks: 256 KiB, so a block and its mask stay in cache


def apply_masks(vec: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
    """Add (sign +1) or subtract (sign -1) each key's mask to ``vec`` in place, modulo 2**64.

    Exactly ``vec += expand_mask(key, vec.size)`` (or ``-=``) for every
    ``(key, sign)``, in any order, but computed one block of :data:`MASK_BLOCK`
    values at a time for all keys, each key's AES-256-CTR keystream running on
    from block to block: no mask-sized array is ever made, and the block being
    masked stays in the CPU cache while every mask goes over it. ``vec`` must be
    a writable one-dimensional uint64 array.
    """
    if not isinstance(vec, np.ndarray) or vec.dtype != np.uint64 or vec.ndim != 1:
        raise SecAggError("masks apply to a one-dimensional uint64 array")
    if not vec.flags.writeable or not vec.flags.c_contiguous:
        raise SecAggError("masks apply in place: the array must be writable and contiguous")
    streams = []
    for key, sign in masks:
        if len(key) != KEY_BYTES:
            raise SecAggError(f"a mask key is {KEY_BYTES} bytes, got {len(key)}")
        if sign not in (1, -1):
            raise ValueError(f"a mask's sign is +1 or -1, got {sign!r}")
        streams.append((Cipher(algorithms.AES(key), modes.CTR(_ZERO_CTR_NONCE)).encryptor(), sign == 1))
    if not streams or vec.size == 0:
        return
    block = min(MASK_BLOCK, vec.size)
    zeros = memoryview(bytes(8 * block))
    mask = np.empty(block, dtype="<u8")
    mask_bytes = mask.data.cast("B")
    for start in range(0, vec.size, block):
        n = min(block, vec.size - start)
        part, keystream = vec[start : start + n], mask[:n].view(np.uint64)
        for enc, add in streams:
            enc.update_into(zeros[: 8 * n], mask_bytes[: 8 * n])  # the zero block encrypted: the keystream
            if add:
                np.add(part, keystream, out=part)
            else:
                np.subtract(part, keystream, out=part)
    for enc, _ in streams:
        enc.finalize()


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def shamir_split(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """Shamir shares (indices 1..n) of a 32-byte secret, any ``t`` of which rebuild it.

    The secret, read as a big-endian integer, is the constant term of a
    polynomial of degree at most t - 1 over GF(p), p = 2**256 + 297, whose other t - 1
    coefficients are drawn uniformly with ``secrets.randbelow``; share i is the
    polynomial at x = i, as a SHARE_BYTES big-endian integer. Any t - 1 shares
    are uniformly distributed whatever the secret. A bad secret length, t
    outside [1, n] or n above 65535 (indices travel in 2 bytes) is a ValueError.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        got = len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__
        raise ValueError(f"a Shamir secret here is {SECRET_BYTES} bytes, got {got}")
    t, n = _check_count("t", t), _check_count("n", n)
    if not 1 <= t <= n:
        raise ValueError(f"need 1 <= t <= n, got t={t}, n={n}")
    if n > _MAX_SHARES:
        raise ValueError(f"at most {_MAX_SHARES} shares, got n={n}")
    # coefficients[0] is the secret; the highest degree comes last.
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(_PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % _PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


def _lagrange_at_zero(points: list[tuple[int, int]]) -> int:
    """The value at 0 of the polynomial of degree < len(points) through ``points`` (distinct x), in GF(p)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num *= xj  # (0 - xj) / (xi - xj) = xj / (xj - xi)
                den *= xj - xi
        total += yi * num * pow(den, -1, _PRIME)
    return total % _PRIME


def shamir_combine(shares: list[tuple[int, bytes]]) -> bytes:
    """The 32-byte secret from shares produced by :func:`shamir_split`, by Lagrange interpolation at 0.

    Shamir cannot tell a right answer from a wrong one: given fewer than the
    threshold t of shares it returns garbage without complaint, so callers
    must count (the coordinator does, in ``unmask_total``). Pass at least t
    shares (exactly t is cheapest; more give the same secret), in any order.

    Each share is an index in [1, 65535] and a big-endian field element below
    p of at most SHARE_BYTES bytes (:func:`shamir_split` writes exactly
    SHARE_BYTES; the protocol's messages check that length). Duplicate
    indices, malformed shares, and a result that is not a 32-byte secret
    (which only shares of different splits, or tampered ones, can give)
    raise SecAggError.
    """
    if not shares:
        raise SecAggError("no shares to combine")
    points: list[tuple[int, int]] = []
    for share in shares:
        if not isinstance(share, tuple) or len(share) != 2:
            raise SecAggError("a share is a pair (index, bytes)")
        index, value = share
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= _MAX_SHARES:
            raise SecAggError(f"a share index is an integer in [1, {_MAX_SHARES}], got {index!r}")
        if not isinstance(value, bytes | bytearray) or not 1 <= len(value) <= SHARE_BYTES:
            raise SecAggError(f"a share value is 1 to {SHARE_BYTES} bytes (share index {index})")
        y = int.from_bytes(value, "big")
        if y >= _PRIME:
            raise SecAggError(f"share index {index}: the value is not below the field prime")
        points.append((index, y))
    if len({x for x, _ in points}) != len(points):
        raise SecAggError("duplicate share indices")
    secret = _lagrange_at_zero(points)
    if secret >> (8 * SECRET_BYTES):
        raise SecAggError(f"the shares do not rebuild a {SECRET_BYTES}-byte secret (not from one split?)")
    return secret.to_bytes(SECRET_BYTES, "big")
