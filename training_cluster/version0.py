"""The steps every path of ``aicfl cluster pretrain`` shares once its data is checked: wait for the
job's statistics round, train on the Horovod ranks in a work folder, measure the result on the job's
reference data, and register it through the coordinator API as version 0 with its provenance.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from training_cluster.api import ClusterApi

Trained = tuple[numpy.ndarray, dict[str, Any]]


def wait_for_statistics(
    api: ClusterApi, job: dict[str, Any], wait: float, log: Callable[[str], None], *, fixes: str
) -> dict[str, Any]:
    """Job ``job`` once its statistics round has fixed its preprocessing (``fixes`` says what that
    decides, for the log line); waits up to ``wait`` seconds."""
    job_id = int(job["id"])
    if job.get("preprocess") is None:
        log(f"waiting up to {wait:.0f} s for job {job_id}'s statistics round (it fixes {fixes})")
    return api.wait_for_preprocess(job_id, wait)


@dataclass(frozen=True)
class Pretraining:
    """One pre-training run as a path of ``aicfl cluster pretrain`` sets it up.

    ``subject`` names what is trained on how much data (``"mlp (12 inputs) on 500 rows"``);
    ``schedule`` follows the learning rate in the log line; ``train`` runs the ranks in a work
    folder; ``reference`` measures their parameters on the job's reference data; ``provenance``
    adds the path's own fields from rank 0's result; ``summary`` adds its own fields to the return.
    """

    job_id: int
    arch: dict[str, Any]
    data: Path
    data_sha256: str
    rows: int
    world: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    horovod_version: str
    subject: str
    schedule: str
    train: Callable[[Path], Trained]
    reference: Callable[[numpy.ndarray], dict[str, float]]
    provenance: Callable[[dict[str, Any]], dict[str, Any]]
    summary: Mapping[str, Any] = field(default_factory=dict)


def train_and_register(
    api: ClusterApi,
    run: Pretraining,
    *,
    workdir: Path | None,
    log: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    """Train ``run`` on its ranks and upload the result as the job's version 0; return the summary
    :func:`training_cluster.pretrain.pretrain` documents."""
    job_id = run.job_id
    work = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"aicfl-pretrain-{job_id}-"))
    )
    log(
        f"pre-training job {job_id}'s {run.subject} of {run.data.name}:"
        f" {run.world} rank(s), {run.epochs} epoch(s), batch {run.batch_size}/rank,"
        f" lr {run.learning_rate:g}{run.schedule}; log: {work / 'horovodrun.log'}"
    )
    vector, result = run.train(work)
    parameters_sha256 = result["final_sha256"]
    metrics: dict[str, Any] = dict(result["metrics"])
    central = run.reference(vector)
    if central:
        metrics["central"] = central
    provenance = {
        "data_file": run.data.name,
        "data_sha256": run.data_sha256,
        "rows": run.rows,
        **run.provenance(result),
        "world_size": run.world,
        "epochs": run.epochs,
        "batch_size": run.batch_size,
        "learning_rate": result["learning_rate"],
        "optimizer": run.optimizer,
        "metrics": metrics,
        "history": result["history"],
        "horovod_version": result.get("horovod_version", run.horovod_version),
        "seconds": round(result["seconds"], 3),
        "samples_per_second": result["samples_per_second"],
        "parameters_sha256": parameters_sha256,
    }
    version = api.upload_version0(job_id, run.arch, vector, provenance)
    seconds = time.monotonic() - started
    log(
        f"job {job_id} version {version['version']} registered from pre-training:"
        f" train loss {metrics.get('train_loss', result['history'][-1]['loss']):.4f}"
        + "".join(f", reference {k} {v:.4f}" for k, v in central.items() if k != "examples")
        + f" ({result['samples_per_second']:.0f} samples/s, {seconds:.1f} s in all)"
    )
    return {
        "job_id": job_id,
        "version": int(version["version"]),
        "sha256": version["sha256"],
        **run.summary,
        "world_size": run.world,
        "epochs": run.epochs,
        "rows": run.rows,
        "batch_size": run.batch_size,
        "learning_rate": result["learning_rate"],
        "metrics": metrics,
        "data_sha256": run.data_sha256,
        "seconds": seconds,
        "training_seconds": result["seconds"],
        "samples_per_second": result["samples_per_second"],
        "horovod_version": provenance["horovod_version"],
        "parameters_sha256": parameters_sha256,
        "workdir": str(work),
    }
