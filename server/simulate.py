"""``aicfl simulate``: one secure round of the real coordinator and device code, in one process, no HTTP.

The federation engine (``coordinator.engine.Federation``, SQLite in a
temporary folder) and the devices' SecAgg+ side (``shared.secagg``, as the
agent runs it) exchange the same messages they exchange over HTTP; a virtual
clock stands in for waiting out a stage deadline. Updates are synthetic
vectors of ``--params`` values, so the figures are those of the protocol, not
of local training. For research and for ``bench/secagg.py``.

In each stage the devices work at once on a pool of threads, one per CPU by
default, as real devices would: their heavy work (AES-CTR mask expansion,
numpy arithmetic) releases the GIL. They go in batches of one device per
thread: the batch checks in, computes its messages in parallel, and then the
coordinator handles those messages one after the other on the calling thread
while no device computes. A real coordinator is a process of its own; were
it called while device threads run Python in the same process, its CPU time
would carry their contention for the GIL. Its CPU time is the calling thread's CPU time
(``time.thread_time``) inside its calls only.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import auth, registry
from coordinator.blobs import LocalBlobStore
from coordinator.engine import EngineSettings, Federation
from coordinator.errors import Conflict
from coordinator.models import Round
from coordinator.store import make_engine, migrate, session_factory
from shared import codec
from shared.jobspec import DataSchema, ModelSpec
from shared.secagg import statistics as secagg_statistics
from shared.secagg.params import SecAggParams
from shared.secagg.primitives import SecAggError
from shared.secagg.protocol import SecAggClient, weighted_input
from shared.secagg.quantize import quantisation_bound
from shared.signing import b64e, identity_verifier, public_key_bytes
from shared.tabular import local_statistics
from shared.wire import CheckinRequest, ConfigureMessage, Task, masked_input_header
from shared.zoo import architecture, parameter_count

SCHEMA = {
    "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "numeric"}],
    "target": "y",
    "task": "binary",
    "positive": "1",
}
DROP_POINTS = ("configure", "advertise_keys", "share_keys", "masked_input")
STAGE_TIMEOUT = 600.0


class SimulationError(Exception):
    """The simulation could not run as asked."""


def hidden_for(params: int) -> list[int]:
    """An MLP on 2 inputs with about ``params`` parameters: one hidden layer for small sizes, two above."""
    if params < 5_000:
        return [max(1, (params - 2) // 4)]
    width = int(math.sqrt(params))
    return [width, width]


class VirtualClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextlib.contextmanager
def scratch_federation(prefix: str, eligibility_window: float) -> Iterator[tuple[Federation, VirtualClock]]:
    """The real federation engine on SQLite in a temporary folder, on a virtual clock, for one simulation."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'sim.db'}")
        try:
            migrate(engine)
            clock = VirtualClock()
            yield (
                Federation(
                    session_factory(engine),
                    LocalBlobStore(Path(tmp) / "blobs"),
                    Ed25519PrivateKey.generate(),
                    EngineSettings(eligibility_window=eligibility_window),
                    clock=clock,
                ),
                clock,
            )
        finally:
            engine.dispose()


@dataclass
class SimDevice:
    key: Ed25519PrivateKey
    rng: np.random.Generator
    id: str = ""
    client: SecAggClient | None = None
    cpu: float = 0.0
    update: np.ndarray | None = None
    examples: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _timed(dev: SimDevice, fn: Any, *args: Any) -> Any:
    t0 = time.thread_time()
    try:
        return fn(*args)
    finally:
        dev.cpu += time.thread_time() - t0


