"""The built-in tabular app's path of ``aicfl cluster pretrain``: read the pooled central rows,
preprocess them as the job's statistics round fixed, and train the job's zoo network on
``horovodrun -np N`` ranks whose gradients Horovod's DistributedOptimizer averages step by step
(Gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import pandas as pd

from shared.api_client import CliError
from shared.jobspec import JobSpec
from shared.signing import file_sha256
from shared.tabular import DataSchemaError, Preprocessor, load_table, validate_table
from shared.training import evaluate
from shared.zoo import architecture, build_model, load_flat_parameters
from training_cluster.api import ClusterApi
from training_cluster.hvd_worker import CONFIG_FORMAT
from training_cluster.ranks import check_horovod, horovodrun_path, run_ranks
from training_cluster.version0 import Pretraining, train_and_register, wait_for_statistics


def _load_central(data: Path, spec: JobSpec) -> pd.DataFrame:
    try:
        df = load_table(data, spec.tabular)
        validate_table(df, spec.tabular)
    except DataSchemaError as err:
        raise CliError(f"central data {data}: {err}") from None
    return df


def _reference_metrics(
    api: ClusterApi, job: dict[str, Any], spec: JobSpec, pre: Preprocessor, arch: dict[str, Any], vector: Any
) -> dict[str, float]:
    """The model's metrics on the job's reference rows, as the coordinator measures each version."""
    if not job.get("reference"):
        return {}
    raw = api.reference(int(job["id"]))
    suffix = ".parquet" if raw[:4] == b"PAR1" else ".csv"
    with tempfile.TemporaryDirectory(prefix="aicfl-reference-") as tmp:
        path = Path(tmp) / f"reference{suffix}"
        path.write_bytes(raw)
        try:
            df = load_table(path, spec.tabular)
            x, y = pre.transform(df)
        except (DataSchemaError, ValueError) as err:
            raise CliError(f"job {job['id']}'s reference data: {err}") from None
    model = build_model(arch)
    load_flat_parameters(model, vector)
    return evaluate(
        model, x, y, task=spec.tabular.task, target_mean=pre.target_mean, target_std=pre.target_std
    )


def train_ranks(
    x: numpy.ndarray,
    y: numpy.ndarray,
    arch: dict[str, Any],
    *,
    task: str,
    world: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    workdir: Path,
    optimizer: str = "adam",
    seed: int = 0,
    fp16: bool = False,
    gpus: bool = False,
    target_std: float = 1.0,
    horovodrun: Path | None = None,
    threads: int | None = None,
) -> tuple[numpy.ndarray, dict[str, Any]]:
    """Train ``arch`` on preprocessed ``(x, y)`` with ``world`` Horovod ranks; return the final
    flat parameters and rank 0's result (history, metrics, throughput, hashes).

    Raises :class:`CliError` when a rank fails (with the tail of its traceback)
    or when the ranks do not all end with bit-identical parameters.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    workdir.mkdir(parents=True, exist_ok=True)
    numpy.save(workdir / "x.npy", x)
    numpy.save(workdir / "y.npy", y)
    config = {
        "format": CONFIG_FORMAT,
        "arch": arch,
        "task": task,
        "seed": seed,
        "x_path": str(workdir / "x.npy"),
        "y_path": str(workdir / "y.npy"),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "warmup_epochs": 1,
        "fp16": fp16,
        "gpus": gpus,
        "threads": threads,
        "target_std": target_std,
        "workdir": str(workdir),
    }
    return run_ranks(config, world=world, workdir=workdir, horovodrun=horovodrun, threads=threads, gpus=gpus)


def pretrain_tabular(
    api: ClusterApi,
    job: dict[str, Any],
    spec: JobSpec,
    data: Path,
    *,
    np: int,
    epochs: int,
    gpus: bool,
    batch_size: int | None,
    learning_rate: float | None,
    fp16: bool,
    wait: float,
    workdir: Path | None,
    log: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    """:func:`training_cluster.pretrain.pretrain` of a job on the built-in tabular app."""
    job_id = int(job["id"])
    df = _load_central(data, spec)
    data_hash = file_sha256(data)
    if len(df) < np:
        raise CliError(f"central data {data} has {len(df)} rows, fewer than the {np} ranks")

    horovodrun = horovodrun_path()
    horovod_version = check_horovod(horovodrun, gpus=gpus)
    if gpus:
        import torch

        if torch.cuda.device_count() < np:
            raise CliError(
                f"--gpus with --np {np} needs {np} GPUs on this host; torch sees {torch.cuda.device_count()}"
            )

    job = wait_for_statistics(api, job, wait, log, fixes="the network's input size")
    pre = Preprocessor.from_dict(job["preprocess"])
    try:
        if spec.tabular.task != "regression":
            validate_table(df, spec.tabular, classes=pre.classes)
        x, y = pre.transform(df)
    except DataSchemaError as err:
        raise CliError(f"central data {data}: {err}") from None
    arch = architecture(spec.model, pre.input_dim, pre.output_dim)

    per_rank_batch = batch_size or spec.training.batch_size
    base_lr = learning_rate or spec.training.learning_rate

    def train(work: Path) -> tuple[numpy.ndarray, dict[str, Any]]:
        return train_ranks(
            x,
            y,
            arch,
            task=spec.tabular.task,
            world=np,
            epochs=epochs,
            batch_size=per_rank_batch,
            learning_rate=base_lr,
            workdir=work,
            optimizer=spec.training.optimizer,
            seed=spec.seed,
            fp16=fp16,
            gpus=gpus,
            target_std=pre.target_std,
            horovodrun=horovodrun,
        )

    run = Pretraining(
        job_id=job_id,
        arch=arch,
        data=data,
        data_sha256=data_hash,
        rows=len(df),
        world=np,
        epochs=epochs,
        batch_size=per_rank_batch,
        learning_rate=base_lr,
        optimizer=spec.training.optimizer,
        horovod_version=horovod_version,
        subject=f"{arch['zoo']} ({arch['input_dim']} inputs) on {len(df)} rows",
        schedule=f" x {np}",
        train=train,
        reference=lambda vector: _reference_metrics(api, job, spec, pre, arch, vector),
        provenance=lambda result: {
            "global_batch_size": per_rank_batch * np,
            "warmup_steps": result["warmup_steps"],
            "fp16": fp16,
            "gpus": gpus,
        },
    )
    return train_and_register(api, run, workdir=workdir, log=log, started=started)
