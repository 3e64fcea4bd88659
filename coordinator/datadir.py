"""The coordinator's data folder, readable by its owner only.

It holds what no other local user may read: the SQLite database (operator and enrolment token
hashes, the devices' unmasking shares), the blob store (models, updates, masked vectors) and the
model-signing key. The folder is 0700 and each file in it 0600, whatever the process's umask; a
folder or file made by someone else's process is left as it is (``chmod`` would fail).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: str | Path) -> Path:
    """``path`` (and any missing parent) made as a folder only its owner can read or enter."""
    p = Path(path)
    p.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    restrict(p, PRIVATE_DIR)
    return p


def restrict(path: str | Path, mode: int = PRIVATE_FILE) -> None:
    """Set ``path``'s mode to ``mode`` if it exists and is ours; anything else is left alone."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        st = os.stat(path)
        if st.st_uid == os.geteuid() and (st.st_mode & 0o777) != mode:
            os.chmod(path, mode)


def prepare_data_dir(path: str | Path) -> Path:
    """The coordinator's data folder, made private (0700); what is already in it is made private too: the
    SQLite database with its WAL and shared-memory files, the signing key, the blob store."""
    root = private_dir(path)
    for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "coordinator_key.pem"):
        restrict(root / name)
    blobs = root / "blobs"
    if blobs.is_dir():
        restrict(blobs, PRIVATE_DIR)
    return root