def simulate(
    *,
    devices: int,
    params: int,
    dropout: float = 0.0,
    drop_after: str = "masked_input",
    seed: int = 0,
    clip: float = 0.5,
    bits: int = 16,
    k: int | None = None,
    t: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """One statistics round and one SecAgg+ training round; returns the figures of the training round.

    ``workers``: threads the devices run on (one per CPU when None).
    """
    if devices < 2:
        raise SimulationError("--devices must be at least 2")
    if not 0 <= dropout < 1:
        raise SimulationError("--dropout must be in [0, 1)")
    if drop_after not in DROP_POINTS:
        raise SimulationError(f"--drop-after must be one of {', '.join(DROP_POINTS)}")
    n_drop = int(round(devices * dropout))
    rng = np.random.default_rng(seed)
    with scratch_federation("aicfl-sim-", eligibility_window=3600) as (fed, clock):
        threads = workers or os.cpu_count() or 1
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sim-device")
        try:
            return _run(
                fed, clock, pool, threads, devices, params, n_drop, drop_after, rng, seed, clip, bits, k, t
            )
        finally:
            pool.shutdown()


def _run(
    fed: Federation,
    clock: VirtualClock,
    pool: ThreadPoolExecutor,
    workers: int,
    n: int,
    params: int,
    n_drop: int,
    drop_after: str,
    rng: np.random.Generator,
    seed: int,
    clip: float,
    bits: int,
    k: int | None,
    t: int | None,
) -> dict[str, Any]:
    with fed.write() as s:
        tokens = auth.create_enrollment_tokens(s, n, 3600, "simulate")
    # One generator per device: the devices run on several threads.
    devs = [SimDevice(Ed25519PrivateKey.generate(), np.random.default_rng([seed, i])) for i in range(n)]
    for d, tok in zip(devs, tokens, strict=True):
        with fed.write() as s:
            d.id = auth.enroll_device(s, tok, b64e(public_key_bytes(d.key)), "sim", "simulate").id
    hidden = hidden_for(params)
    spec = {
        "name": "simulate",
        "rounds": 1,
        "seed": 1,
        "data": SCHEMA,
        "model": {"zoo": "mlp", "hidden": hidden},
        "cohort": {
            "target": n,
            "minimum": max(1, n - n_drop),
            "stage_timeout": STAGE_TIMEOUT,
            "selection_timeout": 1,
        },
        "evaluation": {"federated": False},
        "secure": True,
        "secagg": {
            "dropout": max(0.1, n_drop / n + 0.05) if n_drop else 0.1,
            "clip": clip,
            "bits": bits,
            "k": k,
            "t": t,
        },
    }
    job = fed.jobs.submit(spec, "simulate")
    coord_cpu = [0.0]

    def coord(fn: Any, *args: Any) -> Any:
        """A coordinator call, always from this thread; its CPU time is counted."""
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            coord_cpu[0] += time.thread_time() - t0

    def task(d: SimDevice) -> Task | None:
        return coord(fed.checkins.checkin, d.id, CheckinRequest()).task

    # The statistics round (secure too), over a few synthetic rows per device; it makes version 0.
    schema = DataSchema.model_validate(SCHEMA)
    frame = pd.DataFrame(
        {"a": rng.normal(size=32), "b": rng.normal(size=32), "y": rng.integers(0, 2, 32).astype(str)}
    )
    local = local_statistics(frame, schema)
    n_params = parameter_count(architecture(ModelSpec(hidden=hidden), 2, 1))
    dropped: set[str] = set()
    kind = ["stats"]
    for d in devs:
        task(d)
    fed.tick()

    Send = Callable[[], Any]

    def stage(name: str, act: Callable[[SimDevice, Task], Send]) -> None:
        """Each batch: check in, the devices' work in parallel (``act`` returns the coordinator call that
        sends its message), then the coordinator calls one by one."""

        def work(item: tuple[SimDevice, Task]) -> Send | None:
            # A device whose own checks refuse (too few neighbours) sits out, as the agent does.
            with contextlib.suppress(SecAggError):
                return act(*item)
            return None

        active = [
            d
            for d in devs
            if not (
                d.id in dropped and DROP_POINTS.index(drop_after) < (DROP_POINTS + ("unmask",)).index(name)
            )
        ]
        for i in range(0, len(active), workers):
            batch = [
                (d, tk) for d in active[i : i + workers] if (tk := task(d)) is not None and tk.stage == name
            ]
            for send in list(pool.map(work, batch)):  # re-raises a device's unexpected error here
                # An unmask answer may arrive after the round finished (every secret already had t
                # shares): stale, as the agent takes a 409.
                with contextlib.suppress(*((Conflict,) if name == "unmask" else ())):
                    if send is not None:
                        send()
        _expire_if_waiting(fed, clock, job.id, kind[0], name, coord)

    def configure(d: SimDevice, tk: Task) -> Send:
        vocab = secagg_statistics.vocabulary(local, schema) if tk.kind == "stats" else None
        msg = ConfigureMessage(accepted=True, rows=64, vocabulary=vocab)
        return lambda: coord(fed.devices.configure, d.id, tk.round_id, msg)

    def advertise(d: SimDevice, tk: Task) -> Send:
        info = tk.secagg or {}
        d.client = SecAggClient(
            d.id, base64.b64decode(info["context"]), SecAggParams(**info["params"]), d.key.sign
        )
        msg = _timed(d, d.client.advertise)
        return lambda: coord(fed.devices.secure_json, d.id, tk.round_id, "advertise_keys", msg)

    def share(d: SimDevice, tk: Task) -> Send:
        info = tk.secagg or {}
        assert d.client is not None
        verify = identity_verifier(info.get("identity_keys", {}))
        cts = _timed(d, d.client.share_keys, info.get("neighbours", {}), verify)
        return lambda: coord(fed.devices.secure_json, d.id, tk.round_id, "share_keys", {"ciphertexts": cts})

    def masked(d: SimDevice, tk: Task) -> Send:
        assert d.client is not None
        if tk.kind == "stats":
            x = secagg_statistics.encode(local, schema, (tk.secagg or {})["vocabulary"])
            y = d.client.masked_input(x, (tk.secagg or {}).get("ciphertexts", {}))
            stats_body = codec.encode(masked_input_header(tk.round_id), y)
            return lambda: coord(fed.devices.masked_input, d.id, tk.round_id, stats_body)
        # A synthetic update, uniform in [-1.1 clip, 1.1 clip) (some values clip), cheap to draw, as
        # bench/flower_secagg.py's clients draw theirs.
        update = d.rng.random(n_params, dtype=np.float32)
        update -= np.float32(0.5)
        update *= np.float32(2.2 * clip)
        d.update = update
        d.examples = int(d.rng.integers(16, 256))
        qrng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16), "little")))
        x = _timed(d, weighted_input, d.update, d.examples, d.client.params, qrng)
        y = _timed(d, d.client.masked_input, x, (tk.secagg or {}).get("ciphertexts", {}), True)
        body = _timed(
            d,
            codec.encode,
            masked_input_header(tk.round_id),
            y,
        )
        return lambda: coord(fed.devices.masked_input, d.id, tk.round_id, body)

    def unmask(d: SimDevice, tk: Task) -> Send:
        assert d.client is not None
        info = tk.secagg or {}
        me = {d.id}
        shares = _timed(
            d, d.client.unmask, set(info.get("survivors", [])) - me, set(info.get("dropped", [])) - me
        )
        return lambda: coord(fed.devices.secure_json, d.id, tk.round_id, "unmask", {"shares": shares})

    def run_round() -> None:
        for name, act in (
            ("configure", configure),
            ("advertise_keys", advertise),
            ("share_keys", share),
            ("masked_input", masked),
            ("unmask", unmask),
        ):
            stage(name, act)

    run_round()  # statistics
    for d in devs:
        d.cpu, d.client = 0.0, None
    fed.tick()
    dropped = {d.id for d in devs[:n_drop]} if n_drop else set()
    kind[0] = "train"
    t_round = time.perf_counter()
    coord_cpu[0] = 0.0
    run_round()  # the measured training round
    round_seconds = time.perf_counter() - t_round

    with fed.read() as s:
        r = s.query(Round).filter(Round.job_id == job.id, Round.kind == "train").one()
        status, reason, metrics = r.status, r.reason, dict(r.metrics or {})
        versions = registry.list_versions(s, job.id)
        v0 = registry.load_vector(fed.blobs, versions[0])[1]
        v1 = registry.load_vector(fed.blobs, versions[1])[1] if len(versions) > 1 else None
        agg_seconds = r.aggregation_seconds
    survivors = [d for d in devs if d.update is not None]
    out: dict[str, Any] = {
        "devices": n,
        "params": n_params,
        "dropped": len(dropped),
        "drop_after": drop_after if dropped else None,
        "status": status,
        "round_seconds": round_seconds,
        "coordinator_cpu_seconds": coord_cpu[0],
        "client_cpu_seconds": float(np.mean([d.cpu for d in devs if d.id not in dropped])) if devs else 0.0,
        "aggregation_seconds": agg_seconds,
        "unmask_seconds": metrics.get("unmask_seconds"),
    }
    if status != "completed" or v1 is None:
        out.update(max_abs_error=None, exact=False, reason=reason)
        return out
    weights = np.array([d.examples for d in survivors], dtype=np.float64)
    updates = np.stack(
        [np.clip(d.update, -clip, clip).astype(np.float64) for d in survivors if d.update is not None]
    )
    plain = (weights[:, None] * updates).sum(axis=0) / weights.sum()
    err = float(np.max(np.abs((v1.astype(np.float64) - v0.astype(np.float64)) - plain)))
    bound = quantisation_bound(clip, bits) + 1e-6  # plus float32 rounding of the stored model
    out.update(
        max_abs_error=err, exact=bool(err <= bound), quantisation_bound=bound, participants=len(survivors)
    )
    return out


def _expire_if_waiting(
    fed: Federation, clock: VirtualClock, job_id: int, kind: str, stage: str, coord: Any
) -> None:
    """If the round still waits in ``stage`` (someone dropped), let its deadline pass and drive it on."""
    with fed.read() as s:
        r = s.query(Round).filter(Round.job_id == job_id, Round.kind == kind).one()
        waiting = r.status == "running" and r.stage == stage
    if waiting:
        clock.advance(STAGE_TIMEOUT + 1)
        coord(fed.tick)
