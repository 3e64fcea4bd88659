"""One round of Flower's own SecAgg+ in Flower's simulation engine, for comparison.

Runs flwr 1.42's ``SecAggPlusWorkflow`` (inside ``DefaultWorkflow`` with
``FedAvg``) in a ``ServerApp`` and a ``ClientApp`` with ``secaggplus_mod``
through ``flwr.simulation.run_simulation`` (the Ray backend, 2 CPUs, one CPU
per client actor), with ``--devices`` virtual SuperNodes whose ``fit`` returns a
random float32 vector of ``--params`` values (uniform in [-1, 1), generated from
``(seed, partition id)`` so that the plain mean can be recomputed here).
FedAvg starts from a zero model of the same size, which goes to every client
with its fit instructions, as in any Flower round. Flower's ``num_shares`` and
``reconstruction_threshold`` default to aicfl's own k and t for the cohort
(see ``default_shares``), so both protocols expand about as many masks;
the rest of SecAggPlusWorkflow's settings are Flower's defaults (clipping
range 8, 2**22 quantisation levels, modulus 2**32, max_weight 1000; every
client reports 1000 examples, so the weights are equal and the quantisation
is Flower's finest).

Dropouts: a deterministic ``round(dropout * devices)`` of the clients (partition
ids spread evenly over the range) send their masked input and then fail in the
unmask stage: a client mod placed *outside* ``secaggplus_mod`` raises when the
message's SecAgg+ stage is ``unmask``. (A mod placed after ``secaggplus_mod``
only ever sees the masked-input stage, because ``secaggplus_mod`` answers the
setup, share-keys and unmask stages itself.) Flower's simulation engine turns
the exception into an error reply, so the server counts the client as dropped
at once, with no timeout, and reconstructs its private mask from its
neighbours' shares.

Measured (one line of JSON per configuration):

- ``round_seconds``: wall time of the fit round inside the ServerApp, from the
  start of ``SecAggPlusWorkflow.__call__`` (setup stage) to the return of
  ``FedAvg.aggregate_fit`` at the end of the unmask stage. The actors are warmed
  up before (one message to every node), so Ray start-up is not counted.
- ``server_cpu_seconds``: CPU seconds (user + system) of the driver process over
  that interval. In the simulation the driver process holds the ServerApp (and
  the thread pools it uses for Shamir reconstruction) and the simulation
  engine's threads that hand messages to the Ray actors; the ClientApps run in
  separate Ray worker processes. ``server_thread_cpu_seconds`` is the CPU time
  of the ServerApp thread alone.
- ``client_cpu_seconds``: per device, mean over all devices, of the CPU seconds
  of the Ray worker process around the ClientApp call (all mods included,
  Shamir thread pools included, Ray's (de)serialisation of the message not),
  summed over the four stages; each reply carries its figure back in an extra
  ``ConfigRecord`` that a wrapper around the ``Grid`` reads.
- ``max_abs_error``: largest absolute difference between the aggregate that
  FedAvg returns and the plain mean of all devices' vectors (dropped devices
  included: they dropped after their masked input was summed).
- ``loadavg_1m_before``: the machine's 1-minute load average when the
  simulation started, to tell a quiet run from a loaded one.

    python bench/flower_secagg.py [--quick] [--devices N --params M --dropout F]

Needs ``flwr[simulation]==1.42.*`` (which brings ``ray``).
"""

from __future__ import annotations

import os

# Flower reads this at import time; the benchmark must not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ENGINE = "flower-secagg+"
DEFAULT_CONFIGS = [(10, 100_000), (50, 100_000), (100, 100_000), (50, 1_000_000), (100, 1_000_000)]
QUICK_CONFIGS = [(10, 100_000)]
DEFAULT_DROPOUTS = [0.0, 0.1]
NUM_EXAMPLES = 1000  # == SecAggPlusWorkflow's default max_weight: weight ratio 1, finest quantisation
BENCH_RECORD = "aicfl.bench"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def client_vector(seed: int, partition_id: int, params: int) -> np.ndarray:
    """The update of device ``partition_id``: float32 uniform in [-1, 1)."""
    rng = np.random.default_rng([seed, partition_id])
    vec = rng.random(params, dtype=np.float32)
    vec *= 2.0
    vec -= 1.0
    return vec


