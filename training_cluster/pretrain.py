"""Central pre-training with Horovod: the launcher behind ``aicfl cluster pretrain``.

The job's statistics round fixes the preprocessing, hence the network's input
size; this module waits for it, trains the job's own zoo network on central
(public or proxy) data with ``horovodrun -np N`` (one
:mod:`training_cluster.hvd_worker` per rank; Gloo on CPU, NCCL on GPUs), checks
that every rank ended with the same parameters, and registers the result
through the coordinator API as the job's version 0 with its provenance. The
job's first training round starts from it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy
import pandas as pd

from shared.api_client import CliError
from shared.apps import (
    BUILTIN,
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
from shared.tabular import DataSchemaError, Preprocessor, load_table, validate_table
from shared.training import evaluate
from shared.zoo import architecture, build_model, load_flat_parameters
from training_cluster.api import ClusterApi
from training_cluster.hvd_worker import CONFIG_FORMAT, central_job, parameter_sha256

T = TypeVar("T")

# Milliseconds between Horovod's coordination cycles for CPU ranks (bench/pretrain.py).
CPU_CYCLE_TIME_MS = "3"
INSTALL_HINT = "install it with `bash scripts/install_horovod.sh {python}` (see docs/cluster.md)"
_ERROR_TAIL_LINES = 6


def horovodrun_path() -> Path:
    """``$AICFL_HOROVODRUN``, else the ``horovodrun`` beside this interpreter."""
    override = os.environ.get("AICFL_HOROVODRUN")
    if override:
        return Path(override)
    return Path(sys.executable).parent / "horovodrun"


def check_horovod(horovodrun: Path, *, gpus: bool = False) -> str:
    """Raise :class:`CliError` unless Horovod can run PyTorch over Gloo (and NCCL with ``gpus``).

    Returns the installed Horovod version.
    """
    hint = INSTALL_HINT.format(python=sys.executable)
    if not horovodrun.is_file() or not os.access(horovodrun, os.X_OK):
        raise CliError(f"horovodrun not found at {horovodrun} (set AICFL_HOROVODRUN or {hint})")
    try:
        horovod = importlib.import_module("horovod")
        importlib.import_module("horovod.torch")
    except ImportError as err:
        raise CliError(
            f"Horovod is not installed with PyTorch support for {sys.executable} ({err}); {hint}"
        ) from None
    try:
        report = subprocess.run(
            [str(horovodrun), "--check-build"], capture_output=True, text=True, timeout=120
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CliError(f"{horovodrun} --check-build failed: {err}; {hint}") from None
    needed = ["PyTorch", "Gloo"] + (["NCCL"] if gpus else [])
    missing = [name for name in needed if f"[X] {name}" not in report]
    if missing:
        how = (
            f"rebuild it on a CUDA host with `AICFL_HOROVOD_GPU=1 bash scripts/install_horovod.sh {sys.executable}`"
            if missing == ["NCCL"]
            else hint
        )
        raise CliError(
            f"{horovodrun} was built without {', '.join(missing)} (horovodrun --check-build); {how}"
        )
    return str(horovod.__version__)


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


def _tail(text: str, lines: int = _ERROR_TAIL_LINES) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _rank_failure(workdir: Path, world: int, rc: int, log_path: Path) -> CliError:
    for rank in range(world):
        err = workdir / f"rank-{rank}.err"
        if err.exists():
            return CliError(
                f"pre-training failed on rank {rank} (horovodrun exit {rc}): {_tail(err.read_text())}"
                f" (full log: {log_path})"
            )
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    return CliError(
        f"pre-training failed (horovodrun exit {rc}): {_tail(log) or 'no output'} (full log: {log_path})"
    )


def launch(
    horovodrun: Path,
    world: int,
    config_path: Path,
    log_path: Path,
    *,
    threads: int,
    extra_env: dict[str, str] | None = None,
) -> int:
    """Run ``horovodrun -np N -H localhost:N --gloo python -m training_cluster.hvd_worker CONFIG``.

    Gloo is the controller in both cases: with ``gpus`` in the config the
    ranks reduce over NCCL on their GPUs, without over Gloo on the CPU. With
    ``$AICFL_HOROVOD_HOSTFILE`` (``host slots=N`` lines, as the MPI Operator
    writes /etc/mpi/hostfile) the ranks start on those hosts over ssh instead
    of this one; the work folder must then be shared by all of them.
    """
    hostfile = os.environ.get("AICFL_HOROVOD_HOSTFILE")
    hosts = ["--hostfile", hostfile] if hostfile else ["-H", f"localhost:{world}"]
    cmd = [
        str(horovodrun),
        "-np",
        str(world),
        *hosts,
        "--gloo",
        "--start-timeout",
        "120",
        sys.executable,
        "-m",
        "training_cluster.hvd_worker",
        str(config_path),
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        **(extra_env or {}),
    }
    with open(log_path, "wb") as log:
        log.write((" ".join(cmd) + "\n").encode())
        log.flush()
        return subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
        ).returncode


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
    return _run_ranks(config, world=world, workdir=workdir, horovodrun=horovodrun, threads=threads, gpus=gpus)


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
    return _run_ranks(
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


def _run_ranks(
    config: dict[str, Any],
    *,
    world: int,
    workdir: Path,
    horovodrun: Path | None,
    threads: int,
    gpus: bool,
    env: dict[str, str] | None = None,
) -> tuple[numpy.ndarray, dict[str, Any]]:
    """Write ``config``, run the ranks, and check that they all ended with the same parameters."""
    run = horovodrun or horovodrun_path()
    for stale in [
        *workdir.glob("rank-*.sha256"),
        *workdir.glob("rank-*.err"),
        workdir / "result.json",
        workdir / "final.npy",
        workdir / "initial.sha256",
    ]:
        stale.unlink(missing_ok=True)
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_path = workdir / "horovodrun.log"
    # Horovod's background thread coordinates the ranks every cycle, also while they compute; at
    # its 1 ms default that preempts a CPU rank's compute about 1,000 times a second
    # (bench/pretrain_phases.py). A HOROVOD_CYCLE_TIME in the environment wins.
    cycle = {} if gpus or "HOROVOD_CYCLE_TIME" in os.environ else {"HOROVOD_CYCLE_TIME": CPU_CYCLE_TIME_MS}
    rc = launch(run, world, config_path, log_path, threads=threads, extra_env={**cycle, **(env or {})})
    if rc != 0:
        raise _rank_failure(workdir, world, rc, log_path)

    hashes = {}
    for rank in range(world):
        path = workdir / f"rank-{rank}.sha256"
        if not path.exists():
            raise CliError(f"rank {rank} wrote no final parameter hash (full log: {log_path})")
        hashes[rank] = path.read_text().strip()
    if len(set(hashes.values())) != 1:
        shown = ", ".join(f"rank {r}: {h[:12]}" for r, h in hashes.items())
        raise CliError(
            f"the ranks ended with different parameters ({shown}); not uploading (log: {log_path})"
        )
    result = json.loads((workdir / "result.json").read_text(encoding="utf-8"))
    vector = numpy.load(workdir / "final.npy").astype(numpy.float32)
    if parameter_sha256(vector) != hashes[0]:
        raise CliError(f"{workdir / 'final.npy'} does not match rank 0's parameter hash")
    result["rank_sha256"] = [hashes[r] for r in range(world)]
    return vector, result


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
    every epoch (:func:`train_app_ranks`); the learning rate is not scaled, and
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
        return _pretrain_app(
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
    df = _load_central(data, spec)
    data_sha256 = file_sha256(data)
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

    if job.get("preprocess") is None:
        log(
            f"waiting up to {wait:.0f} s for job {job_id}'s statistics round (it fixes the network's input size)"
        )
    job = api.wait_for_preprocess(job_id, wait)
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
    work = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"aicfl-pretrain-{job_id}-"))
    )
    log(
        f"pre-training job {job_id}'s {arch['zoo']} ({arch['input_dim']} inputs) on {len(df)} rows of {data.name}:"
        f" {np} rank(s), {epochs} epoch(s), batch {per_rank_batch}/rank, lr {base_lr:g} x {np};"
        f" log: {work / 'horovodrun.log'}"
    )
    vector, result = train_ranks(
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
    parameters_sha256 = result["final_sha256"]

    metrics: dict[str, Any] = dict(result["metrics"])
    central = _reference_metrics(api, job, spec, pre, arch, vector)
    if central:
        metrics["central"] = central
    provenance = {
        "data_file": data.name,
        "data_sha256": data_sha256,
        "rows": len(df),
        "world_size": np,
        "epochs": epochs,
        "batch_size": per_rank_batch,
        "global_batch_size": per_rank_batch * np,
        "learning_rate": result["learning_rate"],
        "warmup_steps": result["warmup_steps"],
        "optimizer": spec.training.optimizer,
        "fp16": fp16,
        "gpus": gpus,
        "metrics": metrics,
        "history": result["history"],
        "horovod_version": result.get("horovod_version", horovod_version),
        "seconds": round(result["seconds"], 3),
        "samples_per_second": result["samples_per_second"],
        "parameters_sha256": parameters_sha256,
    }
    version = api.upload_version0(job_id, arch, vector, provenance)
    seconds = time.monotonic() - started
    log(
        f"job {job_id} version {version['version']} registered from pre-training:"
        f" train loss {metrics['train_loss']:.4f}"
        + "".join(f", reference {k} {v:.4f}" for k, v in central.items() if k != "examples")
        + f" ({result['samples_per_second']:.0f} samples/s, {seconds:.1f} s in all)"
    )
    return {
        "job_id": job_id,
        "version": int(version["version"]),
        "sha256": version["sha256"],
        "world_size": np,
        "epochs": epochs,
        "rows": len(df),
        "batch_size": per_rank_batch,
        "learning_rate": result["learning_rate"],
        "metrics": metrics,
        "data_sha256": data_sha256,
        "seconds": seconds,
        "training_seconds": result["seconds"],
        "samples_per_second": result["samples_per_second"],
        "horovod_version": provenance["horovod_version"],
        "parameters_sha256": parameters_sha256,
        "workdir": str(work),
    }


# --------------------------------------------------------------------------- an app's model


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


def _pretrain_app(
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
    """:func:`pretrain` of a job whose model is an app's."""
    job_id = int(job["id"])
    app = _load_job_app(spec)
    if not data.exists():
        raise CliError(f"central data {data} does not exist")
    horovodrun = horovodrun_path()
    horovod_version = check_horovod(horovodrun)

    if job.get("preprocess") is None:
        log(f"waiting up to {wait:.0f} s for job {job_id}'s statistics round (it fixes the app's setup)")
    job = api.wait_for_preprocess(job_id, wait)
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
    work = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"aicfl-pretrain-{job_id}-"))
    )
    log(
        f"pre-training job {job_id}'s app {spec.app_ref} on {rows} examples of {data.name}:"
        f" {np} rank(s), {epochs} epoch(s), batch {per_rank_batch}/rank, lr {base_lr:g},"
        f" models averaged after each epoch; log: {work / 'horovodrun.log'}"
    )
    vector, result = train_app_ranks(
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
    parameters_sha256 = result["final_sha256"]
    metrics: dict[str, Any] = dict(result["metrics"])
    central = _app_reference_metrics(api, job, app, job_ctx, vector)
    if central:
        metrics["central"] = central
    provenance = {
        "data_file": data.name,
        "data_sha256": data_hash,
        "rows": rows,
        "app": spec.app_ref,
        "app_version": app.version,
        "scheme": result["scheme"],
        "world_size": np,
        "examples_per_rank": result["examples_per_rank"],
        "epochs": epochs,
        "batch_size": per_rank_batch,
        "learning_rate": result["learning_rate"],
        "optimizer": spec.training.optimizer,
        "metrics": metrics,
        "history": result["history"],
        "horovod_version": result.get("horovod_version", horovod_version),
        "seconds": round(result["seconds"], 3),
        "samples_per_second": result["samples_per_second"],
        "parameters_sha256": parameters_sha256,
    }
    version = api.upload_version0(job_id, arch, vector, provenance)
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
        "app": spec.app_ref,
        "world_size": np,
        "epochs": epochs,
        "rows": rows,
        "batch_size": per_rank_batch,
        "learning_rate": result["learning_rate"],
        "metrics": metrics,
        "data_sha256": data_hash,
        "seconds": seconds,
        "training_seconds": result["seconds"],
        "samples_per_second": result["samples_per_second"],
        "horovod_version": provenance["horovod_version"],
        "parameters_sha256": parameters_sha256,
        "workdir": str(work),
    }
