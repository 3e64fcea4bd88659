"""The coordinator's Ed25519 signing key, made once and kept beside the data (mode 0600)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.signing import load_private_key, save_private_key


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    if p.exists():
        return load_private_key(str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    save_private_key(key, str(p))
    return key