def dropped_partitions(devices: int, dropout: float) -> set[int]:
    """A deterministic ``round(dropout * devices)`` partition ids, spread evenly."""
    n = int(round(dropout * devices))
    if n <= 0:
        return set()
    return {(i * devices) // n for i in range(n)}


def default_shares(devices: int, tolerate: float | None = None) -> tuple[int, int]:
    """Flower's ``num_shares`` and ``reconstruction_threshold`` matched to aicfl's SecAgg+.

    aicfl (``shared.secagg.params.derive_params``, its defaults) gives each
    device k neighbours besides itself and a threshold t. Flower's ring
    neighbourhood of ``num_shares`` nodes counts the node itself, so
    ``num_shares = k + 1``, raised to the next odd number when below the cohort
    size (Flower asks for an odd count and would raise it anyway), and the
    threshold is aicfl's t. Without ``shared.secagg`` the same formulas are
    used here: ``k = min(n - 1, max(4, ceil(3 log2 n)))``, ``t = floor(k/2) + 1``
    (n = 10: 10 shares, t = 5; n = 50: 19, t = 9; n = 100: 21, t = 11).
    """
    try:
        from shared.secagg.params import derive_params

        p = derive_params(devices) if tolerate is None else derive_params(devices, dropout=tolerate)
        k, t = int(p.k), int(p.t)
    except Exception:
        k = min(devices - 1, max(4, math.ceil(3 * math.log2(max(devices, 2)))))
        t = k // 2 + 1
    num_shares = k + 1
    if num_shares < devices and num_shares % 2 == 0:
        num_shares += 1
    num_shares = min(num_shares, devices)
    return num_shares, t


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _build_apps(
    devices: int,
    params: int,
    dropout: float,
    seed: int,
    num_shares: int | float,
    threshold: int | float,
    out: dict[str, Any],
):  # type: ignore[no-untyped-def]
    """The ServerApp and ClientApp of one configuration; results go into ``out``."""
    from flwr.app import ConfigRecord, Context, Message
    from flwr.app.message_type import MessageType
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import GetParametersIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.constant import MessageTypeLegacy
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    drop = dropped_partitions(devices, dropout)

    # ----------------------------------------------------------------- client
    class BenchClient(NumPyClient):
        def __init__(self, partition_id: int):
            self.partition_id = partition_id

        def get_parameters(self, config):  # type: ignore[no-untyped-def]
            return []

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [client_vector(seed, self.partition_id, params)], NUM_EXAMPLES, {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return BenchClient(int(context.node_config["partition-id"])).to_client()

    def bench_mod(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
        """Outermost mod: drops the chosen clients at the unmask stage; meters CPU."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        pid = int(ctxt.node_config["partition-id"])
        if stage == Stage.UNMASK and pid in drop:
            raise RuntimeError(f"bench: partition {pid} drops out after its masked input")
        c0 = _cpu()
        reply = call_next(msg, ctxt)
        cpu = _cpu() - c0
        if reply.has_content():
            reply.content.config_records[BENCH_RECORD] = ConfigRecord(
                {"cpu": float(cpu), "partition": pid, "stage": str(stage)}
            )
        return reply

    client_app = ClientApp(client_fn=client_fn, mods=[bench_mod, secaggplus_mod])

    # ----------------------------------------------------------------- server
    client_cpu: dict[int, float] = {}

    class MeteredGrid:
        """Delegates to the simulation's Grid; reads the clients' CPU figures off the replies."""

        def __init__(self, grid):  # type: ignore[no-untyped-def]
            self._grid = grid

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self._grid, name)

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            for r in replies:
                if r.has_content() and BENCH_RECORD in r.content.config_records:
                    rec = r.content.config_records.pop(BENCH_RECORD)
                    pid = int(rec["partition"])
                    client_cpu[pid] = client_cpu.get(pid, 0.0) + float(rec["cpu"])
            return replies

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            res = super().aggregate_fit(server_round, results, failures)
            out["t_end"] = time.perf_counter()
            out["cpu_end"] = _cpu()
            out["thread_cpu_end"] = time.thread_time()
            out["aggregate"] = res[0]
            out["results"] = len(results)
            out["failures"] = len(failures)
            return res

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def __call__(self, grid, context):  # type: ignore[no-untyped-def]
            out["t_start"] = time.perf_counter()
            out["cpu_start"] = _cpu()
            out["thread_cpu_start"] = time.thread_time()
            super().__call__(MeteredGrid(grid), context)
            out["t_return"] = time.perf_counter()

    def warm_up(grid) -> None:  # type: ignore[no-untyped-def]
        """Wait for all nodes, then send every node one cheap message so that all actors are up."""
        deadline = time.time() + 300
        while len(list(grid.get_node_ids())) < devices:
            if time.time() > deadline:
                raise RuntimeError("nodes did not register")
            time.sleep(0.05)
        content = compat.getparametersins_to_recorddict(GetParametersIns({}))
        msgs = [
            Message(
                content=content,
                dst_node_id=nid,
                message_type=MessageTypeLegacy.GET_PARAMETERS,
                group_id="warmup",
            )
            for nid in grid.get_node_ids()
        ]
        replies = list(grid.send_and_receive(msgs))
        bad = [r for r in replies if r.has_error()]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[0].error}")

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context: Context) -> None:  # type: ignore[no-untyped-def]
        warm_up(grid)
        strategy = TimedFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=devices,
            min_evaluate_clients=0,
            min_available_clients=devices,
            initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        fit = TimedSecAggPlus(num_shares=num_shares, reconstruction_threshold=threshold)
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    out["_client_cpu"] = client_cpu
    out["_to_ndarrays"] = parameters_to_ndarrays
    return server_app, client_app


def _ray_cleanup() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # pragma: no cover - best effort
        pass


def run_flower(
    devices: int,
    params: int,
    dropout: float,
    *,
    seed: int = 0,
    num_shares: int | float | None = None,
    threshold: int | float | None = None,
    num_cpus: int = 2,
    verbose: bool = False,
    tolerate: float | None = None,
) -> dict:
    """One round of Flower's SecAgg+ in its simulation engine; returns the figures as a dict."""
    from flwr.simulation import run_simulation

    devices, params = int(devices), int(params)
    if num_shares is None or threshold is None:
        k, t = default_shares(devices, tolerate)
        num_shares = k if num_shares is None else num_shares
        threshold = t if threshold is None else threshold

    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.CRITICAL)

    out: dict[str, Any] = {}
    server_app, client_app = _build_apps(devices, params, dropout, seed, num_shares, threshold, out)
    backend_config: Any = {
        "init_args": {
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": logging.ERROR if not verbose else logging.INFO,
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=devices,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        _ray_cleanup()
        flwr_logger.setLevel(old_level)
    total = time.perf_counter() - t0

    if "t_end" not in out:
        raise RuntimeError(
            f"Flower's SecAgg+ round did not complete (devices={devices}, params={params}, "
            f"dropout={dropout}, num_shares={num_shares}, threshold={threshold})"
        )

    max_err = None
    if out.get("aggregate") is not None:
        agg = out["_to_ndarrays"](out["aggregate"])[0].astype(np.float64)
        mean = np.zeros(params, dtype=np.float64)
        for pid in range(devices):
            mean += client_vector(seed, pid, params)
        mean /= devices
        max_err = float(np.max(np.abs(agg - mean)))

    client_cpu = out["_client_cpu"]
    return {
        "engine": ENGINE,
        "devices": devices,
        "params": params,
        "dropout": dropout,
        "dropped": len(dropped_partitions(devices, dropout)),
        "round_seconds": round(out["t_end"] - out["t_start"], 4),
        "server_cpu_seconds": round(out["cpu_end"] - out["cpu_start"], 4),
        "server_thread_cpu_seconds": round(out["thread_cpu_end"] - out["thread_cpu_start"], 4),
        "client_cpu_seconds": round(sum(client_cpu.values()) / devices, 4) if client_cpu else None,
        "max_abs_error": max_err,
        "num_shares": num_shares,
        "reconstruction_threshold": threshold,
        "results": out["results"],
        "failures": out["failures"],
        "simulation_seconds": round(total, 2),
        "loadavg_1m_before": round(load_before, 2),
        "flwr": _flwr_version(),
    }


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int)
    ap.add_argument("--params", type=float, help="parameters per update (1e5 is accepted)")
    ap.add_argument(
        "--dropout",
        type=float,
        action="append",
        help="fraction dropping after the masked input (repeatable; default 0 and 0.1)",
    )
    ap.add_argument("--quick", action="store_true", help="only 10 devices x 1e5 parameters")
    ap.add_argument(
        "--num-shares",
        help="Flower's num_shares: an int, or a float for a fraction of the cohort "
        "(default: matched to aicfl's k, see default_shares)",
    )
    ap.add_argument("--threshold", help="Flower's reconstruction_threshold: an int, or a float fraction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray (one per client actor)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    if args.devices or args.params:
        configs = [(args.devices or 50, int(args.params or 100_000))]
    elif args.quick:
        configs = QUICK_CONFIGS
    else:
        configs = DEFAULT_CONFIGS
    dropouts = args.dropout or DEFAULT_DROPOUTS

    def as_num(x: str | None) -> int | float | None:
        if x is None:
            return None
        return float(x) if any(c in x for c in ".eE") else int(x)

    rc = 0
    for devices, params in configs:
        for dropout in dropouts:
            try:
                row = run_flower(
                    devices,
                    params,
                    dropout,
                    seed=args.seed,
                    num_shares=as_num(args.num_shares),
                    threshold=as_num(args.threshold),
                    num_cpus=args.cpus,
                    verbose=args.verbose,
                )
            except Exception as exc:  # report and go on with the next configuration
                row = {
                    "engine": ENGINE,
                    "devices": devices,
                    "params": params,
                    "dropout": dropout,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                rc = 1
            print(json.dumps(row), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
