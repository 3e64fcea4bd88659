"""The coordinator's Ed25519 signing key, made once and kept beside the data (mode 0600), and published
in the blob store so that every replica on that store signs with the same one.

Agents pin the coordinator's public key when they enroll. Replicas with keys of their own would sign
versions that the agents enrolled through another replica refuse, so a coordinator whose key differs
from the one its blob store holds refuses to start (``publish_public_key``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.blobs import BlobStore, LocalBlobStore
from coordinator.datadir import PRIVATE_DIR, restrict
from coordinator.errors import NotFound, SigningKeyMismatch
from shared.signing import b64d, b64e, load_private_key, public_key_bytes, save_private_key, sha256_hex

# The blob that holds the public key the store's coordinators sign with: a fixed name, 64 hex digits as
# every name is, that neither a SHA-256 of content nor a round's prefix can take.
PUBLISHED_KEY = sha256_hex(b"aicfl coordinator public key")


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


def fingerprint(public_key: bytes) -> str:
    """How a person compares two public keys: ``SHA256:`` and the first 16 hex digits of the raw key's hash."""
    return "SHA256:" + hashlib.sha256(public_key).hexdigest()[:16]


def publish_public_key(store: BlobStore, key: Ed25519PrivateKey, key_file: str | Path) -> None:
    """Record ``key``'s public half in ``store`` if no coordinator has yet; refuse one that differs.

    The first coordinator to start on a store writes ``PUBLISHED_KEY`` with ``put_new``, which never
    overwrites: of replicas starting together with different keys exactly one wins. Every later start
    reads it back; ``SigningKeyMismatch`` (one line: both fingerprints and the fix) when it holds another
    key. Rotating the key on purpose means deleting that blob first (docs/replicas.md).
    ``key_file``: where ``key`` was read from, to name in the message.
    """
    mine = public_key_bytes(key)
    record = json.dumps({"algorithm": "Ed25519", "public_key": b64e(mine)}, sort_keys=True).encode()
    try:
        store.put_new(PUBLISHED_KEY, record)
        return
    except FileExistsError:
        pass
    try:
        published = store.get(PUBLISHED_KEY)
    except NotFound:  # deleted between the two calls: an operator rotating the key; try once more
        store.put_new(PUBLISHED_KEY, record)
        return
    try:
        theirs = b64d(json.loads(published)["public_key"], "published public key")
    except (ValueError, KeyError, TypeError):
        theirs = b""
    if theirs == mine:
        return
    shown = fingerprint(theirs) if theirs else "an unreadable record"
    raise SigningKeyMismatch(
        f"the signing key {key_file} ({fingerprint(mine)}) is not the one the other coordinators on this"
        f" blob store sign with ({shown}): give every replica the same key file (AICFL_SIGNING_KEY_FILE,"
        f" one Secret mounted in each); to rotate the key on purpose, delete the published key"
        f" {_where(store)} first"
    )


def _where(store: BlobStore) -> str:
    """Where the published key is, as an operator would delete it."""
    if isinstance(store, LocalBlobStore):
        return str(store.path(PUBLISHED_KEY))
    return f"blob {PUBLISHED_KEY} in {store!r}"
