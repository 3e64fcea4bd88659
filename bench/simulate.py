"""A whole job with N virtual devices: ``aicfl simulate JOB.toml`` against Flower's simulation.

Both sides, in one invocation, run the same job: ``examples/churn.toml``'s MLP (the zoo's, same
seed for version 0), the same local training (``shared.training.train_local``: the spec's epochs,
batch size, learning rate and optimiser), the same devices (``--split`` of the same training rows,
the same seed), the same rounds, every device in every round, FedAvg; and each model measured on
the same held-out test rows (the final AUC).

- **aicfl**: ``server.simulation.simulate_job`` (the coordinator engine and the agent's worker per
  device, no HTTP, a virtual clock): a statistics round (the preprocessing, under SecAgg+ when the
  job is secure), the training rounds (SecAgg+ when the job is secure, as churn.toml is by
  default; ``--plain`` sets ``secure = false``), each with the devices' holdout metrics and the
  coordinator's central evaluation, then a federated evaluation round. ``--ray-address`` runs its
  devices on Ray actors.
- **Flower**: ``flwr.simulation.run_simulation`` (flwr 1.42, Ray backend, one CPU per client
  actor, ``--cpus`` CPUs), a ``ServerApp`` with ``FedAvg`` (``fraction_fit = fraction_evaluate =
  1``: every device trains and evaluates its holdout rows each round) and central evaluation on
  the test rows each round, a ``ClientApp`` whose ``NumPyClient`` trains with the same function on
  the same rows. It has no statistics round: its preprocessing is fitted on the pooled training
  rows (what aicfl's statistics round computes from the devices' sums), and no secure aggregation.

Wall time is each side's whole run, data already split; aicfl's includes enrolling the devices and
its statistics and evaluation rounds, Flower's includes starting Ray.

With ``--flower-rounds R`` Flower runs only R rounds and its wall time at ``--rounds`` is
extrapolated (Ray's start, then every round as long as the rounds it ran); the ratio uses it.

    python bench/simulate.py [--devices 1000] [--rounds 20] [--split group] [--plain]
                             [--aicfl-only | --flower-only] [--flower-rounds R] [--ray-address local]
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "churn.toml"


def run_aicfl(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    from server.simulation.splits import parse_split
    from server.simulation.whole_job import SimulationOptions, simulate_job

    opts = SimulationOptions(
        devices=args.devices,
        split=parse_split(args.split),
        dropout=args.dropout,
        rounds=args.rounds,
        seed=args.seed,
        ceiling=False,
        ray_address=args.ray_address,
        processes=args.processes,
    )
    t0 = time.perf_counter()
    summary = simulate_job(spec, opts, Path(args.out) if args.out else None)
    wall = time.perf_counter() - t0
    sim = summary["simulation"]
    return {
        "engine": f"aicfl ({sim['engine']})",
        "secure": summary["secure"],
        "status": summary["status"],
        "rounds": sum(r["status"] == "completed" for r in summary["rounds"]),
        "wall_seconds": round(wall, 1),
        "job_seconds": sim["job_seconds"],
        "device_seconds": sim["device_seconds"],
        "coordinator_seconds": sim["coordinator_seconds"],
        "final_auc": summary["final"].get("auc"),
        "secagg_exact": sim["secagg_exact"],
    }


def run_flower(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """FedAvg over the same devices in Flower's simulation engine; see the module's docstring."""
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from server.simulation.data import prepare
    from server.simulation.splits import parse_split
    from shared.apps import DeviceContext, JobContext
    from shared.tabular import Preprocessor, local_statistics
    from shared.training import evaluate, train_local
    from shared.zoo import architecture, build_model, flatten_parameters, load_flat_parameters

    spec = spec.model_copy(update={"rounds": args.flower_rounds or args.rounds or spec.rounds})
    schema = spec.tabular
    data, _ = prepare(args.data, schema, parse_split(args.split), args.devices, args.seed)
    pre = Preprocessor.from_statistics(local_statistics(data.train, schema), schema)
    arch = architecture(spec.model, pre.input_dim, pre.output_dim)
    with torch.random.fork_rng(devices=[]):
        initial = flatten_parameters(build_model(arch, seed=spec.seed))
    job = JobContext(spec, pre.to_dict())
    shards = []
    for i, part in enumerate(data.parts):
        train_idx, hold_idx = DeviceContext(job, "", f"flower-{i}").holdout_split(len(part))
        # A device of fewer than 5 rows keeps none aside (DeviceContext.holdout_split), as on aicfl.
        empty = (np.zeros((0, pre.input_dim), dtype=np.float32), np.zeros(0, dtype=np.float32))
        holdout = pre.transform(part.iloc[hold_idx]) if len(hold_idx) else empty
        shards.append((pre.transform(part.iloc[train_idx]), holdout))
    evaluates = any(len(holdout[1]) for _, holdout in shards)
    x_test, y_test = pre.transform(data.test)
    training = spec.training
    task = schema.task

    class Client(NumPyClient):  # type: ignore[misc]
        def __init__(self, pid: int):
            self.pid = pid

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            (x, y), _ = shards[self.pid]
            model = build_model(arch)
            load_flat_parameters(model, parameters[0])
            result = train_local(
                model,
                x,
                y,
                task=task,
                epochs=training.epochs,
                batch_size=training.batch_size,
                learning_rate=training.learning_rate,
                optimizer=training.optimizer,
                seed=(spec.seed * 1_000_003 + int(config.get("round", 0))) % (2**31),  # as aicfl's task seed
                threads=1,
            )
            return [flatten_parameters(model)], len(y), {"loss": float(result["loss"])}

        def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
            _, (x, y) = shards[self.pid]
            if len(y) == 0:
                return 0.0, 0, {}
            model = build_model(arch)
            load_flat_parameters(model, parameters[0])
            m = evaluate(model, x, y, task=task, target_mean=pre.target_mean, target_std=pre.target_std)
            return float(m["loss"]), len(y), {"auc": float(m.get("auc", float("nan")))}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client(int(context.node_config["partition-id"])).to_client()

    out: dict[str, Any] = {}

    def central(server_round, parameters, config):  # type: ignore[no-untyped-def]
        model = build_model(arch)
        load_flat_parameters(model, parameters[0])
        m = evaluate(model, x_test, y_test, task=task, target_mean=pre.target_mean, target_std=pre.target_std)
        out["final"] = {k: float(v) for k, v in m.items()}
        out["rounds"] = server_round
        out.setdefault("t_first", time.perf_counter())  # round 0: the initial model, after Ray's start
        out["t_last"] = time.perf_counter()
        return float(m["loss"]), out["final"]

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=1.0,
            # Every device evaluates its holdout rows, unless none has any (Flower divides by their count).
            fraction_evaluate=1.0 if evaluates else 0.0,
            min_fit_clients=args.devices,
            min_evaluate_clients=args.devices if evaluates else 0,
            min_available_clients=args.devices,
            initial_parameters=ndarrays_to_parameters([initial]),
            evaluate_fn=central,
            on_fit_config_fn=lambda r: {"round": r},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=spec.rounds))

    logging.getLogger("flwr").setLevel(logging.ERROR)
    backend_config: Any = {
        "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=ClientApp(client_fn=client_fn),
            num_supernodes=args.devices,
            backend_config=backend_config,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    rounds = out.get("rounds", 0)
    per_round = (out["t_last"] - out["t_first"]) / rounds if rounds else None
    asked = args.rounds or spec.rounds
    return {
        "engine": "flower (run_simulation, ray)",
        "secure": False,
        "status": "completed" if out.get("rounds") == spec.rounds else "incomplete",
        "rounds": out.get("rounds", 0),
        "wall_seconds": round(wall, 1),
        "seconds_per_round": None if per_round is None else round(per_round, 2),
        # Ray's start and the first evaluation, then every round as long as the ones measured.
        "wall_seconds_at_asked_rounds": None
        if per_round is None
        else round(wall + per_round * (asked - rounds), 1),
        "final_auc": out.get("final", {}).get("auc"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default=str(JOB))
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--split", default="group")
    p.add_argument("--data", default="mlc_churn")
    p.add_argument("--dropout", type=float, default=0.0, help="aicfl only (Flower's FedAvg has no dropouts)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--plain", action="store_true", help="aicfl with secure = false, as Flower's FedAvg")
    p.add_argument("--ray-address", default=None, help="aicfl's devices on Ray (local, auto or an address)")
    p.add_argument("--processes", type=int, default=None, help="aicfl's devices in N local worker processes")
    p.add_argument(
        "--flower-rounds", type=int, default=None, help="Flower runs this many rounds (default: --rounds)"
    )
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Flower's Ray CPUs")
    p.add_argument("--out", default=None, help="folder for aicfl's summary.json")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--aicfl-only", action="store_true")
    side.add_argument("--flower-only", action="store_true")
    args = p.parse_args()

    from shared.jobspec import load_spec

    spec = load_spec(args.job)
    if args.plain:
        spec = spec.model_copy(update={"secure": False})
    print(
        json.dumps(
            {
                "job": Path(args.job).name,
                "devices": args.devices,
                "rounds": args.rounds,
                "split": args.split,
                "seed": args.seed,
                "cpus": os.cpu_count(),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )
    rows = []
    if not args.flower_only:
        rows.append(run_aicfl(spec, args))
        print(json.dumps(rows[-1]), flush=True)
    if not args.aicfl_only:
        rows.append(run_flower(spec, args))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) == 2:
        a, f = rows
        print(
            json.dumps(
                {
                    "flower_over_aicfl_wall": round(
                        (f["wall_seconds_at_asked_rounds"] or f["wall_seconds"]) / a["wall_seconds"], 2
                    ),
                    "auc_aicfl_minus_flower": None
                    if a["final_auc"] is None or f["final_auc"] is None
                    else round(a["final_auc"] - f["final_auc"], 4),
                }
            )
        )


if __name__ == "__main__":
    main()
