"""The blob store: large binary objects (models, update vectors) addressed by SHA-256.

Its folders are 0700 and its files 0600 whatever the umask: a blob may be a masked vector or a
model an operator has not released.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from coordinator.datadir import PRIVATE_DIR, private_dir
from coordinator.errors import NotFound


class LocalBlobStore:
    """Blobs as files under one folder, two-level fan-out, written atomically."""

    def __init__(self, root: str | Path):
        self.root = private_dir(root)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise NotFound(f"no blob {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes | memoryview) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.exists():
            return sha
        self._fan_out(target)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def put_new(self, name: str, data: bytes | memoryview) -> None:
        """Write ``data`` under ``name`` (64 hex digits), which must not exist yet (mode 0600)."""
        target = self.path(name)
        self._fan_out(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def _fan_out(self, target: Path) -> None:
        if not target.parent.is_dir():
            target.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {sha256[:12]}… is missing from the store") from None

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
