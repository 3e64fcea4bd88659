"""The device's Ed25519 identity key, made on the device and never sent anywhere."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.signing import b64e, load_private_key, public_key_bytes, save_private_key


def create_identity(path: Path) -> Ed25519PrivateKey:
    """A new key at ``path`` (mode 0600); refuses to overwrite an existing identity."""
    if path.exists():
        raise FileExistsError(f"{path} already holds an identity; use another --home to enroll again")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    save_private_key(key, str(path))
    return key


def load_identity(path: Path) -> Ed25519PrivateKey:
    return load_private_key(str(path))


def public_key_b64(key: Ed25519PrivateKey) -> str:
    return b64e(public_key_bytes(key))
