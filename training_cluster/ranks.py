"""The Horovod launcher of ``aicfl cluster pretrain``: find and check ``horovodrun``, start the
ranks (one :mod:`training_cluster.hvd_worker` each, run as a module), report a failing rank, and check
that the ranks all ended with the same parameters.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy

from shared.api_client import CliError
from training_cluster.hvd_worker import parameter_sha256

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


def run_ranks(
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
