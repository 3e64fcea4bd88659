"""The path of ``aicfl cluster pretrain`` for a job on an app (``[model] app``): the app's own code
reads the central data and trains each rank's shard (``App.train``), and the ranks' models are
averaged after every epoch (:func:`training_cluster.hvd_worker.run_app`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy

from shared.api_client import CliError
from shared.apps import (
    App,
    AppError,
    DataError,
    DeviceContext,
    JobContext,
    LocalData,
    checked_metrics,
    load_app,
)
from shared.jobspec import JobSpec
from shared.signing import file_sha256
from training_cluster.api import ClusterApi
from training_cluster.hvd_worker import CONFIG_FORMAT, central_job
from training_cluster.ranks import check_horovod, horovodrun_path, run_ranks
from training_cluster.version0 import Pretraining, train_and_register, wait_for_statistics

T = TypeVar("T")


def _load_job_app(spec: JobSpec) -> App:
    try:
        return load_app(spec.app_ref, spec.model.app_version)
    except AppError as err:
        raise CliError(str(err)) from None


def _app_call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """The app's code, with whatever it raises as one line: its own errors are the user's to read."""
    try:
        return fn(*args)
    except CliError:
        raise
    except (DataError, ValueError, OSError) as err:
        raise CliError(f"{what}: {err}") from None
    except Exception as err:
        raise CliError(f"{what}: {type(err).__name__}: {err}") from None


def data_sha256(path: Path) -> str:
    """SHA-256 of a central data file, or of a folder: its files' relative paths and SHA-256s, sorted."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()


def _app_reference_metrics(
    api: ClusterApi, job: dict[str, Any], app: App, job_ctx: JobContext, vector: numpy.ndarray
) -> dict[str, float]:
    """The app's central metrics of the model on the job's reference data, as the coordinator
    measures each version (``App.evaluate_central``); empty without reference data."""
    if not job.get("reference"):
        return {}
    job_id = int(job["id"])
    raw = api.reference(job_id)
    what = f"job {job_id}'s reference data"
    reference = _app_call(what, app.load_reference, raw, job_ctx)
    model = _app_call(f"app {job_ctx.spec.app_ref} cannot build its model", app.build_model, job_ctx)
    _app_call(f"app {job_ctx.spec.app_ref} cannot load the parameters", app.set_parameters, model, vector)
    metrics = _app_call(what, app.evaluate_central, model, reference, job_ctx)
    if metrics is None:
        return {}
    try:
        return checked_metrics(metrics, "app evaluate_central")
    except ValueError as err:
        raise CliError(str(err)) from None


def train_app_ranks(
    spec: JobSpec,
    setup: Mapping[str, Any] | None,
    data: Path,
    *,
    world: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    workdir: Path,
    optimizer: str = "sgd",
    seed: int = 0,
    horovodrun: Path | None = None,
    threads: int | None = None,
) -> tuple[numpy.ndarray, dict[str, Any]]:
    """Train the model of job ``spec``'s app on the central ``data`` (a file or folder its ``load_data``
    reads) with ``world`` Horovod ranks, averaging the ranks' models after every epoch
    (:func:`training_cluster.hvd_worker.run_app`); return the final parameters and rank 0's result.

    The ranks import the app themselves: the folder this process imported it from is put on their
    ``PYTHONPATH``. Raises :class:`CliError` as :func:`train_ranks` does.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CONFIG_FORMAT,
        "app": {
            "ref": spec.app_ref,
            "version": spec.model.app_version,
            "spec": spec.model_dump(mode="json"),
            "setup": None if setup is None else dict(setup),
            "data_path": str(Path(data).resolve()),
        },
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "threads": threads,
        "workdir": str(workdir),
    }
    root = _import_root(spec.app_ref)
    env = {}
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return run_ranks(
        config, world=world, workdir=workdir, horovodrun=horovodrun, threads=threads, gpus=False, env=env
    )


def _import_root(app_ref: str) -> str | None:
    """The folder ``app_ref``'s top-level package was imported from in this process, unless it is
    part of this Python's installation (which every rank sees anyway)."""
    module_name = app_ref.partition(":")[0]
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    root = path.parent
    for _ in range(module_name.count(".") + (path.name == "__init__.py")):
        root = root.parent
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        if root.is_relative_to(Path(prefix).resolve()):
            return None
    return str(root)


def pretrain_app(
    api: ClusterApi,
    job: dict[str, Any],
    spec: JobSpec,
    data: Path,
    *,
    np: int,
    epochs: int,
    batch_size: int | None,
    learning_rate: float | None,
    wait: float,
    workdir: Path | None,
    log: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    """:func:`training_cluster.pretrain.pretrain` of a job whose model is an app's."""
    job_id = int(job["id"])
    app = _load_job_app(spec)
    if not data.exists():
        raise CliError(f"central data {data} does not exist")
    horovodrun = horovodrun_path()
    horovod_version = check_horovod(horovodrun)

    job = wait_for_statistics(api, job, wait, log, fixes="the app's setup")
    job_ctx = JobContext(spec, job["preprocess"])
    arch = _app_call(f"app {spec.app_ref} cannot describe its model", app.describe, job_ctx)

    # The whole central data once, through the app, before any rank starts: a file the app cannot
    # read is one line here rather than a traceback from every rank.
    what = f"central data {data}"
    local = _app_call(
        what, app.load_data, DeviceContext(central_job(job_ctx), str(data), device_id="central")
    )
    if not isinstance(local, LocalData):
        raise CliError(f"app {spec.app_ref}: load_data returned {type(local).__name__}, not a LocalData")
    _app_call(what, app.check_data, local, job_ctx)
    rows = int(local.train_examples)
    del local
    if rows < np:
        raise CliError(f"central data {data} has {rows} examples, fewer than the {np} ranks")
    data_hash = data_sha256(data)

    per_rank_batch = batch_size or spec.training.batch_size
    base_lr = learning_rate or spec.training.learning_rate

    def train(work: Path) -> tuple[numpy.ndarray, dict[str, Any]]:
        return train_app_ranks(
            spec,
            job_ctx.setup,
            data,
            world=np,
            epochs=epochs,
            batch_size=per_rank_batch,
            learning_rate=base_lr,
            workdir=work,
            optimizer=spec.training.optimizer,
            seed=spec.seed,
            horovodrun=horovodrun,
        )

    run = Pretraining(
        job_id=job_id,
        arch=arch,
        data=data,
        data_sha256=data_hash,
        rows=rows,
        world=np,
        epochs=epochs,
        batch_size=per_rank_batch,
        learning_rate=base_lr,
        optimizer=spec.training.optimizer,
        horovod_version=horovod_version,
        subject=f"app {spec.app_ref} on {rows} examples",
        schedule=", models averaged after each epoch",
        train=train,
        reference=lambda vector: _app_reference_metrics(api, job, app, job_ctx, vector),
        provenance=lambda result: {
            "app": spec.app_ref,
            "app_version": app.version,
            "scheme": result["scheme"],
            "examples_per_rank": result["examples_per_rank"],
        },
        summary={"app": spec.app_ref},
    )
    return train_and_register(api, run, workdir=workdir, log=log, started=started)
