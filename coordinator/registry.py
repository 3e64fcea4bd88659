"""The model registry: every version content-hashed, signed by the coordinator, with its lineage."""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.errors import NotFound
from coordinator.models import ModelVersion
from shared import codec
from shared.signing import b64e, model_message


def register_version(
    session: Session,
    blobs: BlobStore,
    key: Ed25519PrivateKey,
    *,
    job_id: int,
    version: int,
    vector: np.ndarray,
    arch: dict[str, Any],
    preprocess: dict[str, Any] | None,
    parent: int | None,
    round_number: int | None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> ModelVersion:
    """Store a model blob, sign its SHA-256 and record the version."""
    header = {
        "kind": "model",
        "job_id": job_id,
        "version": version,
        "arch": arch,
        "preprocess": preprocess,
    }
    blob = codec.encode(header, vector)
    sha = blobs.put(blob)
    row = ModelVersion(
        job_id=job_id,
        version=version,
        parent=parent,
        round_number=round_number,
        sha256=sha,
        signature=b64e(key.sign(model_message(job_id, version, sha))),
        size=len(blob),
        num_parameters=int(vector.size),
        metrics=metrics or {},
        provenance=provenance or {},
    )
    session.add(row)
    session.flush()
    return row


def get_version(session: Session, job_id: int, version: int | None = None) -> ModelVersion:
    """A version of a job's model; the newest when ``version`` is None."""
    q = select(ModelVersion).where(ModelVersion.job_id == job_id)
    if version is None:
        row = session.scalar(q.order_by(ModelVersion.version.desc()).limit(1))
    else:
        row = session.scalar(q.where(ModelVersion.version == version))
    if row is None:
        which = "model version yet" if version is None else f"model version {version}"
        raise NotFound(f"job {job_id} has no {which}")
    return row


def list_versions(session: Session, job_id: int) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.job_id == job_id).order_by(ModelVersion.version)
        )
    )


def load_vector(blobs: BlobStore, row: ModelVersion) -> tuple[dict[str, Any], np.ndarray]:
    """The header and parameters of a stored version (hash checked)."""
    from shared.signing import sha256_hex

    data = blobs.get(row.sha256)
    if sha256_hex(data) != row.sha256:
        raise NotFound(f"model version {row.version} of job {row.job_id} is corrupt in the blob store")
    return codec.decode(data, dtype=codec.model_dtype(data))
