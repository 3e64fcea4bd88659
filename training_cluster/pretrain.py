"""Central pre-training with Horovod: the entry point of ``aicfl cluster pretrain``.

The job's statistics round fixes the preprocessing, hence the network's input
size; :func:`pretrain` checks the request and the job, and hands it to the
job's path: the built-in tabular app's zoo network (:mod:`training_cluster.pretrain_tabular`,
gradients averaged by Horovod's DistributedOptimizer) or an app's own model
(:mod:`training_cluster.pretrain_app`, models averaged after every epoch). Both
train with ``horovodrun -np N`` (:mod:`training_cluster.ranks`; one
:mod:`training_cluster.hvd_worker` per rank), check that every rank ended with
the same parameters, and register the result through the coordinator API as the
job's version 0 with its provenance (:mod:`training_cluster.version0`). The
job's first training round starts from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.api_client import CliError
from shared.apps import BUILTIN
from shared.jobspec import JobSpec
from training_cluster.api import ClusterApi
from training_cluster.pretrain_app import _import_root, data_sha256, pretrain_app, train_app_ranks
from training_cluster.pretrain_tabular import pretrain_tabular, train_ranks
from training_cluster.ranks import CPU_CYCLE_TIME_MS, INSTALL_HINT, check_horovod, horovodrun_path, launch

# Importable from here as before the split (server/cli, bench/, tests).
__all__ = [
    "CPU_CYCLE_TIME_MS",
    "INSTALL_HINT",
    "_import_root",
    "check_horovod",
    "data_sha256",
    "horovodrun_path",
    "launch",
    "pretrain",
    "train_app_ranks",
    "train_ranks",
]


def pretrain(
    api: ClusterApi,
    job_id: int,
    data: Path,
    *,
    np: int = 2,
    epochs: int = 5,
    gpus: bool = False,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    fp16: bool = False,
    wait: float = 600.0,
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pre-train job ``job_id``'s network on central ``data`` with ``np`` Horovod ranks; upload version 0.

    ``batch_size`` is per rank (default: the job's ``training.batch_size``);
    ``learning_rate`` is the base rate (default: the job's), scaled by ``np``
    after a one-epoch warm-up. ``fp16`` compresses gradients for the allreduce.
    ``wait`` bounds the wait for the job's statistics round. Checkpoints, the
    config, the log and the final parameters stay in ``workdir`` (default: a
    new temporary folder). Returns a summary: ``version`` (0), ``world_size``,
    ``epochs``, ``metrics`` (``train_loss``... over all ranks and ``central``
    on the job's reference rows), ``data_sha256``, ``rows``, ``seconds``,
    ``samples_per_second``, ``sha256`` (the registered version's), ``workdir``.
    Every expected failure raises :class:`CliError` with one clear line.

    A job on an app (``[model] app``) is pre-trained by the app's own code:
    ``data`` is whatever its ``load_data`` reads (a file or a folder), each rank
    trains its shard with ``App.train`` and the ranks' models are averaged after
    every epoch (:func:`training_cluster.pretrain_app.train_app_ranks`); the learning rate is not scaled, and
    ``fp16`` and ``gpus`` do not apply.
    """
    started = time.monotonic()
    if np < 1:
        raise CliError(f"--np must be at least 1, got {np}")
    if epochs < 1:
        raise CliError(f"--epochs must be at least 1, got {epochs}")
    if batch_size is not None and batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {batch_size}")
    if learning_rate is not None and learning_rate <= 0:
        raise CliError(f"--learning-rate must be positive, got {learning_rate}")

    job = api.job(job_id)
    spec = JobSpec.model_validate(job["spec"])
    if spec.model.initial != "pretrained":
        raise CliError(
            f'job {job_id} starts from random weights (model.initial = "random"); submit it with'
            ' model.initial = "pretrained" for its first round to wait for pre-training'
        )
    if job.get("current_version") is not None:
        raise CliError(
            f"job {job_id} already has a model version {job['current_version']}; nothing to pre-train"
        )
    data = Path(data)
    if spec.app_ref != BUILTIN:
        if gpus or fp16:
            raise CliError(
                f"{'--gpus' if gpus else '--fp16'} applies to the built-in tabular app's gradient allreduce;"
                f" job {job_id}'s app ({spec.app_ref}) trains in its own loop on CPU ranks"
            )
        return pretrain_app(
            api,
            job,
            spec,
            data,
            np=np,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            wait=wait,
            workdir=workdir,
            log=log,
            started=started,
        )
    return pretrain_tabular(
        api,
        job,
        spec,
        data,
        np=np,
        epochs=epochs,
        gpus=gpus,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fp16=fp16,
        wait=wait,
        workdir=workdir,
        log=log,
        started=started,
    )
