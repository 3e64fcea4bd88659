"""The coordinator's Ed25519 signing key, made once and kept beside the data (mode 0600)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.datadir import PRIVATE_DIR, restrict
from shared.signing import load_private_key, save_private_key


def load_or_create_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The key at ``path``, made there first if missing.

    The key is written to a private temporary file and hard-linked into place,
    which fails if the file exists: replicas starting together on a shared
    folder end up with the one key that won, never one each. A key file of
    ours that others may read (made by hand, or under a wide umask) is made
    0600.
    """
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        save_private_key(key, str(tmp))
        try:
            os.link(tmp, p)  # atomic and exclusive: fails if another process got there first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    restrict(p)
    return load_private_key(str(p))
