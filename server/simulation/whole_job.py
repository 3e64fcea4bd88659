"""``aicfl simulate JOB.toml``: a whole job with N virtual devices in one process (or on Ray).

What is real: the coordinator engine (``coordinator.engine.Federation``: cohort selection, the
round state machine, SecAgg+'s server side, the strategy, the registry, central evaluation on the
held-out rows), on SQLite in a temporary folder; and each device's code (``client_agent.worker``:
signature checks, the built-in app's data checks, statistics, local training, evaluation,
SecAgg+'s client side). What is virtual: the network (the driver posts each message to the engine
method its route calls), the clock (a stage's deadline passes at once when some devices are
silent), the devices' files (rows in memory) and their identities (keys made here, enrolled with
one-time tokens as the agent enrolls). ``docs/simulation.md`` has the whole story.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import auth
from coordinator.engine import Federation
from coordinator.errors import CoordinatorError
from server.simulate import SimulationError, VirtualClock, scratch_federation
from server.simulation.data import DataSetupError, SimulationData, prepare
from server.simulation.devices import DeviceSeed, new_device_key
from server.simulation.executors import Executor, InProcess, LocalProcesses, RayShards
from server.simulation.job import CHECKIN_REQUEST, JobDriver
from server.simulation.splits import Split
from server.simulation.summary import summarize
from shared.apps import BUILTIN
from shared.jobspec import JobSpec, JobSpecError, validate_spec
from shared.signing import b64e, public_key_bytes

#: Enrollment tokens the engine issues per call.
TOKENS_PER_CALL = 10_000


@dataclass(frozen=True)
class SimulationOptions:
    """How to simulate a job: N devices, the split, the dropout rate, and where devices run.

    ``cohort``: devices per round (default: every device, as Flower's ``fraction_fit = 1``).
    ``rounds``: overrides the spec's. ``data``: a bundled data set or a CSV/Parquet file.
    ``ray_address``: run the devices on Ray (``local``, ``auto`` or a cluster's address).
    ``processes``: run the devices in this many worker processes of this machine (no Ray).
    ``ceiling``: also train the central ceiling (the demo's; seconds of CPU on the pooled rows).
    """

    devices: int
    split: Split
    dropout: float = 0.0
    rounds: int | None = None
    cohort: int | None = None
    seed: int = 0
    data: str = "mlc_churn"
    ray_address: str | None = None
    ray_actors: int | None = None
    processes: int | None = None
    ceiling: bool = True


def simulation_spec(spec: JobSpec, opts: SimulationOptions) -> JobSpec:
    """The job as simulated: every device in every round unless ``cohort`` says fewer, the spec's
    minimum kept (at most the cohort), SecAgg+ sized for the drawn dropout, no audits, and no
    reference path (the held-out rows are attached directly)."""
    if spec.model.app is not None and spec.app_ref != BUILTIN:
        raise SimulationError(
            f"the simulation runs jobs of the built-in tabular app only, not {spec.app_ref}"
        )
    if spec.model.initial == "pretrained":
        raise SimulationError(
            "model.initial = 'pretrained' needs the central cluster; the simulation has none"
        )
    target = opts.cohort or opts.devices
    if not 2 <= target <= opts.devices:
        raise SimulationError(f"--cohort {target}: must be between 2 and --devices ({opts.devices})")
    d = spec.model_dump(mode="json")
    d["rounds"] = opts.rounds or spec.rounds
    d["cohort"] = {**d["cohort"], "target": target, "minimum": min(spec.cohort.minimum, target)}
    d["secagg"] = {**d["secagg"], "dropout": max(spec.secagg.dropout, opts.dropout)}
    d["audit"] = {**d["audit"], "enabled": False}
    d["evaluation"] = {**d["evaluation"], "reference": None}
    try:
        return validate_spec(d)
    except JobSpecError as err:
        raise SimulationError(f"the job as simulated is not valid: {err}") from None


def check_options(opts: SimulationOptions) -> None:
    """The options' own bounds; ``SimulationError`` naming the flag."""
    if opts.devices < 2:
        raise SimulationError("--devices must be at least 2")
    if not 0 <= opts.dropout < 1:
        raise SimulationError("--dropout must be in [0, 1)")
    if opts.rounds is not None and opts.rounds < 1:
        raise SimulationError("--rounds must be at least 1")
    if opts.ray_actors is not None and opts.ray_actors < 1:
        raise SimulationError("--ray-actors must be at least 1")
    if opts.processes is not None and opts.processes < 1:
        raise SimulationError("--processes must be at least 1")
    if opts.processes is not None and opts.ray_address:
        raise SimulationError("--processes and --ray-address: the devices run in one place, choose one")


def _enroll(fed: Federation, n: int) -> list[tuple[str, bytes]]:
    """``n`` devices enrolled as agents enroll (a one-time token and a fresh Ed25519 key each)."""
    keys = [new_device_key() for _ in range(n)]
    out: list[tuple[str, bytes]] = []
    with fed.write() as s:
        tokens: list[str] = []
        for start in range(0, n, TOKENS_PER_CALL):
            tokens += auth.create_enrollment_tokens(s, min(TOKENS_PER_CALL, n - start), 3600, "simulate")
        for i, ((key, raw), token) in enumerate(zip(keys, tokens, strict=True)):
            device = auth.enroll_device(s, token, b64e(public_key_bytes(key)), f"sim-{i:05d}", "simulate")
            out.append((device.id, raw))
    return out


def simulate_job(spec: JobSpec, opts: SimulationOptions, out: Path | None = None) -> dict[str, Any]:
    """Run ``spec`` with ``opts.devices`` virtual devices; the summary (written to ``out``/summary.json)."""
    import json

    check_options(opts)
    t_start = time.perf_counter()
    spec = simulation_spec(spec, opts)
    if spec.data is None:  # pragma: no cover - the built-in app's spec has [data]
        raise SimulationError("the job has no [data] schema")
    try:
        data = prepare(opts.data, spec.data, opts.split, opts.devices, opts.seed)[0]
    except DataSetupError as err:
        raise SimulationError(str(err)) from None
    t_data = time.perf_counter()
    # Devices never go stale: the virtual clock jumps by whole stage deadlines.
    with scratch_federation("aicfl-simjob-", eligibility_window=1e12) as (fed, clock):
        summary = _run(fed, clock, spec, opts, data, t_start, t_data)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _run(
    fed: Federation,
    clock: VirtualClock,
    spec: JobSpec,
    opts: SimulationOptions,
    data: SimulationData,
    t_start: float,
    t_data: float,
) -> dict[str, Any]:
    enrolled = _enroll(fed, opts.devices)
    for device_id, _ in enrolled:
        fed.checkins.checkin(device_id, CHECKIN_REQUEST)  # online: eligible for the first cohort
    seeds = [DeviceSeed(d, raw, frame) for (d, raw), frame in zip(enrolled, data.parts, strict=True)]
    coordinator_key = b64e(public_key_bytes(fed.key))
    executor: Executor
    if opts.ray_address:
        executor = RayShards(seeds, coordinator_key, opts.ray_address, opts.ray_actors)
    elif opts.processes:
        executor = LocalProcesses(seeds, coordinator_key, opts.processes)
    else:
        executor = InProcess(seeds, coordinator_key)
    try:
        try:
            job = fed.jobs.submit(spec.model_dump(mode="json"), "simulate")
            fed.jobs.set_reference(job.id, data.reference, "simulate")
        except CoordinatorError as err:
            raise SimulationError(f"the coordinator refused the job: {err.detail}") from None
        except JobSpecError as err:  # what only the coordinator checks of [privacy]
            raise SimulationError(f"the coordinator refused the job: {err}") from None
        t_ready = time.perf_counter()
        driver = JobDriver(fed, clock, job.id, spec, executor, opts.dropout, np.random.default_rng(opts.seed))
        driver.run()
        t_job = time.perf_counter()
    finally:
        executor.close()
    sim = {
        "engine": executor.name,
        "split": data.split,
        "device_rows": {
            "min": min(len(p) for p in data.parts),
            "median": float(np.median([len(p) for p in data.parts])),
            "max": max(len(p) for p in data.parts),
        },
        "test_rows": len(data.test),
        "dropout": opts.dropout,
        "seed": opts.seed,
        "cohort": spec.cohort.target,
        "minimum": spec.cohort.minimum,
        "rounds_asked": spec.rounds,
        "data_seconds": round(t_data - t_start, 3),
        "setup_seconds": round(t_ready - t_data, 3),
        "job_seconds": round(t_job - t_ready, 3),
    }
    summary = summarize(fed, job.id, spec, data, opts.devices, driver.stats, sim, ceiling=opts.ceiling)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    return summary
