"""The blob store: large binary objects (models, update vectors, audit plots) addressed by SHA-256.

``BlobStore`` is what the engine needs of one; ``LocalBlobStore`` keeps blobs in a folder (the
embedded default, one coordinator) and ``coordinator.s3blobs.S3BlobStore`` in an S3-compatible bucket
that several coordinator replicas share. ``open_blob_store`` picks one from the ``blob_store`` setting.

The local store's folders are 0700 and its files 0600 whatever the umask: a blob may be a masked
vector or a model an operator has not released.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from coordinator.datadir import PRIVATE_DIR, private_dir
from coordinator.errors import NotFound

_HEX = frozenset("0123456789abcdef")
log = logging.getLogger("aicfl.coordinator")


class BlobStore(Protocol):
    """Blobs under 64-hex-digit names: their SHA-256 (``put``), or a name the caller chose (``put_new``).

    Names chosen with ``put_new`` may share a leading prefix, so that ``delete_prefix`` removes them
    together: a round's masked vectors (``aggregation.round_prefix``) go in one call when it ends.

    The database is the source of truth: a row names a blob only once the blob is written, and a blob
    is deleted only after the row that dropped it is committed, so a store never needs a transaction.
    Every method may be called from many threads at once.
    """

    def put(self, data: bytes | memoryview) -> str:
        """Store ``data`` under its SHA-256 (lowercase hex), which is returned; storing it again is a no-op."""
        ...

    def put_new(self, name: str, data: bytes | memoryview) -> None:
        """Store ``data`` under ``name``, which must not exist yet (``FileExistsError`` if it does)."""
        ...

    def get(self, sha256: str) -> bytes:
        """The blob's bytes; ``NotFound`` if it is not in the store."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether the blob is in the store."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove the blob; a blob already gone is fine (rounds clean up after restarts too)."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob whose name starts with ``prefix`` (2 to 64 lowercase hex digits), and any
        write of such a blob that a killed process left unfinished; returns how many blobs went."""
        ...


def check_name(name: str) -> str:
    """``name`` if it is 64 lowercase hex digits; ``NotFound`` otherwise, before any path or key is made."""
    if len(name) != 64 or not _HEX.issuperset(name):
        raise NotFound(f"no blob {name!r}")
    return name


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is 2 to 64 lowercase hex digits; ``ValueError`` otherwise: a shorter one would
    reach across the fan-out folders, and none may be empty (it would name every blob)."""
    if not 2 <= len(prefix) <= 64 or not _HEX.issuperset(prefix):
        raise ValueError(f"a blob name prefix is 2 to 64 lowercase hex digits, not {prefix!r}")
    return prefix


def missing(name: str) -> NotFound:
    """The error of a blob that a row names but the store does not hold."""
    return NotFound(f"blob {name[:12]}… is missing from the store")


class LocalBlobStore:
    """Blobs as files under one folder, two-level fan-out, written atomically."""

    def __init__(self, root: str | Path):
        self.root = private_dir(root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / check_name(sha256)

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
        """Write ``data`` under ``name`` (64 hex digits), which must not exist yet (mode 0600).

        Written to a temporary file, then hard-linked into place: the link fails if the name exists,
        and a reader never sees the name half written (another replica reading the published signing
        key, ``keys.publish_public_key``). The temporary file is named after ``name``, so that
        ``delete_prefix`` also removes one that a process killed mid-write left behind.
        """
        target = self.path(name)
        self._fan_out(target)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.link(tmp, target)  # atomic and exclusive: FileExistsError if the name is taken
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _fan_out(self, target: Path) -> None:
        if not target.parent.is_dir():
            target.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise missing(sha256) from None

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        folder = self.root / check_prefix(prefix)[:2]
        deleted = 0
        for path in [*folder.glob(f"{prefix}*"), *folder.glob(f".{prefix}*")]:
            try:
                path.unlink()
            except FileNotFoundError:  # deleted meanwhile (two replicas ending one round's cleanup)
                continue
            deleted += not path.name.startswith(".")
        return deleted


def open_blob_store(url: str | None, *, local_root: Path, endpoint_url: str | None = None) -> BlobStore:
    """The store ``url`` names: ``s3://BUCKET[/PREFIX]``, or None for the folder ``local_root``.

    An S3 store is checked before it is returned (its bucket exists and the credentials reach it), so
    that a coordinator with a wrong bucket, endpoint or credentials stops at start, not at its first
    round. ``ValueError`` for a URL that is not an S3 URL; ``s3blobs.StoreUnavailable`` for a bucket
    that cannot be reached.
    """
    if url is None:
        return LocalBlobStore(local_root)
    from coordinator import s3blobs  # boto3 is imported only by coordinators that use it

    bucket, prefix = s3blobs.parse_url(url)
    store = s3blobs.S3BlobStore(bucket, prefix, endpoint_url=endpoint_url)
    store.check()
    log.info("blobs in %s at %s", store.url, store.where)
    return store
